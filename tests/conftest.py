"""Shared test configuration: the one tolerance table and fp64 comparison helpers.

Low-precision inputs are held to roughly the error eager PyTorch makes at the
same precision, both measured against a float64 formula.
"""

from __future__ import annotations

import os

import pytest
import torch

# dtype -> (atol, rtol) for an output that carries ``dtype``'s rounding, against the
# float64 formula fed the same (already rounded) inputs. Pick the row by the output's own
# precision, not the inputs': an fp32 output (log-probs, entropy, losses, KL, GAE) of bf16
# inputs differs from that formula only by fp32 arithmetic (~1e-6), so it takes the fp32 row;
# a kernel that accumulated in bf16 (~0.03 off on a log-prob near -7) must fail it. The bf16
# and fp16 rows are for outputs stored in that dtype (gradients) and for linear_logprobs,
# whose bf16 GEMM rounds the logits themselves to bf16 before the fp32 math.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}
# Where the Triton path runs, a kernel may be this much worse than eager PyTorch at the same
# precision. Never on the reference path: there the output is eager PyTorch itself.
EAGER_SLACK = 1.5
# fp32 bounds on |vLLM log-prob - trainer log-prob| after a weight swap. Both sides run the same
# fp32 weights through different kernels. GAP_TOL_FP32 bounds the end-to-end runs'
# ``rollout/logprob_gap`` (a per-step mean over the sampled tokens): measured 2.0-2.2e-7 (GRPO,
# tests/engine/rl/test_constraints.py, 2-core AMD EPYC) and 0.8-1.5e-7 in the families' PPO runs.
# A swap that missed one tensor shows far more: skipping only
# ``model.layers.0.input_layernorm.weight`` gave 3.2e-4 and 4.0e-4 on the swapped steps of that
# GRPO run, which the former bound (1e-3) let through. GAP_MAX_TOL_FP32 bounds a per-token maximum
# over one sequence (tests/engine/rl/test_weight_sync.py after an lr 2e-2 AdamW step, where the
# worst token was 4.8e-6 off; ``sync/probe_gap_max``). bf16 runs keep their own bound
# (``GAP_TOL_BF16`` in tests/engine/rl/test_bf16.py).
GAP_TOL_FP32 = 1e-5
GAP_MAX_TOL_FP32 = 5e-5
# An output computed from intermediates as large as ``scale`` (e.g. |logits| / T ~ 1e4) may be
# off by this many fp32 ulps of ``scale`` on top of the table (assert_close_fp64's ``scale``).
SCALE_ULPS = 4
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Every kernel test runs once per device here (tests/kernels/conftest.py parametrizes them).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def triton_runs(device: str | torch.device | None = None) -> bool:
    """Whether kernels on ``device`` (default: torch's default device, which the kernel
    tests set per parametrized device) run Triton: CUDA, or CPU under TRITON_INTERPRET=1."""
    device = torch.get_default_device() if device is None else torch.device(device)
    return device.type == "cuda" or INTERPRET


def check_launched(
    before: dict[str, int], names: tuple[str, ...], device=None, count: int | None = None
) -> None:
    """Assert each Triton kernel in ``names`` ran since ``before`` (a copy of LAUNCHES) where
    Triton runs on ``device`` (``count`` times, if given), and never ran elsewhere."""
    from tritonrlhf.kernels._dispatch import LAUNCHES

    for name in names:
        ran = LAUNCHES[name] - before.get(name, 0)
        if not triton_runs(device):
            assert ran == 0, f"{name} launched on the CPU reference path"
        elif count is None:
            assert ran > 0, f"Triton kernel {name} did not run"
        else:
            assert ran == count, f"Triton kernel {name} ran {ran} times, expected {count}"


def max_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """Max abs error of ``out`` against the float64 ``ref64``, ignoring matching infs."""
    out = out.double()
    both_inf = torch.isinf(out) & torch.isinf(ref64) & (torch.sign(out) == torch.sign(ref64))
    diff = (out - ref64).abs().masked_fill(both_inf, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def assert_close_fp64(
    out: torch.Tensor,
    ref64: torch.Tensor,
    dtype: torch.dtype | None = None,
    eager: torch.Tensor | None = None,
    name: str = "output",
    scale: float = 0.0,
) -> None:
    """Assert ``out`` matches the float64 formula ``ref64`` within the table.

    ``dtype`` picks the table row: the precision whose rounding ``out`` carries, by default
    ``out.dtype`` (pass gradients in their own dtype, not upcast). Name a lower precision only
    where the computation itself rounds to it (linear_logprobs' bf16/fp16 GEMM).
    ``eager`` (eager PyTorch at the same precision) widens the bound to EAGER_SLACK times
    eager's own error, but only where the Triton path ran on ``out``'s device: on the reference
    path ``out`` is that same eager computation, so such a bound could never fail.
    ``scale`` is the magnitude of the intermediate values (for example max |logits| / T), for
    outputs whose fp32 rounding error follows the inputs' size rather than their own: the
    bound grows by SCALE_ULPS fp32 ulps of it.
    """
    dtype = out.dtype if dtype is None else dtype
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    out64 = out.detach().double()
    assert not torch.isnan(out64).any() or torch.isnan(ref64).any(), f"{name}: unexpected NaN"
    atol, rtol = TOLERANCES[dtype]
    err = (out64 - ref64).abs()
    both_inf = torch.isinf(out64) & torch.isinf(ref64) & (torch.sign(out64) == torch.sign(ref64))
    err = err.masked_fill(both_inf | (torch.isnan(out64) & torch.isnan(ref64)), 0.0)
    bound = atol + rtol * ref64.abs().masked_fill(torch.isinf(ref64), 0.0)
    bound = bound + SCALE_ULPS * torch.finfo(torch.float32).eps * scale
    use_eager = eager is not None and triton_runs(out.device)
    if use_eager:
        bound = torch.maximum(bound, torch.full_like(bound, EAGER_SLACK * max_err(eager, ref64)))
    bad = ~(err <= bound)  # a NaN where ref64 has a number counts as off
    assert not bad.any(), (
        f"{name} (tolerance row {dtype}): {int(bad.sum())}/{bad.numel()} elements off; "
        f"max err {float(err.max()):.3e}" + (f", eager err {max_err(eager, ref64):.3e}" if use_eager else "")
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# In-process DeepSpeed tests set a world of one through these variables; a later
# test's subprocess that inherited them would think it was launched and try to
# bind the port this process still holds. Restore them after every test.
from tritonrlhf.engine.distributed import DIST_ENV_VARS  # noqa: E402

_SESSION_DIST_ENV = {k: os.environ.get(k) for k in DIST_ENV_VARS}


@pytest.fixture(autouse=True)
def _restore_dist_env():
    yield
    for key, value in _SESSION_DIST_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
