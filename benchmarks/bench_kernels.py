"""Benchmark the fused RLHF kernels against eager PyTorch, torch.compile and installed peers.

Usage::

    python benchmarks/bench_kernels.py                       # all kernels, default sizes
    python benchmarks/bench_kernels.py --kernels gae,kl_penalty --modes fwd --size small
    python benchmarks/bench_kernels.py --size tiny --providers eager   # seconds, on CPU
    python benchmarks/bench_kernels.py --kernels "" --memory --memory-shape 4096,151936,256 --dtype float32

Providers: ``eager`` (our PyTorch reference), ``compile`` (torch.compile of it), ``triton``
(our kernel; CUDA, or CPU under TRITON_INTERPRET=1), ``triton_unfused`` (for
``ppo_policy_loss_kl``: our ``ppo_policy_loss`` and ``kl_penalty`` kernels called one after the
other, plus a masked mean, against the fused ``kl=KLLossTerm(...)`` call), ``liger`` (Liger-Kernel cross-entropy
and fused linear cross-entropy) and ``flash_attn`` (flash-attn's Triton cross-entropy).
Peers compute mean cross-entropy (= -mean log-prob) rather than per-token log-probs: the
same memory traffic, close enough to compare bandwidth. A peer that is not importable, or
any provider that fails, gets a row whose note says why, and the run goes on.

Roofline columns. Each row counts the bytes (``gb``) and FLOPs (``gflop``) of the
operation; with the device's peaks (``PEAKS``, datasheet numbers) ``roofline_ms`` is
``max(bytes / HBM bandwidth, FLOPs / dense bf16 peak)``, ``bound`` names the larger
term and ``pct_roofline = 100 * roofline_ms / ms_p50``. Counts (N tokens, V vocab, H
hidden, e = input element size; small per-row terms left out here, kept in the code):

- logprobs_from_logits: fwd reads N*V*e logits; bwd reads N*V*e and writes N*V*e
  dlogits; full = fwd + bwd. FLOPs are negligible (memory bound).
- linear_logprobs (``linear_logprobs_cost``, the scheme of kernels/linear_logprobs.py):
  fwd = the chunk GEMMs (2NVH FLOPs; hidden read once, the weight once per row chunk,
  logits written) plus the log-prob kernel reading the logits; bwd = per vocabulary
  block, one GEMM over all N rows recomputing its logits, the kernel turning them into
  dlogits in place, grad_weight[block] = dlogits.T @ hidden written once, and
  grad_hidden += dlogits @ weight[block] into an fp32 [N, H] accumulator: 6NVH FLOPs
  (recompute included: it is work this scheme does); per block the hidden states are
  read twice and the fp32 accumulator read and written once; over the whole vocabulary
  the weight is read twice, grad_weight written once and N*V*e of logits moved five
  times. full = fwd + bwd (8NVH). Other providers are held to the same counts, so their
  pct_roofline reads as speed relative to our scheme's roofline.
- kl_penalty (k3): fwd reads 2Ne, writes 4N; bwd reads 4N + 2Ne, writes 2Ne.
- ppo_policy_loss / ppo_value_loss: fwd reads 3Ne + N (bool mask); bwd reads the same and
  writes Ne (per-block partials are negligible).
- ppo_policy_loss_kl (the loss with GRPO's fused k3 term): fwd reads 4Ne + N; bwd the same and
  writes Ne. The unfused pair reads logp twice and writes and re-reads an N-sized fp32 KL.
- ppo_policy_loss_gspo (GSPO's sequence ratio, seq_mean_token_mean): the PPO loss's traffic plus
  the pre-pass computing each sequence's mean log-ratio (reads 2Ne + N again); the backward
  reads the S saved log-ratios. ppo_policy_loss_cispo (CISPO): the PPO loss's traffic.
- gae: reads 2Ne + N (bool mask), writes 8N (advantages and returns, fp32); fwd only.

``--memory`` adds one row (mode ``memory``): the peak memory growth of one
``linear_logprobs`` forward + backward with entropy, against the size of the full
[N, V] logits (``logits_mb``, ``mem_vs_logits``). On CUDA it is
``torch.cuda.max_memory_allocated`` over the step; on CPU a fresh subprocess reads the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs just before the
step; ru_maxrss where that is not possible). The growth includes the two gradients
(named in the note).

Rows are appended, kernel by kernel, to a CSV (default ``benchmarks/results/kernels.csv``)
with the device, versions and git SHA. Targets are only evaluated for the triton provider
on CUDA at the default size. The script imports only torch, triton, ``kernels`` and the
``benchmarks`` helpers (no engine module), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import fmt, run_env  # noqa: E402
from benchmarks._kernel_memory import linear_step_memory, measure_memory  # noqa: E402

KERNELS = [
    "logprobs_from_logits",
    "linear_logprobs",
    "kl_penalty",
    "ppo_policy_loss",
    "ppo_policy_loss_kl",
    "ppo_policy_loss_gspo",
    "ppo_policy_loss_cispo",
    "ppo_value_loss",
    "gae",
]
MODES = ["fwd", "bwd", "full"]
PROVIDERS = ["eager", "compile", "triton", "triton_unfused", "liger", "flash_attn"]
SIZES = {
    "default": dict(N=16384, V=151936, H=4096, tokens=4_194_304, seq=1024, gae=(512, 8192)),
    "small": dict(N=2048, V=32768, H=1024, tokens=262_144, seq=1024, gae=(64, 2048)),
    "tiny": dict(N=64, V=1000, H=64, tokens=4096, seq=256, gae=(4, 128)),
    "micro": dict(N=8, V=300, H=16, tokens=1024, seq=128, gae=(2, 64)),  # scripts/gpu_check.sh --dry-run
}
# device-name substring -> (HBM GB/s, dense bf16 TFLOP/s)
PEAKS = {"H200": (4800.0, 989.0), "H100": (3350.0, 989.0), "A100": (2039.0, 312.0)}
# (kernel, mode) -> (kind, bound): "ms" means time <= bound, "tflops" means TFLOP/s >= bound.
TARGETS = {
    ("logprobs_from_logits", "fwd"): ("ms", 1.75),
    ("logprobs_from_logits", "full"): ("ms", 5.5),
    ("linear_logprobs", "fwd"): ("tflops", 550.0),
    ("kl_penalty", "fwd"): ("ms", 0.060),
    ("kl_penalty", "bwd"): ("ms", 0.060),
    ("ppo_policy_loss", "fwd"): ("ms", 0.060),
    ("ppo_policy_loss", "bwd"): ("ms", 0.060),
    ("ppo_value_loss", "fwd"): ("ms", 0.060),
    ("ppo_value_loss", "bwd"): ("ms", 0.060),
    ("gae", "fwd"): ("ms", 0.050),
}
COLUMNS = [
    "timestamp", "device", "torch", "triton", "python", "git_sha", "kernel", "provider", "mode",
    "shape", "dtype", "ms_p50", "ms_p20", "ms_p80", "gb", "gflop", "gbps", "tflops", "bound",
    "roofline_ms", "pct_roofline", "peak_mem_mb", "logits_mb", "mem_vs_logits", "target",
    "target_met", "note",
]  # fmt: skip


@dataclass
class Case:
    """One kernel at one size: inputs, the functions per provider and the cost model."""

    shape: str
    inputs: tuple
    grad_inputs: list[torch.Tensor]
    fns: dict[str, Callable]
    bytes: dict[str, float] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)
    differentiable: bool = True
    notes: dict[str, str] = field(default_factory=dict)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------- peers
def _liger_ce():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    loss = LigerCrossEntropyLoss()
    return lambda logits, targets, *_: loss(logits, targets)


def _liger_flce():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda hidden, weight, targets, *_: loss(weight, hidden, targets)


def _flash_ce():
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    return lambda logits, targets, *_: _first(cross_entropy_loss(logits, targets)).mean()


# --------------------------------------------------------------------------- cost models
def linear_logprobs_cost(N: int, V: int, H: int, e: int) -> dict[str, tuple[float, float]]:
    """``{mode: (bytes, flops)}`` of ``linear_logprobs``'s Triton path as the benchmark runs it
    (log-probs only, one upstream gradient): row chunks forward, vocabulary blocks backward,
    sized by the kernels' own ``chunk_rows`` / ``vocab_block_cols``."""
    from tritonrlhf.kernels.linear_logprobs import chunk_rows, vocab_block_cols

    logits, hid, wgt = N * V * e, N * H * e, V * H * e
    chunks = math.ceil(N / chunk_rows(N, V, e))
    blocks = math.ceil(V / vocab_block_cols(N, V, e))
    row_io = N * (8 + 3 * 4)  # targets (int64) + logp, row max, log-sum (fp32)
    fwd = (hid + chunks * wgt + logits) + (logits + row_io)  # chunk GEMMs, then the kernel
    bwd = blocks * hid + wgt + logits  # recompute each block's logits over all N rows
    bwd += 2 * logits + blocks * row_io  # kernel: dlogits in place; targets, stats, upstream grad
    bwd += logits + blocks * hid + wgt  # grad_weight[block] = dlogits.T @ hidden, written once
    bwd += logits + wgt + blocks * 2 * N * H * 4  # grad_hidden += dlogits @ w_block (fp32 acc)
    bwd += N * H * (4 + e)  # the accumulator cast to the hidden dtype
    flops = 2.0 * N * V * H
    return {"fwd": (fwd, flops), "bwd": (bwd, 3 * flops), "full": (fwd + bwd, 4 * flops)}


