"""Peak memory of one ``linear_logprobs`` forward + backward (``bench_kernels.py --memory``).

On CPU the step runs in a fresh ``bench_kernels.py --memory-child`` process, because the peak
resident set is a per-process number; on CUDA it reads the allocator's peak.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks._common import fmt


def _rss_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def linear_step_memory(n: int, vocab: int, width: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Peak memory growth of one ``linear_logprobs`` forward + backward with entropy.

    Run in a process of its own on CPU (``measure_memory``): the peak resident set is a
    per-process number. Inputs are filled in place, so building them leaves no freed
    temporaries behind; a tiny warm-up step loads code and thread pools first."""
    import resource

    from tritonrlhf.kernels import linear_logprobs
    from tritonrlhf.kernels._dispatch import use_triton

    def step(hidden, weight, targets, grads):
        logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True)
        torch.autograd.backward([logp, entropy], list(grads))

    def inputs(n, vocab, width):
        hidden = torch.empty(n, width, dtype=dtype, device=device).normal_(0, width**-0.5)
        weight = torch.empty(vocab, width, dtype=dtype, device=device).normal_(0, width**-0.5)
        targets = torch.randint(0, vocab, (n,), device=device)
        grads = torch.randn(2, n, device=device)
        return hidden.requires_grad_(), weight.requires_grad_(), targets, grads

    torch.manual_seed(0)
    step(*inputs(8, 64, 8))
    hidden, weight, targets, grads = inputs(n, vocab, width)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(hidden, weight, targets, grads)
        torch.cuda.synchronize()
        peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        base = _rss_bytes("VmRSS")
        try:  # "5" resets the peak resident set (VmHWM) to the current one (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            method = "peak RSS (VmHWM)"
        except OSError:
            method = "ru_maxrss (peak since process start)"
        step(hidden, weight, targets, grads)
        if method.startswith("peak RSS"):
            peak = _rss_bytes("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    e = hidden.element_size()
    return {
        "growth": max(0, peak - base),
        "logits": n * vocab * e,
        "grads": (n + vocab) * width * e,
        "path": "triton" if use_triton(hidden) else "eager",
        "method": method,
    }


def measure_memory(
    n: int, vocab: int, width: int, dtype: torch.dtype, device: torch.device, env: dict
) -> dict:
    """One CSV row (mode ``memory``) from ``linear_step_memory``; on CPU in a fresh subprocess."""
    dtype_name = str(dtype).replace("torch.", "")
    if device.type == "cuda":
        res = linear_step_memory(n, vocab, width, dtype, device)
    else:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve().with_name("bench_kernels.py")),
            "--memory-child",
            f"{n},{vocab},{width},{dtype_name}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            raise RuntimeError(f"memory subprocess failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    from tritonrlhf.kernels.linear_logprobs import CHUNK_BYTES

    mb = 2**20
    row = dict(env, kernel="linear_logprobs", provider=res["path"], mode="memory", dtype=dtype_name)
    row.update(
        shape=f"N={n},V={vocab},H={width}",
        peak_mem_mb=fmt(res["growth"] / mb),
        logits_mb=fmt(res["logits"] / mb),
        mem_vs_logits=fmt(res["growth"] / res["logits"], 3),
        note=(
            f"{res['method']} growth over fwd+bwd with entropy; includes grad_hidden+grad_weight "
            f"{res['grads'] / mb:.0f} MB; CHUNK_BYTES {CHUNK_BYTES / mb:.0f} MB"
        ),
    )
    print(
        f"  linear_logprobs memory ({row['shape']}, {dtype_name}, {res['path']} path): peak growth "
        f"{row['peak_mem_mb']} MB = {row['mem_vs_logits']} x the full logits ({row['logits_mb']} MB)",
        flush=True,
    )
    return row
