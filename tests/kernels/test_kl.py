"""kl_penalty: forward and backward against float64 formulas, dispatch, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import DTYPES, TOLERANCES, assert_close_fp64, check_launched
from tritonrlhf.kernels import kl_penalty, kl_penalty_reference
from tritonrlhf.kernels._dispatch import LAUNCHES

SHAPES = [(37,), (3, 41), (2, 3, 17)]


def _formula64(logp: torch.Tensor, ref: torch.Tensor, g: torch.Tensor, kind: str, clamp: float = 10.0):
    """(kl, dkl/dlogp * g, dkl/dref * g) in float64, written out by hand (k3: r clamped to
    [-clamp, clamp], gradient 0 outside)."""
    lp, rf, g = logp.double(), ref.double(), g.double()
    d = lp - rf
    if kind == "k1":
        return d, g, -g
    if kind == "k2":
        return 0.5 * d * d, g * d, -g * d
    r = rf - lp
    inside = r.abs() <= clamp
    r = r.clamp(-clamp, clamp)
    dref = torch.where(inside, g * torch.expm1(r), 0.0)
    return torch.expm1(r) - r, -dref, dref


def _eager(logp: torch.Tensor, ref: torch.Tensor, g: torch.Tensor, kind: str):
    """kl_penalty_reference (eager PyTorch, fp32 math like the kernel) and its input gradients."""
    lp, rf = logp.detach().requires_grad_(), ref.detach().requires_grad_()
    out = kl_penalty_reference(lp, rf, kind)
    out.backward(g)
    return out.detach(), lp.grad, rf.grad


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_penalty_matches_fp64(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    logp = (-3.0 * torch.rand(shape)).to(dtype)
    ref = (logp.float() + 0.7 * torch.randn(shape)).to(dtype)
    a, b = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    before = dict(LAUNCHES)
    out = kl_penalty(a, b, kind)
    check_launched(before, ("kl_fwd",))
    assert out.dtype == torch.float32 and out.shape == shape
    g = torch.randn(shape)
    out.backward(g)
    check_launched(before, ("kl_bwd",))
    want, want_da, want_db = _formula64(logp, ref, g, kind)
    eager = _eager(logp, ref, g, kind)
    assert_close_fp64(out, want, eager=eager[0], name=f"{kind} forward")
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    assert_close_fp64(a.grad, want_da, eager=eager[1], name=f"{kind} grad logp")
    assert_close_fp64(b.grad, want_db, eager=eager[2], name=f"{kind} grad ref_logp")


def test_k3_tiny_differences_do_not_cancel() -> None:
    """r ~ 1e-7: naive exp(r) - 1 - r is off by ~1e-8 (even negative); k3 stays relatively exact."""
    logp = -1.5 + 0.4 * torch.rand(64)
    ref = logp + torch.linspace(-8, 8, 64) * 1.2e-7
    ref[::7] = logp[::7]  # exactly zero differences too
    a = logp.clone().requires_grad_()
    out = kl_penalty(a, ref, "k3")
    g = torch.randn(64)
    out.backward(g)
    want, want_da, _ = _formula64(logp, ref, g, "k3")
    assert (out >= 0).all()
    rtol = TOLERANCES[torch.float32][1]
    assert ((out.double() - want).abs() <= rtol * want.abs()).all(), (out, want)
    assert ((a.grad.double() - want_da).abs() <= rtol * want_da.abs() + 1e-30).all()
    naive = torch.exp(ref - logp) - 1 - (ref - logp)
    assert ((naive.double() - want).abs() > rtol * want.abs()).any(), (
        "test inputs should defeat the naive form"
    )


def test_k3_large_differences() -> None:
    logp = torch.tensor([-9.0, -0.1, -5.0, -1e-3])
    ref = torch.tensor([-0.1, -9.0, -4.0, -1e-3 - 0.3])
    out = kl_penalty(logp, ref, "k3")
    want, _, _ = _formula64(logp, ref, torch.ones(4), "k3")
    assert_close_fp64(out, want, name="k3 forward")


@pytest.mark.parametrize("clamp", [10.0, 3.0])
def test_k3_log_ratio_is_clamped(clamp: float) -> None:
    """A token pushed to logp -30 (r = ref - logp ~ 30): unclamped exp(30) ~ 1e13; clamped to
    exp(clamp) - clamp - 1, with gradient 0 outside [-clamp, clamp] (torch.clamp's, as verl's)."""
    before = dict(LAUNCHES)
    logp = torch.tensor([-30.0, -0.5, -1.0, -2.0, -20.0, -12.5, -0.2])
    ref = torch.tensor(
        [-0.5, -30.0, -1.0 - 0.9 * clamp, -2.0 + 0.99 * clamp, -20.0 + clamp + 1.0, -1.0, -0.3]
    )
    a, b = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    out = kl_penalty(a, b, "k3", log_ratio_clamp=clamp)
    g = torch.randn(7)
    out.backward(g)
    check_launched(before, ("kl_fwd", "kl_bwd"))
    want, want_da, want_db = _formula64(logp, ref, g, "k3", clamp)
    assert want[0] == math.expm1(clamp) - clamp and want[1] == math.expm1(-clamp) + clamp
    assert torch.isfinite(out).all() and float(out.detach().max()) <= math.expm1(
        clamp
    ) - clamp + 1e-3 * math.exp(clamp)
    assert_close_fp64(out, want, torch.float32, name="k3 clamped forward")
    assert_close_fp64(a.grad, want_da, torch.float32, name="k3 clamped grad logp")
    assert_close_fp64(b.grad, want_db, torch.float32, name="k3 clamped grad ref")
    outside = torch.tensor([True, True, False, False, True, True, False])
    assert (a.grad[outside] == 0).all() and (a.grad[~outside] != 0).all()
    # unclamped (inf) it is the raw estimator again: ~1e13 at logp -30
    raw = kl_penalty(logp, ref, "k3", log_ratio_clamp=math.inf)
    assert float(raw[0]) > 1e12


def test_k3_clamp_leaves_k1_k2_alone() -> None:
    logp, ref = torch.tensor([-30.0, -0.5]), torch.tensor([-0.5, -30.0])
    for kind in ("k1", "k2"):
        want, _, _ = _formula64(logp, ref, torch.ones(2), kind)
        assert_close_fp64(kl_penalty(logp, ref, kind, log_ratio_clamp=1.0), want, torch.float32)


def test_kl_mixed_input_dtypes() -> None:
    logp = -torch.rand(3, 5)
    ref = (-torch.rand(3, 5)).to(torch.bfloat16).requires_grad_()
    out = kl_penalty(logp, ref, "k2")
    out.backward(torch.ones_like(out))
    assert ref.grad.dtype == torch.bfloat16
    want, _, want_db = _formula64(logp, ref.detach(), torch.ones(3, 5), "k2")
    assert_close_fp64(out, want, name="k2 forward")
    assert_close_fp64(ref.grad, want_db, name="k2 grad ref_logp")


def test_kl_bad_inputs() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="logp"):
        kl_penalty(torch.zeros(2, 3, dtype=torch.long), x)
    with pytest.raises(TypeError, match="ref_logp"):
        kl_penalty(x, torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"logp\[2, 3\].*ref_logp\[3, 2\]"):
        kl_penalty(x, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="ref_logp"):
        kl_penalty(x, torch.zeros(2, 3, device="meta"))
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(x, x, "k4")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="log_ratio_clamp must be > 0"):
            kl_penalty(x, x, "k3", log_ratio_clamp=bad)