# --------------------------------------------------------------------------- cases
def make_case(kernel: str, size: dict, dtype: torch.dtype, device: torch.device) -> Case:
    import tritonrlhf.kernels as K

    e = torch.tensor([], dtype=dtype).element_size()
    if kernel in ("logprobs_from_logits", "linear_logprobs"):
        N, V, H = size["N"], size["V"], size["H"]
        targets = torch.randint(0, V, (N,), device=device)
        if kernel == "logprobs_from_logits":
            logits = torch.randn(N, V, device=device, dtype=dtype).requires_grad_()
            fwd_b, bwd_b = N * V * e + 12 * N, 2 * N * V * e + 4 * N
            case = Case(
                f"N={N},V={V}", (logits, targets), [logits],
                {"eager": K.logprobs_from_logits_reference, "triton": K.logprobs_from_logits,
                 "liger": _liger_ce, "flash_attn": _flash_ce},
                bytes={"fwd": fwd_b, "bwd": bwd_b, "full": fwd_b + bwd_b},
            )  # fmt: skip
            case.notes["liger"] = case.notes["flash_attn"] = "peer computes mean CE = -mean(logp)"
            return case
        hidden = (torch.randn(N, H, device=device, dtype=dtype) * H**-0.5).requires_grad_()
        weight = (torch.randn(V, H, device=device, dtype=dtype) * H**-0.5).requires_grad_()
        cost = linear_logprobs_cost(N, V, H, e)
        case = Case(
            f"N={N},V={V},H={H}", (hidden, weight, targets), [hidden, weight],
            {"eager": K.linear_logprobs_reference, "triton": K.linear_logprobs, "liger": _liger_flce},
            bytes={m: b for m, (b, _) in cost.items()}, flops={m: f for m, (_, f) in cost.items()},
        )  # fmt: skip
        case.notes["liger"] = "peer computes mean CE = -mean(logp); roofline counts our scheme's work"
        return case
    if kernel == "gae":
        B, T = size["gae"]
        rewards = torch.randn(B, T, device=device, dtype=dtype)
        values = torch.randn(B, T, device=device, dtype=dtype)
        mask = torch.ones(B, T, device=device, dtype=torch.bool)
        mask[:, T - T // 8 :] = False
        return Case(
            f"B={B},T={T}", (rewards, values, mask, 1.0, 0.95), [],
            {"eager": K.gae_reference, "triton": K.gae},
            bytes={"fwd": B * T * (2 * e + 1 + 8)}, differentiable=False,
        )  # fmt: skip
    n, T = size["tokens"], size["seq"]
    shape = (n // T, T)
    if kernel == "kl_penalty":
        logp = (-3 * torch.rand(n, device=device)).to(dtype).requires_grad_()
        ref = (-3 * torch.rand(n, device=device)).to(dtype)
        return Case(
            f"N={n},kind=k3", (logp, ref, "k3"), [logp],
            {"eager": K.kl_penalty_reference, "triton": K.kl_penalty},
            bytes={"fwd": n * (2 * e + 4), "bwd": n * (4 + 3 * e), "full": n * (8 + 5 * e)},
        )  # fmt: skip
    x = (-2 * torch.rand(shape, device=device)).to(dtype).requires_grad_()
    old = (x.detach().float() + 0.2 * torch.randn(shape, device=device)).to(dtype)
    y = torch.randn(shape, device=device).to(dtype)
    mask = torch.rand(shape, device=device) > 0.1
    fwd_b = n * (3 * e + 1)
    bytes_ = {"fwd": fwd_b, "bwd": fwd_b + n * e, "full": 2 * fwd_b + n * e}
    if kernel == "ppo_policy_loss":
        fns = {"eager": K.ppo_policy_loss_reference, "triton": K.ppo_policy_loss}
        return Case(f"S={shape[0]},T={T}", (x, old, y, mask), [x], fns, bytes=bytes_)
    if kernel in ("ppo_policy_loss_gspo", "ppo_policy_loss_cispo"):
        kind = kernel.rsplit("_", 1)[1]
        # GSPO's own clip range and per-sequence loss; CISPO with no lower bound (MiniMax-M1).
        opts = (
            dict(clip_low=3e-4, clip_high=4e-4, reduction="seq_mean_token_mean")
            if kind == "gspo"
            else dict(clip_low=1.0, clip_high=0.28)
        )
        fns = {
            "eager": lambda *a: K.ppo_policy_loss_reference(*a, loss_type=kind, **opts),
            "triton": lambda *a: K.ppo_policy_loss(*a, loss_type=kind, **opts),
        }
        extra = n * (2 * e + 1) if kind == "gspo" else 0
        b = {"fwd": fwd_b + extra, "bwd": fwd_b + n * e, "full": 2 * fwd_b + n * e + extra}
        return Case(f"S={shape[0]},T={T},{kind}", (x, old, y, mask), [x], fns, bytes=b)
    if kernel == "ppo_value_loss":
        fns = {"eager": K.ppo_value_loss_reference, "triton": K.ppo_value_loss}
        return Case(f"S={shape[0]},T={T}", (x, old, y, mask), [x], fns, bytes=bytes_)
    if kernel == "ppo_policy_loss_kl":
        ref = (x.detach().float() + 0.3 * torch.randn(shape, device=device)).to(dtype)
        kl = K.KLLossTerm(ref, 0.04, "k3")
        fwd_b = n * (4 * e + 1)
        fns = {
            "eager": lambda *a: K.ppo_policy_loss_reference(*a[:4], kl=a[4]),
            "triton": lambda *a: K.ppo_policy_loss(*a[:4], kl=a[4]),
            "triton_unfused": _unfused_policy_kl,
        }
        return Case(
            f"S={shape[0]},T={T},k3",
            (x, old, y, mask, kl),
            [x],
            fns,
            bytes={"fwd": fwd_b, "bwd": fwd_b + n * e, "full": 2 * fwd_b + n * e},
        )
    raise ValueError(f"unknown kernel {kernel!r}; choose from {KERNELS}")


def _unfused_policy_kl(logp, old, adv, mask, kl):
    """The policy loss and the KL term as two separate kernels (what ``kl=`` fuses), token mean."""
    import tritonrlhf.kernels as K

    loss, _ = K.ppo_policy_loss(logp, old, adv, mask)
    m = mask.float()
    kl_mean = (K.kl_penalty(logp, kl.ref_logp, kl.kind) * m).sum() / m.sum().clamp_min(1)
    return loss + kl.coef * kl_mean


# --------------------------------------------------------------------------- timing
CPU_BUDGET_S = 0.5  # timing budget per CPU row (at least 3 timed calls); --cpu-budget-s


def _time_cpu(fn: Callable, grad_inputs: list[torch.Tensor], max_reps: int = 50):
    for t in grad_inputs:
        t.grad = None
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < CPU_BUDGET_S):
        for t in grad_inputs:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return [float(v) for v in q]


def _time(fn: Callable, grad_inputs: list[torch.Tensor], device: torch.device):
    """(p50, p20, p80) ms and peak-memory delta MB (CUDA only)."""
    if device.type != "cuda":
        return _time_cpu(fn, grad_inputs), None
    import triton.testing

    for t in grad_inputs:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    q = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_inputs or None)
    return [float(v) for v in q], peak


