"""Weight sync: push the actor's new weights into the rollout engine after every update.

One small interface, :class:`WeightSync` (``push(version) -> stats``), so the trainer loop does
not care where the rollout engine lives. :class:`ColocatedWeightSync` serves ``colocate``
placement: each rank holds its own rollout engine beside its DeepSpeed shard.

Weights travel in **buckets**: the parameters, in module order, are cut into groups of about
``bucket_bytes`` and each group is copied into one contiguous flat buffer; the engine receives
views into that buffer. The packing helpers (:func:`plan_buckets`, :func:`pack_bucket`,
:func:`unpack_bucket`, :class:`BucketSpec`) are independent of placement, and
:class:`BroadcastWeightSync` (``split`` placement) broadcasts the same flat buffers (one
collective per bucket) to the rollout ranks, which unpack them with the same spec
(:func:`receive_weights`).

Under ZeRO-3 each bucket is gathered with ``deepspeed.zero.GatheredParameters`` -- a collective,
so every rank walks the same buckets in the same order, even though each loads its own engine.
Peak extra memory is one gathered bucket plus its flat copy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from tritonrlhf.engine.rl.rollout import RolloutEngine

_STRIP_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


class WeightSync(Protocol):
    def push(self, version: int) -> dict[str, float]:
        """Send the current actor weights to the rollout engine, stamped ``version``.

        Returns log-ready stats: ``sync/buckets``, ``sync/bytes``, ``sync/gather_s``,
        ``sync/load_s``, ``time/sync_s``.
        """
        ...


# --------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class BucketSpec:
    """What a receiver needs to unpack one flat bucket: names, shapes, one dtype.

    The flat buffer holds the tensors back to back in this order (``numel`` elements).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def plan_buckets(
    entries: Iterable[tuple[str, torch.Size, torch.dtype]], bucket_bytes: int
) -> list[BucketSpec]:
    """Cut ``(name, full_shape, dtype)`` entries, in order, into buckets of at most ``bucket_bytes``.

    A bucket never mixes dtypes; a tensor larger than ``bucket_bytes`` gets a bucket of its own.
    Order is kept, so a receiver sees each layer's weights together.
    """
    specs: list[BucketSpec] = []
    names: list[str] = []
    shapes: list[torch.Size] = []
    dtype: torch.dtype | None = None
    size = 0
    for name, shape, dt in entries:
        nbytes = math.prod(shape) * dt.itemsize
        if names and (dt != dtype or size + nbytes > bucket_bytes):
            specs.append(BucketSpec(tuple(names), tuple(shapes), dtype))
            names, shapes, size = [], [], 0
        names.append(name)
        shapes.append(torch.Size(shape))
        dtype = dt
        size += nbytes
    if names:
        specs.append(BucketSpec(tuple(names), tuple(shapes), dtype))
    return specs


def pack_bucket(
    tensors: Sequence[torch.Tensor], spec: BucketSpec, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Copy ``tensors`` (full shapes, in ``spec`` order) into one new flat ``[spec.numel]`` buffer."""
    flat = torch.empty(spec.numel, dtype=spec.dtype, device=device)
    offset = 0
    for t, shape in zip(tensors, spec.shapes, strict=True):
        n = math.prod(shape)
        flat[offset : offset + n].view(shape).copy_(t.detach())
        offset += n
    return flat


def unpack_bucket(flat: torch.Tensor, spec: BucketSpec) -> list[tuple[str, torch.Tensor]]:
    """``(name, view)`` pairs into ``flat``; no copies."""
    out, offset = [], 0
    for name, shape in zip(spec.names, spec.shapes):
        n = math.prod(shape)
        out.append((name, flat[offset : offset + n].view(shape)))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"bucket holds {flat.numel()} elements, spec describes {offset}")
    return out


def hf_name(name: str) -> str:
    """Strip wrapper prefixes (DeepSpeed/DDP ``module.``, ``torch.compile``'s ``_orig_mod.``)."""
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p) :], True
    return name.replace("._orig_mod.", ".")


def _full_shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape  # ZeRO-3 partitions keep the full shape here


# --------------------------------------------------------------------------- the actor side
class _ActorBuckets:
    """The actor's parameters in HF names, planned into buckets; gathers a bucket under ZeRO-3.

    ``module``: a DeepSpeed engine or any ``nn.Module`` whose parameter names are, after stripping
    wrapper prefixes, the HF checkpoint names. A tied LM head (``tie_word_embeddings``) is the
    embedding's parameter, so it is listed (and sent) once, as ``model.embed_tokens.weight``; vLLM
    skips ``lm_head.*`` for tied models and its head follows the embedding
    (``tritonrlhf.engine.rl.rollout._refresh_tied_lm_head``). ``zero_stage=3`` (or parameters that carry ZeRO-3
    ``ds_id``) makes each bucket a collective gather: iterate on every rank together.
    """

    def __init__(self, module: torch.nn.Module, bucket_bytes: int, zero_stage: int) -> None:
        self.module = getattr(module, "module", module)  # DeepSpeedEngine -> the wrapped model
        self.params = [(hf_name(n), p) for n, p in self.module.named_parameters()]
        self.zero3 = zero_stage == 3 or any(hasattr(p, "ds_id") for _, p in self.params)
        self.specs = plan_buckets(((n, _full_shape(p), p.dtype) for n, p in self.params), bucket_bytes)

    def _gathered(self, params: list[torch.Tensor]):
        if not self.zero3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def packed(self, device: torch.device | str | None = None, pack: bool = True):
        """Yield ``(spec, flat, gather_s)`` per bucket; ``flat`` is None when ``pack`` is False
        (a rank that only takes part in the ZeRO-3 gathers)."""
        it = iter(p for _, p in self.params)
        for spec in self.specs:
            params = [next(it) for _ in spec.names]
            t = time.perf_counter()
            with self._gathered(params):
                flat = pack_bucket(params, spec, device=device or params[0].device) if pack else None
            yield spec, flat, time.perf_counter() - t


