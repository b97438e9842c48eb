"""Small distributed helpers: init, rank / world size, stat averaging, barrier.

Everything is a no-op (rank 0 of 1) in a plain single process, so the same
trainer code runs under ``deepspeed``/``torchrun`` and in a bare ``python``.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

# The variables a launcher (deepspeed, torchrun) sets to give a process its place in the world.
DIST_ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def launched() -> bool:
    """True when started by a launcher (deepspeed, torchrun) that set WORLD_SIZE/RANK."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(timeout_s: float = 1800.0) -> None:
    """Initialize the process group when launched (gloo on CPU, nccl on GPU); idempotent.

    In a bare single process this does nothing; DeepSpeed engines then set up a
    world of one themselves (see ``ensure_single_process_env``).
    """
    if dist.is_available() and dist.is_initialized():
        return
    if not launched():
        return
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def ensure_single_process_env(port: int | None = None) -> None:
    """Fill in MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for an in-process world of one."""
    if launched():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if port is None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _comm_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(stats: dict[str, float]) -> dict[str, float]:
    """Sum a dict of floats across ranks in float64 (one collective). Every rank must pass the same keys."""
    if world_size() == 1 or not stats:
        return {k: float(v) for k, v in stats.items()}
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_reduce_mean(stats: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats across ranks (one collective). Every rank must pass the same keys."""
    world = world_size()
    return {k: v / world for k, v in all_reduce_sum(stats).items()}


def all_reduce_max(value: float) -> float:
    """The maximum of a scalar across ranks (e.g. an "any rank failed" flag)."""
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_cat(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every rank's 1-D ``x`` (lengths may differ) concatenated in rank order, as ``dtype``.

    Two collectives (the lengths, then the padded values); a world of one returns ``x`` itself.
    """
    if world_size() == 1:
        return x.to(dtype)
    dev = _comm_device()
    n = torch.tensor([x.numel()], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    buf = torch.zeros(longest, dtype=dtype, device=dev)
    buf[: x.numel()] = x.to(dev, dtype)
    out = [torch.zeros_like(buf) for _ in sizes]
    dist.all_gather(out, buf)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)]).to(x.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled; one collective on the default group)."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def barrier(timeout_s: float = 600.0) -> None:
    """Wait for every rank; raises RuntimeError if some rank does not arrive within ``timeout_s``.

    On gloo this uses ``monitored_barrier`` (names the missing ranks); elsewhere
    an all-reduce with a timeout-bounded wait.
    """
    if world_size() == 1:
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timeout)
        else:
            work = dist.all_reduce(torch.zeros(1, device=_comm_device()), async_op=True)
            if not work.wait(timeout=timeout):
                raise RuntimeError("barrier timed out")
    except RuntimeError as e:
        raise RuntimeError(
            f"barrier: not all ranks arrived within {timeout_s:.0f}s (rank {rank()}): {e}"
        ) from e
