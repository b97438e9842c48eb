"""Crash-safe training checkpoints: DeepSpeed engine state, per-rank state and RNGs, an HF export.

Layout under ``<output_dir>/checkpoints/``::

    step_000012/
        meta.json        step, policy_version, world_size, model fingerprint, time, resolved config
        actor/ds/...     DeepSpeed engine state per role (parameters, optimizer, LR scheduler)
        critic/ds/...
        rank_0.pt        per-rank ``state`` (sampler, KL controller, normalizer, counters...) + RNGs
        rank_1.pt
        hf/              the actor as ``save_pretrained`` + tokenizer (optional; usable as is)
        COMPLETE         written last: a manifest {relative path: size in bytes}

Atomicity: every rank writes into ``step_000012.tmp-<nonce>/``; after a barrier rank 0
writes ``meta.json``, fsyncs every file, writes ``COMPLETE``, and renames the folder to
``step_000012`` with one ``os.replace``. Only folders named ``step_<digits>`` holding a
``COMPLETE`` whose sizes match count as checkpoints, so a process killed at any point
leaves the previous checkpoint the newest one. Stale ``*.tmp-*`` folders are removed by
the next save. Pruning deletes a checkpoint's ``COMPLETE`` before the rest of it.

All ranks must call ``save`` and ``load`` (DeepSpeed's save and load, and ZeRO-3
gathering for the export, are collective). The ranks must share the filesystem.
Files are written by this code and loaded with ``weights_only=False``: a checkpoint
is trusted input.

After ``load`` the trainer pushes the actor's weights to the rollout engine before
its first rollout; the checkpoint stores the policy version it had reached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tritonrlhf.engine import distributed as D
from tritonrlhf.engine.config import ConfigError

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
META = "meta.json"
DS_TAG = "ds"
_STEP_RE = re.compile(r"^step_(\d+)$")
_STALE_RE = re.compile(r"^step_\d+\.(tmp|old)-[0-9a-f]+$")


# --------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU, and every CUDA device when available) generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``; CUDA states are restored only where CUDA is available."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- model fingerprint
def model_fingerprint(module: nn.Module) -> dict[str, Any]:
    """``{"hash", "num_parameters", "shapes": {name: full shape}}`` of a module's parameters.

    Uses ZeRO-3's ``ds_shape`` for partitioned parameters, so every rank and every
    ZeRO stage gives the same fingerprint for the same model.
    """
    shapes = {
        name: [int(s) for s in getattr(p, "ds_shape", p.shape)] for name, p in module.named_parameters()
    }
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    return {"hash": digest, "num_parameters": sum(math.prod(s) for s in shapes.values()), "shapes": shapes}


def engines_fingerprint(engines: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{role: model_fingerprint(engine.module)}`` for DeepSpeed engines (or plain modules)."""
    return {role: model_fingerprint(getattr(e, "module", e)) for role, e in engines.items()}


def _describe(fp: Mapping[str, Any]) -> str:
    return f"{fp['num_parameters']:,} parameters in {len(fp['shapes'])} tensors (shape hash {fp['hash']})"


