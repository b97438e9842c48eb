"""Shared test configuration: the one tolerance table and fp64 comparison helpers.

Low-precision inputs are held to roughly the error eager PyTorch makes at the
same precision, both measured against a float64 formula.
"""

from __future__ import annotations

import os

import pytest
import torch

# dtype -> (atol, rtol) for comparing an fp32 output against the float64 formula.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}
# A kernel may be this much worse than eager PyTorch at the same precision.
EAGER_SLACK = 1.5
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
    dtype: torch.dtype,
    eager: torch.Tensor | None = None,
    name: str = "output",
) -> None:
    """Assert ``out`` matches the float64 formula within the table for ``dtype``.

    If ``eager`` (eager PyTorch at the same precision) is given, the kernel may
    also be up to EAGER_SLACK times eager's own error, whichever is larger.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any() or torch.isnan(ref64).any(), f"{name}: unexpected NaN"
    atol, rtol = TOLERANCES[dtype]
    err = (out.double() - ref64).abs()
    both_inf = (
        torch.isinf(out.double()) & torch.isinf(ref64) & (torch.sign(out.double()) == torch.sign(ref64))
    )
    err = err.masked_fill(both_inf, 0.0)
    bound = atol + rtol * ref64.abs().masked_fill(torch.isinf(ref64), 0.0)
    if eager is not None:
        eager_err = max_err(eager, ref64)
        bound = torch.maximum(bound, torch.full_like(bound, EAGER_SLACK * eager_err))
    bad = err > bound
    assert not bad.any(), (
        f"{name} ({dtype}): {int(bad.sum())}/{bad.numel()} elements off; max err {float(err.max()):.3e}"
        + (f", eager err {max_err(eager, ref64):.3e}" if eager is not None else "")
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
