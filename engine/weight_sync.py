"""Weight sync: push the actor's new weights into the rollout engine after every update.

One small interface, :class:`WeightSync` (``push(version) -> stats``), so the trainer loop does
not care where the rollout engine lives. :class:`ColocatedWeightSync` serves ``colocate``
placement: each rank holds its own rollout engine beside its DeepSpeed shard.

Weights travel in **buckets**: the parameters, in module order, are cut into groups of about
``bucket_bytes`` and each group is copied into one contiguous flat buffer; the engine receives
views into that buffer. The packing helpers (:func:`plan_buckets`, :func:`pack_bucket`,
:func:`unpack_bucket`, :class:`BucketSpec`) are independent of placement, so a ``split``
placement can broadcast the same flat buffers (one collective per bucket) and unpack them on the
rollout ranks with the same spec.

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

from engine.rollout import RolloutEngine

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


# --------------------------------------------------------------------------- colocated
class ColocatedWeightSync:
    """Push a (DeepSpeed-wrapped or plain) actor's weights into this rank's rollout engine.

    ``module``: a DeepSpeed engine or any ``nn.Module`` whose parameter names are, after stripping
    wrapper prefixes, the HF checkpoint names. ``zero_stage=3`` (or parameters that carry ZeRO-3
    ``ds_id``) makes each bucket a collective gather: call ``push`` on every rank together.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        rollout: RolloutEngine,
        bucket_bytes: int = 256 << 20,
        zero_stage: int = 0,
    ):
        self.module = getattr(module, "module", module)  # DeepSpeedEngine -> the wrapped model
        self.rollout = rollout
        self.params = [(hf_name(n), p) for n, p in self.module.named_parameters()]
        self.zero3 = zero_stage == 3 or any(hasattr(p, "ds_id") for _, p in self.params)
        self.specs = plan_buckets(((n, _full_shape(p), p.dtype) for n, p in self.params), bucket_bytes)

    def _gathered(self, params: list[torch.Tensor]):
        if not self.zero3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    @torch.no_grad()
    def push(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        gather_s = load_s = 0.0
        nbytes = 0
        it = iter(p for _, p in self.params)
        for spec in self.specs:
            params = [next(it) for _ in spec.names]
            t = time.perf_counter()
            with self._gathered(params):
                flat = pack_bucket(params, spec, device=params[0].device)
            t1 = time.perf_counter()
            self.rollout.load_weights(unpack_bucket(flat, spec))
            gather_s += t1 - t
            load_s += time.perf_counter() - t1
            nbytes += spec.nbytes
            del flat
        t = time.perf_counter()
        self.rollout.finish_sync(version)
        load_s += time.perf_counter() - t
        return {
            "sync/buckets": float(len(self.specs)),
            "sync/bytes": float(nbytes),
            "sync/gather_s": gather_s,
            "sync/load_s": load_s,
            "time/sync_s": time.perf_counter() - t0,
        }