def _runner(fn: Callable, case: Case, mode: str) -> Callable:
    if mode == "fwd":
        return lambda: fn(*case.inputs)
    out = _first(fn(*case.inputs))
    grad = torch.randn_like(out)
    if mode == "bwd":
        return lambda: out.backward(grad, retain_graph=True)
    return lambda: _first(fn(*case.inputs)).backward(grad)


def _provider_fn(
    provider: str, case: Case, device: torch.device, compile_backend: str = "inductor"
) -> tuple[Callable | None, str]:
    from tritonrlhf.kernels._dispatch import use_triton

    if provider not in case.fns and provider != "compile":
        return None, ""
    if provider == "eager":
        return case.fns["eager"], ""
    if provider == "compile":
        note = "" if compile_backend == "inductor" else f"torch.compile backend={compile_backend}"
        return torch.compile(case.fns["eager"], backend=compile_backend), note
    if provider in ("triton", "triton_unfused"):
        probe = next(t for t in case.inputs if isinstance(t, torch.Tensor))
        if not use_triton(probe):
            return None, "skipped: Triton needs CUDA or TRITON_INTERPRET=1"
        return case.fns[provider], ""
    try:  # peers are optional: import first, so a missing one is named even on CPU
        fn = case.fns[provider]()
    except Exception as exc:
        return None, f"skipped: {provider} unavailable ({type(exc).__name__}: {exc})".splitlines()[0][:200]
    if device.type != "cuda":
        return None, f"skipped: {provider} needs CUDA"
    return fn, case.notes.get(provider, "")