class ColocatedWeightSync:
    """Push a (DeepSpeed-wrapped or plain) actor's weights into this rank's rollout engine.

    Under ZeRO-3 each bucket is a collective gather: call ``push`` on every rank together.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        rollout: RolloutEngine,
        bucket_bytes: int = 256 << 20,
        zero_stage: int = 0,
    ):
        self.actor = _ActorBuckets(module, bucket_bytes, zero_stage)
        self.rollout = rollout
        self.specs = self.actor.specs

    @torch.no_grad()
    def push(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        gather_s = load_s = 0.0
        nbytes = 0
        for spec, flat, g in self.actor.packed():
            t1 = time.perf_counter()
            self.rollout.load_weights(unpack_bucket(flat, spec))
            gather_s += g
            load_s += time.perf_counter() - t1
            nbytes += spec.nbytes
            del flat
        t = time.perf_counter()
        self.rollout.finish_sync(version)
        load_s += time.perf_counter() - t
        return {
            "sync/buckets": float(len(self.specs)),
            "sync/bytes": float(nbytes),
            "sync/bucket_mb_max": max(s.nbytes for s in self.specs) / 2**20,
            "sync/gather_s": gather_s,
            "sync/load_s": load_s,
            "time/sync_s": time.perf_counter() - t0,
        }


# --------------------------------------------------------------------------- split
class BroadcastWeightSync:
    """``split`` placement: broadcast the actor's weights from trainer 0 to the rollout ranks.

    Every trainer calls ``push`` (under ZeRO-3 each bucket is gathered over the trainers); trainer
    0 packs each bucket into one flat buffer and broadcasts it over the placement's weight group
    (one collective per bucket). Bucket k+1 is gathered and packed while bucket k is in flight;
    at most two flat buffers live at once. The rollout ranks receive with
    :func:`receive_weights`, which loads bucket k into vLLM while bucket k+1 arrives.
    """

    def __init__(
        self, module: torch.nn.Module, placement, bucket_bytes: int = 256 << 20, zero_stage: int = 0
    ):
        self.actor = _ActorBuckets(module, bucket_bytes, zero_stage)
        self.placement = placement
        self.specs = self.actor.specs
        self.channels = (
            [placement.to_rollout(i) for i in range(placement.num_rollout)]
            if placement.is_coordinator
            else []
        )

    @torch.no_grad()
    def push(self, version: int) -> dict[str, float]:
        from tritonrlhf.engine.rl.placement import broadcast, wait

        pl = self.placement
        t0 = time.perf_counter()
        for ch in self.channels:  # the header goes first: the rollout ranks then join the broadcasts
            ch.send({"kind": "weights", "version": version, "specs": self.specs})
        gather_s = send_s = 0.0
        in_flight = None
        for _spec, flat, g in self.actor.packed(pl.weight_device, pack=pl.is_coordinator):
            gather_s += g
            if flat is None:
                continue
            t = time.perf_counter()
            if in_flight is not None:
                wait(in_flight[0], pl.timeout_s, "weight broadcast to the rollout engines")
            in_flight = (broadcast(pl.weight_group, flat), flat)
            send_s += time.perf_counter() - t
        t = time.perf_counter()
        if in_flight is not None:
            wait(in_flight[0], pl.timeout_s, "weight broadcast to the rollout engines")
        send_s += time.perf_counter() - t
        return {
            "sync/buckets": float(len(self.specs)),
            "sync/bytes": float(sum(s.nbytes for s in self.specs)),
            "sync/bucket_mb_max": max(s.nbytes for s in self.specs) / 2**20,
            "sync/gather_s": gather_s,
            "sync/send_s": send_s,
            "time/sync_s": time.perf_counter() - t0,
        }


@torch.no_grad()
def receive_weights(placement, specs: Sequence[BucketSpec], rollout: RolloutEngine, version: int) -> dict:
    """Rollout rank: receive ``specs``' buckets from trainer 0 and load each into ``rollout``.

    Bucket k+1's broadcast is posted before bucket k is loaded, so receiving and loading overlap.
    Returns ``{"recv_s", "load_s"}``.
    """
    from tritonrlhf.engine.rl.placement import broadcast, wait

    pl = placement
    recv_s = load_s = 0.0

    def post(spec: BucketSpec):
        buf = torch.empty(spec.numel, dtype=spec.dtype, device=pl.weight_device)
        return broadcast(pl.weight_group, buf), buf

    pending = post(specs[0]) if specs else None
    for k, spec in enumerate(specs):
        t = time.perf_counter()
        work, buf = pending
        wait(work, pl.timeout_s, "weight broadcast from trainer 0")
        pending = post(specs[k + 1]) if k + 1 < len(specs) else None
        t1 = time.perf_counter()
        rollout.load_weights(unpack_bucket(buf, spec))
        recv_s += t1 - t
        load_s += time.perf_counter() - t1
    t = time.perf_counter()
    rollout.finish_sync(version)
    return {"recv_s": recv_s, "load_s": load_s + time.perf_counter() - t}
