"""Benchmark the fused RLHF kernels against eager PyTorch, torch.compile and installed peers.

Usage::

    python benchmarks/bench_kernels.py                       # all kernels, default sizes
    python benchmarks/bench_kernels.py --kernels gae,kl_penalty --modes fwd --size small
    python benchmarks/bench_kernels.py --size tiny --providers eager   # seconds, on CPU

Providers: ``eager`` (our PyTorch reference), ``compile`` (torch.compile of it), ``triton``
(our kernel; CUDA, or CPU under TRITON_INTERPRET=1), ``triton_unfused`` (for
``ppo_policy_loss_kl``: our ``ppo_policy_loss`` and ``kl_penalty`` kernels called one after the
other, plus a masked mean, against the fused ``kl=KLLossTerm(...)`` call), ``liger`` (Liger-Kernel cross-entropy
and fused linear cross-entropy) and ``flash_attn`` (flash-attn's Triton cross-entropy).
Peers compute mean cross-entropy (= -mean log-prob) rather than per-token log-probs: the
same memory traffic, close enough to compare bandwidth.

Byte / FLOP models (N tokens, V vocab, H hidden, e = input element size):

- logprobs_from_logits: fwd reads N*V*e logits (+ 8N targets, 4N out); bwd reads N*V*e and
  writes N*V*e (+ 4N grad in); full = fwd + bwd.
- linear_logprobs: FLOPs fwd 2NVH (the logits GEMM), bwd 4NVH (grad hidden + grad weight;
  recomputing the logits adds 2NVH of real work, not counted), full 6NVH.
- kl_penalty (k3): fwd reads 2Ne, writes 4N; bwd reads 4N + 2Ne, writes 2Ne.
- ppo_policy_loss / ppo_value_loss: fwd reads 3Ne + N (bool mask); bwd reads the same and
  writes Ne (per-block partials are negligible).
- ppo_policy_loss_kl (the loss with GRPO's fused k3 term): fwd reads 4Ne + N; bwd the same and
  writes Ne. The unfused pair reads logp twice and writes and re-reads an N-sized fp32 KL.
- gae: reads 2Ne + N (bool mask), writes 8N (advantages and returns, fp32); fwd only.

Rows are appended to a CSV (default ``benchmarks/results/kernels.csv``) with the device,
versions and git SHA. Targets are only evaluated for the triton provider on CUDA at the
default size.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KERNELS = [
    "logprobs_from_logits",
    "linear_logprobs",
    "kl_penalty",
    "ppo_policy_loss",
    "ppo_policy_loss_kl",
    "ppo_value_loss",
    "gae",
]
MODES = ["fwd", "bwd", "full"]
PROVIDERS = ["eager", "compile", "triton", "triton_unfused", "liger", "flash_attn"]
SIZES = {
    "default": dict(N=16384, V=151936, H=4096, tokens=4_194_304, seq=1024, gae=(512, 8192)),
    "small": dict(N=2048, V=32768, H=1024, tokens=262_144, seq=1024, gae=(64, 2048)),
    "tiny": dict(N=64, V=1000, H=64, tokens=4096, seq=256, gae=(4, 128)),
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
    "shape", "dtype", "ms_p50", "ms_p20", "ms_p80", "gbps", "tflops", "pct_peak", "peak_mem_mb",
    "target", "target_met", "note",
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


# --------------------------------------------------------------------------- cases
def make_case(kernel: str, size: dict, dtype: torch.dtype, device: torch.device) -> Case:
    import kernels as K

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
        case = Case(
            f"N={N},V={V},H={H}", (hidden, weight, targets), [hidden, weight],
            {"eager": K.linear_logprobs_reference, "triton": K.linear_logprobs, "liger": _liger_flce},
            flops={"fwd": 2.0 * N * V * H, "bwd": 4.0 * N * V * H, "full": 6.0 * N * V * H},
        )  # fmt: skip
        case.notes["liger"] = "peer computes mean CE = -mean(logp)"
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
    import kernels as K

    loss, _ = K.ppo_policy_loss(logp, old, adv, mask)
    m = mask.float()
    kl_mean = (K.kl_penalty(logp, kl.ref_logp, kl.kind) * m).sum() / m.sum().clamp_min(1)
    return loss + kl.coef * kl_mean


# --------------------------------------------------------------------------- timing
def _time_cpu(fn: Callable, grad_inputs: list[torch.Tensor], budget_s: float = 0.5, max_reps: int = 50):
    for t in grad_inputs:
        t.grad = None
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < budget_s):
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


def _provider_fn(provider: str, case: Case, device: torch.device) -> tuple[Callable | None, str]:
    from kernels._dispatch import use_triton

    if provider not in case.fns and provider != "compile":
        return None, ""
    if provider == "eager":
        return case.fns["eager"], ""
    if provider == "compile":
        return torch.compile(case.fns["eager"]), ""
    if provider in ("triton", "triton_unfused"):
        probe = next(t for t in case.inputs if isinstance(t, torch.Tensor))
        if not use_triton(probe):
            return None, "skipped: Triton needs CUDA or TRITON_INTERPRET=1"
        return case.fns[provider], ""
    if device.type != "cuda":
        return None, f"skipped: {provider} needs CUDA"
    try:
        return case.fns[provider](), case.notes.get(provider, "")
    except Exception as exc:  # peers are optional
        return None, f"skipped: {provider} unavailable ({type(exc).__name__}: {exc})"[:200]


# --------------------------------------------------------------------------- reporting
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except OSError:
        return ""


def _env(device: torch.device) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_sha": _git_sha(),
    }


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}g}"


def bench(
    kernels: list[str], modes: list[str], size: str, providers: list[str], dtype: torch.dtype
) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = _env(device)
    peaks = next((v for k, v in PEAKS.items() if k in env["device"]), None) if device.type == "cuda" else None
    rows = []
    for kernel in kernels:
        torch.manual_seed(0)
        case = make_case(kernel, SIZES[size], dtype, device)
        for provider in providers:
            try:
                fn, note = _provider_fn(provider, case, device)
            except Exception as exc:
                fn, note = None, f"skipped: {type(exc).__name__}: {exc}"[:200]
            if fn is None and not note:
                continue  # no such peer for this kernel
            for mode in modes:
                row = dict(env, kernel=kernel, provider=provider, mode=mode, shape=case.shape)
                row.update(dtype=str(dtype).replace("torch.", ""), note=note)
                if mode != "fwd" and not case.differentiable:
                    row["note"] = "skipped: not differentiable"
                elif fn is not None:
                    try:
                        (p50, p20, p80), peak = _time(_runner(fn, case, mode), case.grad_inputs, device)
                    except Exception as exc:  # e.g. torch.compile without a C++ toolchain
                        row["note"] = f"skipped: {type(exc).__name__}: {exc}".splitlines()[0][:200]
                    else:
                        row.update(
                            ms_p50=_fmt(p50), ms_p20=_fmt(p20), ms_p80=_fmt(p80), peak_mem_mb=_fmt(peak)
                        )
                        _add_rates(row, case, mode, p50, peaks, device, size)
                rows.append(row)
                print(
                    f"  {kernel:22s} {provider:10s} {mode:4s} {row.get('ms_p50', '-'):>10s} ms  {row['note']}"
                )
    return rows


def _add_rates(row: dict, case: Case, mode: str, ms: float, peaks, device: torch.device, size: str) -> None:
    rate = None
    if mode in case.bytes:
        gbps = case.bytes[mode] / (ms * 1e-3) / 1e9
        row["gbps"] = _fmt(gbps)
        rate = gbps / peaks[0] if peaks else None
    if mode in case.flops:
        tflops = case.flops[mode] / (ms * 1e-3) / 1e12
        row["tflops"] = _fmt(tflops)
        rate = tflops / peaks[1] if peaks else None
    row["pct_peak"] = _fmt(None if rate is None else 100 * rate, 3)
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
    cols = ["kernel", "provider", "mode", "shape", "ms_p50", "ms_p20", "ms_p80", "gbps", "tflops", "pct_peak"]
    cols += ["peak_mem_mb", "target_met", "note"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    widths["note"] = min(widths["note"], 60)
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, ""))[: widths[c]].ljust(widths[c]) for c in cols))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list from {KERNELS}")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of fwd,bwd,full")
    parser.add_argument("--size", default="default", choices=sorted(SIZES))
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list from {PROVIDERS}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels.csv"))
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args(argv)
    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    split = {
        name: [v for v in getattr(args, name).split(",") if v] for name in ("kernels", "modes", "providers")
    }
    for name, allowed in (("kernels", KERNELS), ("modes", MODES), ("providers", PROVIDERS)):
        bad = sorted(set(split[name]) - set(allowed))
        if bad:
            parser.error(f"unknown {name} {bad}; choose from {allowed}")
    if os.environ.get("TRITON_INTERPRET") == "1" and args.size == "default":
        print("note: TRITON_INTERPRET=1 with --size default will be very slow", file=sys.stderr)
    rows = bench(split["kernels"], split["modes"], args.size, split["providers"], getattr(torch, args.dtype))
    write_csv(rows, Path(args.out))
    print_table(rows)
    print(f"appended {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    main()