# --------------------------------------------------------------------------- run
@dataclass
class Options:
    """What one benchmark run covers (the command line, parsed)."""

    kernels: list[str]
    modes: list[str]
    size: str
    providers: list[str]
    dtype: torch.dtype
    device: torch.device
    compile_backend: str = "inductor"
    out: Path | None = None  # rows are appended here kernel by kernel, so a killed run keeps them
    peaks: tuple[float, float] | None = None  # (HBM GB/s, TFLOP/s) instead of PEAKS' entry


def bench(opts: Options) -> list[dict]:
    device = opts.device
    env = run_env(device)
    peaks = opts.peaks or _peaks(env["device"], device)
    rows = []
    for kernel in opts.kernels:
        torch.manual_seed(0)
        case = make_case(kernel, SIZES[opts.size], opts.dtype, device)
        kernel_rows = []
        for provider in opts.providers:
            try:
                fn, note = _provider_fn(provider, case, device, opts.compile_backend)
            except Exception as exc:
                fn, note = None, f"skipped: {type(exc).__name__}: {exc}".splitlines()[0][:200]
            if fn is None and not note:
                continue  # no such peer for this kernel
            for mode in opts.modes:
                row = dict(env, kernel=kernel, provider=provider, mode=mode, shape=case.shape)
                row.update(dtype=str(opts.dtype).replace("torch.", ""), note=note)
                _add_counts(row, case, mode, peaks)
                if mode != "fwd" and not case.differentiable:
                    row["note"] = "skipped: not differentiable"
                elif fn is not None:
                    try:
                        (p50, p20, p80), peak = _time(_runner(fn, case, mode), case.grad_inputs, device)
                    except Exception as exc:  # e.g. torch.compile without a C++ toolchain
                        row["note"] = f"skipped: {type(exc).__name__}: {exc}".splitlines()[0][:200]
                    else:
                        row.update(ms_p50=fmt(p50), ms_p20=fmt(p20), ms_p80=fmt(p80), peak_mem_mb=fmt(peak))
                        _add_rates(row, case, mode, p50, peaks, device, opts.size)
                kernel_rows.append(row)
                print(
                    f"  {kernel:22s} {provider:10s} {mode:4s} {row.get('ms_p50', '-'):>10s} ms"
                    f" {row.get('pct_roofline', '') or '-':>6s}% roofline  {row['note']}",
                    flush=True,
                )
        del case
        if opts.out is not None:
            write_csv(kernel_rows, opts.out)
        rows += kernel_rows
    return rows