def check_fingerprint(path: Path, saved: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` naming the first differences if ``expected`` roles differ from ``saved``."""
    for role, want in expected.items():
        have = saved.get(role)
        if have is None:
            raise ConfigError(f"resume: checkpoint {path} has no {role!r} model (it has {sorted(saved)})")
        if have["hash"] == want["hash"]:
            continue
        a, b = have["shapes"], want["shapes"]
        diffs = [f"{n}: checkpoint {a[n]} vs this run {b[n]}" for n in a if n in b and a[n] != b[n]]
        diffs += [f"{n}: only in the checkpoint" for n in a if n not in b]
        diffs += [f"{n}: only in this run" for n in b if n not in a]
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise ConfigError(
            f"resume: checkpoint {path} was written for a model with {role}: {_describe(have)} "
            f"but this run has {role}: {_describe(want)}; first differences: {'; '.join(diffs[:3])}{more}. "
            "Point resume at a checkpoint of this model, or use resume=never."
        )


# --------------------------------------------------------------------------- HF export
def hf_exporter(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase | None = None, rank: int | None = None
) -> Callable[[Path], None]:
    """An ``export_hf(path)`` for ``CheckpointManager.save``: ``save_pretrained`` (+ tokenizer) on rank 0.

    Call it on every rank: under ZeRO-3 the full parameters are gathered (a collective)
    and only rank 0 writes. Gathers the whole model at once (fine up to a few B params).
    """

    def export(path: Path) -> None:
        params = list(model.parameters())
        ctx: Any = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with ctx:
            if (_rank() if rank is None else rank) == 0:
                model.save_pretrained(path, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(path)

    return export


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict (CPU clones) on rank 0, None elsewhere; gathers ZeRO-3 partitions.

    Names that alias one tensor (a tied LM head and the input embedding) share one clone, so
    ``save_pretrained`` still sees the tie and writes the tensor once, as it does for the model.
    A collective under ZeRO-3: every rank must call it.
    """
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if not D.is_main():
            return None
        clones: dict[tuple, torch.Tensor] = {}
        out = {}
        for k, v in model.state_dict().items():
            key = (v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
            if key not in clones:
                clones[key] = v.detach().to("cpu", copy=True)
            out[k] = clones[key]
        return out


def save_hf_checkpoint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike
) -> Path:
    """``save_pretrained`` the model (gathered under ZeRO-3) and its tokenizer on rank 0; all ranks wait.

    Collective: every rank must call it.
    """
    out = Path(out_dir)
    state = gathered_state_dict(model)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    D.barrier()
    return out


# --------------------------------------------------------------------------- output folder
def writable_dir(path: str | os.PathLike, key: str = "output_dir") -> Path:
    """Create ``path`` and check a file can be written in it; ConfigError naming ``key`` if not."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key} is not writable: {p} ({e.strerror or e})") from None
    return p


# --------------------------------------------------------------------------- manager
def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (and ``root``)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _manifest(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = p.stat().st_size
    return dict(sorted(out.items()))


def step_of(path: str | os.PathLike) -> int:
    """The step number of a ``step_000012`` checkpoint folder."""
    m = _STEP_RE.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a step_<N> checkpoint folder")
    return int(m.group(1))


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """``None`` if ``path`` is a complete checkpoint, else the reason it is not."""
    p = Path(path)
    if not p.is_dir():
        return "not a folder"
    if not (p / COMPLETE).is_file():
        return f"no {COMPLETE} marker (the save that wrote it did not finish)"
    try:
        manifest = json.loads((p / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {COMPLETE} marker ({e})"
    for rel, size in manifest.items():
        f = p / rel
        if not f.is_file():
            return f"missing file {rel}"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def _complete_in(root: Path) -> list[Path]:
    """Complete ``step_<N>`` checkpoints directly under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and verify_checkpoint(p) is None]
    return sorted(found, key=step_of)


class CheckpointManager:
    """Saves, finds, prunes and loads checkpoints under ``<output_dir>/checkpoints``.

    ``keep_last`` complete checkpoints are kept (0 keeps all). ``rank`` and
    ``world_size`` default to torch.distributed's (0 of 1 when it is not initialized).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        keep_last: int = 3,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if keep_last < 0:
            raise ConfigError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
        self.root = Path(output_dir) / CHECKPOINTS
        self.keep_last = keep_last
        self.rank = _rank() if rank is None else rank
        self.world_size = _world_size() if world_size is None else world_size
        self.last_save_seconds: dict[str, float] = {}

    # ---------------------------------------------------------------- finding
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return _complete_in(self.root)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.complete()
        return found[-1] if found else None

    def resolve(self, resume: str) -> Path | None:
        """``never`` -> None; ``auto`` -> ``latest()`` (None when there is none); else a checkpoint path.

        A path may also be an output folder or its ``checkpoints`` folder: its newest
        complete checkpoint is used. Errors (``ConfigError``) say why a path is unusable.
        """
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        p = Path(resume)
        if not p.exists():
            raise ConfigError(f"resume: checkpoint path does not exist: {p}")
        if not (_STEP_RE.match(p.name) or _STALE_RE.match(p.name)):
            newest = _complete_in(p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p)
            if newest:
                return newest[-1]
            raise ConfigError(
                f"resume: {p} is neither a checkpoint (a step_<N> folder) nor a folder holding "
                "complete checkpoints"
            )
        why = verify_checkpoint(p) if _STEP_RE.match(p.name) else "an unfinished save's temporary folder"
        if why is None:
            return p
        newest = _complete_in(p.parent)
        hint = f"; the newest complete checkpoint there is {newest[-1]}" if newest else ""
        raise ConfigError(f"resume: {p} is not a complete checkpoint: {why}{hint}")

    def read_meta(self, path: str | os.PathLike) -> dict[str, Any]:
        return json.loads((Path(path) / META).read_text())

    # ---------------------------------------------------------------- saving
    def save(
        self,
        step: int,
        engines: Mapping[str, DeepSpeedEngine],
        state: Mapping[str, Any],
        export_hf: Callable[[Path], None] | None = None,
        *,
        policy_version: int | None = None,
        config: Mapping[str, Any] | None = None,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically on every rank (collective); returns its final path.

        ``state`` is this rank's picklable extra state; the RNGs are added to it. ``export_hf``
        runs on every rank with ``<tmp>/hf``. ``fingerprint`` defaults to ``engines_fingerprint``.
        The RNG streams are left exactly as they were before the call.
        """
        t0 = time.perf_counter()
        rng = capture_rng_state()
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f"{final.name}.tmp-{self._agree_nonce()}"
        if self.rank == 0:
            self._remove_stale()
            tmp.mkdir(parents=True)
        self._barrier()
        for role, engine in engines.items():
            engine.save_checkpoint(str(tmp / role), tag=DS_TAG, save_latest=False)
        torch.save({"state": dict(state), "rng": rng}, tmp / f"rank_{self.rank}.pt")
        t1 = time.perf_counter()
        if export_hf is not None:
            export_hf(tmp / "hf")
        t2 = time.perf_counter()
        self._barrier()
        if self.rank == 0:
            meta = {
                "step": int(step),
                "policy_version": policy_version,
                "world_size": self.world_size,
                "roles": sorted(engines),
                "fingerprint": dict(fingerprint or engines_fingerprint(engines)),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "config": dict(config) if config is not None else None,
            }
            (tmp / META).write_text(json.dumps(meta, indent=1))
            _fsync_tree(tmp)
            _write_synced(tmp / COMPLETE, json.dumps(_manifest(tmp), indent=0))
            _fsync_dir(tmp)
            old = None
            if final.exists():  # the same step saved again (e.g. stopped right after a resume)
                old = final.with_name(f"{final.name}.old-{tmp.name.rsplit('-', 1)[1]}")
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self.prune()
        self._barrier()
        restore_rng_state(rng)
        t3 = time.perf_counter()
        self.last_save_seconds = {"state": t1 - t0, "hf_export": t2 - t1, "commit": t3 - t2, "total": t3 - t0}
        return final

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep_last`` complete checkpoints (rank 0 only); returns them."""
        if self.rank != 0 or self.keep_last == 0:
            return []
        doomed = self.complete()[: -self.keep_last]
        for p in doomed:
            (p / COMPLETE).unlink()  # first, so a half-deleted folder never looks complete
            shutil.rmtree(p, ignore_errors=True)
        return doomed

    def _remove_stale(self) -> None:
        if self.root.is_dir():
            for p in self.root.iterdir():
                if _STALE_RE.match(p.name):
                    shutil.rmtree(p, ignore_errors=True)

    def _agree_nonce(self) -> str:
        nonce = [uuid.uuid4().hex[:12]]
        if self.world_size > 1:
            dist.broadcast_object_list(nonce, src=0)
        return nonce[0]

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # ---------------------------------------------------------------- loading
    def load(
        self,
        path: str | os.PathLike,
        engines: Mapping[str, DeepSpeedEngine],
        expected_fingerprint: Mapping[str, Any] | None = None,
        *,
        load_optimizer: bool = True,
        restore_rng: bool = True,
    ) -> dict[str, Any]:
        """Restore ``engines`` (weights, optimizer, LR scheduler) and the RNGs; returns this rank's state.

        Checks before touching any engine that the checkpoint is complete, that its model
        fingerprint matches (``expected_fingerprint`` defaults to the engines' own) and that
        its world size matches; each failure is a ``ConfigError`` that says what differs.
        """
        p = Path(path)
        why = verify_checkpoint(p)
        if why is not None:
            raise ConfigError(f"resume: {p} is not a complete checkpoint: {why}")
        meta = self.read_meta(p)
        check_fingerprint(p, meta["fingerprint"], expected_fingerprint or engines_fingerprint(engines))
        if meta["world_size"] != self.world_size:
            raise ConfigError(
                f"resume: checkpoint {p} was written by {meta['world_size']} ranks but this run has "
                f"{self.world_size}; ZeRO partitions the optimizer state per rank, so resume with "
                f"{meta['world_size']} ranks"
            )
        for role, engine in engines.items():
            load_path, _ = engine.load_checkpoint(
                str(p / role),
                tag=DS_TAG,
                load_optimizer_states=load_optimizer,
                load_lr_scheduler_states=load_optimizer,
            )
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load the {role} engine state from {p / role}")
        blob = torch.load(p / f"rank_{self.rank}.pt", map_location="cpu", weights_only=False)
        if restore_rng:
            restore_rng_state(blob["rng"])
        self._barrier()
        return blob["state"]


# --------------------------------------------------------------------------- signals
class GracefulShutdown:
    """``with GracefulShutdown() as stop:`` -- SIGTERM/SIGINT ask the loop to save and exit.

    The first signal sets ``should_stop``; the trainer checks it (``should_stop_all()``
    on every rank, so all ranks agree) at a step boundary, saves, prints
    ``stop_message`` and exits 0. The first signal also puts the default action back,
    so a second signal terminates the process at once, even inside a blocking call;
    a save it interrupts leaves the previous checkpoint intact. Old handlers are
    restored on exit. Must be entered in the main thread.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> GracefulShutdown:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("GracefulShutdown must be entered in the main thread")
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum
        for s in self.signals:
            signal.signal(s, signal.SIG_DFL)
        name = signal.Signals(signum).name
        os.write(
            2,  # the raw fd: safe inside a signal handler, unlike a buffered stream
            f"[rank {_rank()}] received {name}: saving a checkpoint after this step, then exiting; "
            f"send {name} again to exit now without saving\n".encode(),
        )

    @property
    def should_stop(self) -> bool:
        """True once a signal arrived in this process."""
        return self.received is not None

    def should_stop_all(self) -> bool:
        """True on every rank if a signal arrived on any rank (a collective when distributed)."""
        flag = float(self.should_stop)
        if _world_size() > 1:
            t = torch.tensor([flag], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = float(t.item())
        return flag > 0

    def stop_message(self, step: int, path: str | os.PathLike) -> str:
        name = signal.Signals(self.received).name if self.received else "a stop request"
        return (
            f"Stopped on {name} after step {step}; checkpoint saved to {path}. "
            "Run again with resume=auto to continue."
        )