def _peaks(device_name: str, device: torch.device) -> tuple[float, float] | None:
    if device.type != "cuda":
        return None
    return next((v for k, v in PEAKS.items() if k in device_name), None)


def _add_counts(row: dict, case: Case, mode: str, peaks) -> None:
    """The cost model's bytes and FLOPs for ``mode`` and, with known peaks, the roofline time."""
    nbytes, flops = case.bytes.get(mode), case.flops.get(mode)
    row["gb"] = fmt(None if nbytes is None else nbytes / 1e9)
    row["gflop"] = fmt(None if flops is None else flops / 1e9)
    terms = {}
    if nbytes is not None:
        terms["hbm"] = nbytes / (peaks[0] * 1e9) if peaks else None
    if flops is not None:
        terms["flop"] = flops / (peaks[1] * 1e12) if peaks else None
    if peaks and terms:
        bound = max(terms, key=terms.get)
        row["bound"], row["roofline_ms"] = bound, fmt(terms[bound] * 1e3)
    elif len(terms) == 1:
        row["bound"] = next(iter(terms))


def _add_rates(row: dict, case: Case, mode: str, ms: float, peaks, device: torch.device, size: str) -> None:
    if mode in case.bytes:
        row["gbps"] = fmt(case.bytes[mode] / (ms * 1e-3) / 1e9)
    if mode in case.flops:
        row["tflops"] = fmt(case.flops[mode] / (ms * 1e-3) / 1e12)
    if row.get("roofline_ms"):
        row["pct_roofline"] = fmt(100 * float(row["roofline_ms"]) / ms, 3)
    target = TARGETS.get((row["kernel"], mode))
    if target and device.type == "cuda" and size == "default" and row["provider"] == "triton":
        kind, bound = target
        if kind == "ms":
            row["target"], row["target_met"] = f"<={bound}ms", str(ms <= bound)
        else:
            tflops = case.flops[mode] / (ms * 1e-3) / 1e12
            row["target"], row["target_met"] = f">={bound}TFLOP/s", str(tflops >= bound)


def write_csv(rows: list[dict], path: Path) -> None:
    from benchmarks._common import append_rows

    append_rows(path, rows, COLUMNS)


def print_table(rows: list[dict]) -> None:
    cols = ["kernel", "provider", "mode", "shape", "ms_p50", "ms_p20", "ms_p80", "gbps", "tflops", "bound"]
    cols += ["pct_roofline", "peak_mem_mb", "mem_vs_logits", "target_met", "note"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    widths["note"] = min(widths["note"], 60)
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, ""))[: widths[c]].ljust(widths[c]) for c in cols))


def _shape3(text: str) -> tuple[int, int, int]:
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected N,V,H (three positive integers), got {text!r}")
    return parts[0], parts[1], parts[2]


def _peaks_arg(text: str) -> tuple[float, float]:
    parts = [float(v) for v in text.split(",")]
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected GBPS,TFLOPS (two positive numbers), got {text!r}")
    return parts[0], parts[1]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kernels", default=",".join(KERNELS), help=f"comma list from {KERNELS} ('' for none)"
    )
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of fwd,bwd,full")
    parser.add_argument("--size", default="default", choices=sorted(SIZES))
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list from {PROVIDERS}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if present"
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of the compile provider"
    )
    parser.add_argument("--memory", action="store_true", help="add the linear_logprobs peak-memory row")
    parser.add_argument("--memory-shape", type=_shape3, help="N,V,H of the memory row (default: the size's)")
    parser.add_argument(
        "--peaks", type=_peaks_arg, help="GBPS,TFLOPS roofline peaks for a device PEAKS lacks (or a dry run)"
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)  # N,V,H,dtype: measure, print JSON
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels.csv"))
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--cpu-budget-s", type=float, default=0.5, help="timing budget per CPU row")
    args = parser.parse_args(argv)
    global CPU_BUDGET_S
    CPU_BUDGET_S = args.cpu_budget_s
    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    if args.memory_child:
        n, vocab, width, dtype_name = args.memory_child.split(",")
        res = linear_step_memory(
            int(n), int(vocab), int(width), getattr(torch, dtype_name), torch.device("cpu")
        )
        print(json.dumps(res))
        return []
    split = {
        name: [v for v in getattr(args, name).split(",") if v] for name in ("kernels", "modes", "providers")
    }
    for name, allowed in (("kernels", KERNELS), ("modes", MODES), ("providers", PROVIDERS)):
        bad = sorted(set(split[name]) - set(allowed))
        if bad:
            parser.error(f"unknown {name} {bad}; choose from {allowed}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    if os.environ.get("TRITON_INTERPRET") == "1" and args.size == "default":
        print("note: TRITON_INTERPRET=1 with --size default will be very slow", file=sys.stderr)
    dtype, out = getattr(torch, args.dtype), Path(args.out)
    opts = Options(split["kernels"], split["modes"], args.size, split["providers"], dtype, device)
    opts.compile_backend, opts.out, opts.peaks = args.compile_backend, out, args.peaks
    rows = bench(opts)
    if args.memory:
        size = SIZES[args.size]
        n, vocab, width = args.memory_shape or (size["N"], size["V"], size["H"])
        try:
            mem_rows = [measure_memory(n, vocab, width, dtype, device, run_env(device))]
        except Exception as exc:  # one failed measurement must not lose the timing rows
            row = dict(
                run_env(device), kernel="linear_logprobs", mode="memory", shape=f"N={n},V={vocab},H={width}"
            )
            row["note"] = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            mem_rows = [row]
            print(f"  linear_logprobs memory {row['note']}", flush=True)
        write_csv(mem_rows, out)
        rows += mem_rows
    if rows:
        print_table(rows)
    print(f"appended {len(rows)} rows to {out}")
    return rows


if __name__ == "__main__":
    main()
