"""PPO policy and value losses: loss, stats and gradients against float64 formulas."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DTYPES, assert_close_fp64, check_launched
from tritonrlhf.kernels import (
    KLLossTerm,
    ppo_policy_loss,
    ppo_policy_loss_reference,
    ppo_value_loss,
    ppo_value_loss_reference,
)
from tritonrlhf.kernels._dispatch import LAUNCHES

SHAPES = [(29,), (4, 23), (2, 3, 19)]
REDUCTIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
POLICY_CONFIGS = [
    dict(clip_low=0.2),
    dict(clip_low=0.2, clip_high=0.28),
    dict(clip_low=0.1, clip_high=0.3, dual_clip=2.0),
]


def _reduce64(loss: torch.Tensor, m: torch.Tensor, reduction: str) -> torch.Tensor:
    """Float64 reductions; empty sequences are excluded from the seq means."""
    lm = loss * m
    if reduction == "token_mean":
        return lm.sum() / m.sum() if m.sum() > 0 else lm.sum() * 0
    rows_sum, rows_cnt = lm.reshape(-1, m.shape[-1]).sum(-1), m.reshape(-1, m.shape[-1]).sum(-1)
    keep = rows_cnt > 0
    if not keep.any():
        return rows_sum.sum() * 0
    per = rows_sum[keep] / rows_cnt[keep] if reduction == "seq_mean_token_mean" else rows_sum[keep]
    return per.mean()


def _mmean64(x: torch.Tensor, m: torch.Tensor) -> float:
    return float((x * m).sum() / m.sum()) if m.sum() > 0 else 0.0


def _policy64(logp, old, adv, m, clip_low=0.2, clip_high=None, dual_clip=None, reduction="token_mean"):
    """Loss (differentiable w.r.t. the fp64 leaf returned) and stats, in float64."""
    clip_high = clip_low if clip_high is None else clip_high
    x = logp.double().requires_grad_()
    old, adv = old.double(), adv.double()
    ratio = torch.exp(x - old)
    l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(l1, l2)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        dual = (adv < 0) & (loss > -adv * dual_clip)
        loss = torch.where(dual, -adv * dual_clip, loss)
    d = (x - old).detach()
    on = m > 0
    stats = {
        "clipfrac": _mmean64((l2 > l1).double(), m),
        "approx_kl": _mmean64(torch.expm1(d) - d, m),
        "ratio_mean": _mmean64(ratio.detach(), m),
        "ratio_max": float(ratio.detach()[on].max()) if on.any() else 0.0,
        "dual_clipfrac": _mmean64(dual.double(), m),
    }
    return x, _reduce64(loss, m, reduction), stats


def _value64(values, old, ret, m, clip=0.2, reduction="token_mean"):
    x = values.double().requires_grad_()
    old, ret = old.double(), ret.double()
    l1 = (x - ret) ** 2
    if clip is None:
        loss, clipped = 0.5 * l1, torch.zeros_like(l1)
    else:
        l2 = (old + (x - old).clamp(-clip, clip) - ret) ** 2
        loss, clipped = 0.5 * torch.maximum(l1, l2), (l2 > l1).double()
    on = m > 0
    stats = {
        "vf_clipfrac": _mmean64(clipped, m),
        "values_mean": _mmean64(x.detach(), m),
        "returns_mean": _mmean64(ret, m),
        "values_max": float(x.detach()[on].max()) if on.any() else 0.0,
    }
    return x, _reduce64(loss, m, reduction), stats


def _mask(shape: tuple[int, ...], kind: str = "bool") -> torch.Tensor:
    m = torch.rand(shape) > 0.3
    if len(shape) >= 2:
        m.reshape(-1, shape[-1])[1] = False  # a fully masked sequence
        m.reshape(-1, shape[-1])[0, 5:12] = False  # a hole in the middle
    return m.float() if kind == "float" else m


def _check_stats(stats: dict[str, torch.Tensor], want: dict[str, float], count: float, dtype) -> None:
    for key, value in want.items():
        got = stats[key]
        assert got.dim() == 0 and got.dtype == torch.float32, key
        if "frac" in key:  # one token sitting on a clip boundary may flip between fp32 and fp64
            assert abs(float(got) - value) <= 1.01 / max(count, 1.0) + 1e-6, (key, float(got), value)
        else:
            assert_close_fp64(got.reshape(1), torch.tensor([value], dtype=torch.float64), dtype, name=key)


@pytest.mark.parametrize("config", POLICY_CONFIGS, ids=["sym", "asym", "dual"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_matches_fp64(config, reduction, shape, dtype) -> None:
    logp = (-2.0 * torch.rand(shape)).to(dtype)
    old = (logp.float() + 0.3 * torch.randn(shape)).to(dtype)
    adv = torch.randn(shape).to(dtype)
    mask = _mask(shape)
    x = logp.clone().requires_grad_()
    before = dict(LAUNCHES)
    loss, stats = ppo_policy_loss(x, old, adv, mask, reduction=reduction, **config)
    check_launched(before, ("ppo_policy_loss_fwd", "ppo_policy_loss_finalize"))
    scale = torch.randn(())
    (loss * scale).backward()
    check_launched(before, ("ppo_policy_loss_bwd",))

    x64, loss64, stats64 = _policy64(logp, old, adv, mask.double(), reduction=reduction, **config)
    (loss64 * scale.double()).backward()
    assert loss.dim() == 0 and loss.dtype == torch.float32
    eager_loss, _ = ppo_policy_loss_reference(logp, old, adv, mask, reduction=reduction, **config)
    assert_close_fp64(loss.reshape(1), loss64.detach().reshape(1), dtype, name="loss")
    assert x.grad.dtype == dtype
    xe = logp.clone().requires_grad_()
    (ppo_policy_loss_reference(xe, old, adv, mask, reduction=reduction, **config)[0] * scale).backward()
    eager = xe.grad.float() if dtype != torch.float32 else None
    assert_close_fp64(x.grad.float(), x64.grad, dtype, eager=eager, name="grad logp")
    _check_stats(stats, stats64, float(mask.sum()), dtype)
    assert_close_fp64(eager_loss.reshape(1), loss64.detach().reshape(1), dtype, name="reference loss")


@pytest.mark.parametrize("clip", [0.2, None], ids=["clip", "noclip"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_value_loss_matches_fp64(clip, reduction, shape, dtype) -> None:
    values = torch.randn(shape).to(dtype)
    old = (values.float() + 0.3 * torch.randn(shape)).to(dtype)
    returns = (values.float() + torch.randn(shape)).to(dtype)
    mask = _mask(shape, "float")
    x = values.clone().requires_grad_()
    before = dict(LAUNCHES)
    loss, stats = ppo_value_loss(x, old, returns, mask, clip=clip, reduction=reduction)
    check_launched(before, ("ppo_value_loss_fwd", "ppo_value_loss_finalize"))
    scale = torch.randn(())
    (loss * scale).backward()
    check_launched(before, ("ppo_value_loss_bwd",))

    x64, loss64, stats64 = _value64(values, old, returns, mask.double(), clip=clip, reduction=reduction)
    (loss64 * scale.double()).backward()
    assert_close_fp64(loss.reshape(1), loss64.detach().reshape(1), dtype, name="loss")
    xe = values.clone().requires_grad_()
    (ppo_value_loss_reference(xe, old, returns, mask, clip=clip, reduction=reduction)[0] * scale).backward()
    eager = xe.grad.float() if dtype != torch.float32 else None
    assert x.grad.dtype == dtype
    assert_close_fp64(x.grad.float(), x64.grad, dtype, eager=eager, name="grad values")
    _check_stats(stats, stats64, float(mask.sum()), dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_gives_zero_without_nan(reduction) -> None:
    logp = torch.randn(3, 7, requires_grad=True)
    values = torch.randn(3, 7, requires_grad=True)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    junk = torch.full((3, 7), float("inf"))  # padding garbage must not leak through the mask
    loss, stats = ppo_policy_loss(logp, junk, junk, mask, dual_clip=3.0, reduction=reduction)
    vloss, vstats = ppo_value_loss(values, junk, junk, mask, reduction=reduction)
    (loss + vloss).backward()
    for t in (loss, vloss, *stats.values(), *vstats.values()):
        assert float(t.detach()) == 0.0
    assert (logp.grad == 0).all() and (values.grad == 0).all()


def test_dual_clip_caps_negative_advantages() -> None:
    logp = torch.tensor([[2.0, 2.0, 0.0, -2.0]])  # ratio e^2 ~ 7.4 on the first two tokens
    old = torch.zeros(1, 4)
    adv = torch.tensor([[-1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    x = logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old, adv, mask, dual_clip=3.0)
    loss.backward()
    # per token: A<0 with ratio 7.39 -> capped at -A*3 = 3; A>0 with ratio 7.39 -> clipped to -1.2;
    # ratio 1 -> 1; A<0 with ratio e^-2 -> clipped to -A*0.8 = 0.8.
    want = torch.tensor([3.0, -1.2, 1.0, 0.8]).mean()
    assert abs(float(loss.detach()) - float(want)) < 1e-5
    assert abs(float(stats["dual_clipfrac"]) - 0.25) < 1e-6
    assert abs(float(stats["clipfrac"]) - 0.5) < 1e-6
    assert x.grad[0, 0] == 0 and x.grad[0, 1] == 0 and x.grad[0, 3] == 0
    assert abs(float(x.grad[0, 2]) - 0.25) < 1e-6


def test_int_mask_and_mixed_dtypes() -> None:
    logp = -torch.rand(2, 9, dtype=torch.bfloat16)
    old = -torch.rand(2, 9)
    adv = torch.randn(2, 9, dtype=torch.float16)
    mask = (torch.rand(2, 9) > 0.5).long()
    loss, _ = ppo_policy_loss(logp, old, adv, mask)
    _, want, _ = _policy64(logp, old, adv, mask.double())
    assert_close_fp64(loss.reshape(1), want.detach().reshape(1), torch.bfloat16)


@pytest.mark.parametrize("layout", ["sliced", "transposed", "expanded"])
def test_strided_inputs_and_mask(layout) -> None:
    """Strided views (every other token, a transpose, a broadcast mask) give the fp64 result."""
    S, T = 4, 21
    if layout == "sliced":
        logp, old, adv = ((-2.0 * torch.rand(S, 2 * T))[:, ::2] for _ in range(3))
        mask = (torch.rand(S, 2 * T) > 0.3)[:, ::2]
    elif layout == "transposed":
        logp, old, adv = ((-2.0 * torch.rand(T, S)).t() for _ in range(3))
        mask = (torch.rand(T, S) > 0.3).t()
    else:
        logp, old, adv = ((-2.0 * torch.rand(S, T)) for _ in range(3))
        mask = (torch.rand(1, T) > 0.3).expand(S, T)
    assert not mask.is_contiguous()
    for reduction in REDUCTIONS:
        x = logp.clone().requires_grad_() if layout == "expanded" else logp.detach().requires_grad_()
        loss, stats = ppo_policy_loss(x, old, adv, mask, clip_high=0.28, reduction=reduction)
        loss.backward()
        x64, loss64, stats64 = _policy64(logp, old, adv, mask.double(), clip_high=0.28, reduction=reduction)
        loss64.backward()
        assert_close_fp64(loss.reshape(1), loss64.detach().reshape(1), torch.float32, name="loss")
        assert_close_fp64(x.grad, x64.grad, torch.float32, name="grad logp")
        _check_stats(stats, stats64, float(mask.sum()), torch.float32)
        values = logp.detach().requires_grad_()
        vloss, _ = ppo_value_loss(values, old, adv, mask, reduction=reduction)
        vloss.backward()
        v64, vloss64, _ = _value64(logp, old, adv, mask.double(), reduction=reduction)
        vloss64.backward()
        assert_close_fp64(vloss.reshape(1), vloss64.detach().reshape(1), torch.float32, name="value loss")
        assert_close_fp64(values.grad, v64.grad, torch.float32, name="grad values")


def test_bad_inputs() -> None:
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="logp"):
        ppo_policy_loss(x.long(), x, x, m)
    with pytest.raises(TypeError, match="advantages"):
        ppo_policy_loss(x, x, x.int(), m)
    with pytest.raises(TypeError, match="returns"):
        ppo_value_loss(x, x, x.long(), m)
    with pytest.raises(ValueError, match=r"old_logp\[3, 2\]"):
        ppo_policy_loss(x, torch.zeros(3, 2), x, m)
    with pytest.raises(ValueError, match=r"mask\[2\]"):
        ppo_value_loss(x, x, x, torch.ones(2))
    with pytest.raises(ValueError, match="mask on meta"):
        ppo_policy_loss(x, x, x, torch.ones(2, 3, device="meta"))
    with pytest.raises(ValueError, match="reduction"):
        ppo_policy_loss(x, x, x, m, reduction="mean")
    with pytest.raises(ValueError, match="reduction"):
        ppo_value_loss(x, x, x, m, reduction="sum")
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(x, x, x, m, dual_clip=0.5)


# --------------------------------------------------------------------------- fused KL term
def _kl64(x: torch.Tensor, ref: torch.Tensor, kind: str, clamp: float = 10.0) -> torch.Tensor:
    """Schulman's estimators of KL(policy || ref) per token, float64 (x = logp, differentiable;
    k3's log-ratio clamped to [-clamp, clamp], so its gradient is 0 outside)."""
    d = x - ref.double()
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    d = d.clamp(-clamp, clamp)
    return torch.expm1(-d) + d


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(4, 23), (2, 3, 19)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_with_kl_term_matches_fp64(kind, reduction, shape, dtype) -> None:
    """Surrogate + coef * KL in one set of launches: loss, kl_loss and the gradient against float64."""
    logp = (-2.0 * torch.rand(shape)).to(dtype)
    old = (logp.float() + 0.3 * torch.randn(shape)).to(dtype)
    ref = (logp.float() + 0.5 * torch.randn(shape)).to(dtype)
    adv = torch.randn(shape).to(dtype)
    mask = _mask(shape)
    config = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    coef = 0.04 if kind == "k3" else 0.3
    x = logp.clone().requires_grad_()
    before = dict(LAUNCHES)
    loss, stats = ppo_policy_loss(
        x, old, adv, mask, reduction=reduction, kl=KLLossTerm(ref, coef, kind), **config
    )
    scale = torch.randn(())
    (loss * scale).backward()
    # Fused: exactly one launch of each where Triton runs, and no separate KL kernel anywhere.
    check_launched(
        before, ("ppo_policy_loss_fwd", "ppo_policy_loss_finalize", "ppo_policy_loss_bwd"), count=1
    )
    assert LAUNCHES["kl_fwd"] == before.get("kl_fwd", 0) and LAUNCHES["kl_bwd"] == before.get("kl_bwd", 0)

    # float64: the surrogate of _policy64 plus coef * kl per token, reduced the same way.
    m = mask.double()
    x64 = logp.double().requires_grad_()
    o64, a64 = old.double(), adv.double()
    ratio = torch.exp(x64 - o64)
    l1, l2 = -a64 * ratio, -a64 * ratio.clamp(0.8, 1.28)
    surr = torch.maximum(l1, l2)
    surr = torch.where((a64 < 0) & (surr > -a64 * 3.0), -a64 * 3.0, surr)
    kl64 = _kl64(x64, ref, kind)
    loss64 = _reduce64(surr + coef * kl64, m, reduction)
    (loss64 * scale.double()).backward()
    assert_close_fp64(loss.reshape(1), loss64.detach().reshape(1), dtype, name="loss")
    xe = logp.clone().requires_grad_()
    eager_loss, eager_stats = ppo_policy_loss_reference(
        xe, old, adv, mask, reduction=reduction, kl=KLLossTerm(ref, coef, kind), **config
    )
    (eager_loss * scale).backward()
    eager = xe.grad.float() if dtype != torch.float32 else None
    assert_close_fp64(x.grad.float(), x64.grad, dtype, eager=eager, name="grad logp")
    want_kl = _mmean64(kl64.detach(), m)
    for got in (stats["kl_loss"], eager_stats["kl_loss"]):
        assert got.dim() == 0 and got.dtype == torch.float32
        assert_close_fp64(got.reshape(1), torch.tensor([want_kl], dtype=torch.float64), dtype, name="kl_loss")
    assert_close_fp64(eager_loss.reshape(1), loss64.detach().reshape(1), dtype, name="reference loss")


def test_kl_term_equals_the_unfused_pair_and_zero_coef_changes_nothing() -> None:
    """loss(kl) == loss + coef * masked_mean(kl_penalty) for token_mean; coef 0 gives the plain loss."""
    from tritonrlhf.kernels import kl_penalty

    g = torch.Generator().manual_seed(1)
    logp, old, ref = (-2 * torch.rand(3, 17, generator=g) for _ in range(3))
    adv = torch.randn(3, 17, generator=g)
    mask = _mask((3, 17))
    base, st = ppo_policy_loss(logp, old, adv, mask)
    fused, fst = ppo_policy_loss(logp, old, adv, mask, kl=KLLossTerm(ref, 0.1))
    kl = kl_penalty(logp, ref, "k3")
    kl_mean = (kl * mask).sum() / mask.sum()
    torch.testing.assert_close(fused, base + 0.1 * kl_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fst["kl_loss"], kl_mean, rtol=1e-5, atol=1e-6)
    zero, zst = ppo_policy_loss(logp, old, adv, mask, kl=KLLossTerm(ref, 0.0))
    torch.testing.assert_close(zero, base, rtol=1e-6, atol=1e-7)
    assert "kl_loss" not in st and set(zst) == set(st) | {"kl_loss"}
    # Padding garbage in ref_logp must not leak through the mask.
    junk = torch.where(mask, ref, torch.full_like(ref, float("nan")))
    x = logp.clone().requires_grad_()
    out, _ = ppo_policy_loss(x, old, adv, mask, kl=KLLossTerm(junk, 0.1))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out, fused, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_term_k3_log_ratio_is_clamped(reduction) -> None:
    """A token at logp -30 against the reference's -0.5 (and the reverse): the fused k3 term uses
    the clamped log-ratio (|r| <= 10, verl's), so the loss stays finite and near float64's clamped
    value, and the KL term's gradient is 0 outside the clamp."""
    shape = (3, 9)
    g = torch.Generator().manual_seed(3)
    logp = -2.0 * torch.rand(shape, generator=g)
    logp[0, 2], logp[2, 5] = -30.0, -0.5
    old = logp + 0.05 * torch.randn(shape, generator=g)
    ref = logp + 0.5 * torch.randn(shape, generator=g)
    ref[0, 2], ref[2, 5] = -0.5, -30.0
    adv = torch.randn(shape, generator=g)
    mask = torch.ones(shape, dtype=torch.bool)
    mask[1, 7:] = False
    coef = 0.1
    x = logp.clone().requires_grad_()
    before = dict(LAUNCHES)
    loss, stats = ppo_policy_loss(x, old, adv, mask, reduction=reduction, kl=KLLossTerm(ref, coef, "k3"))
    scale = torch.randn(())
    (loss * scale).backward()
    check_launched(before, ("ppo_policy_loss_fwd", "ppo_policy_loss_bwd"), count=1)

    m = mask.double()
    x64 = logp.double().requires_grad_()
    ratio = torch.exp(x64 - old.double())
    a64 = adv.double()
    surr = torch.maximum(-a64 * ratio, -a64 * ratio.clamp(0.8, 1.2))
    kl64 = _kl64(x64, ref, "k3", clamp=10.0)
    loss64 = _reduce64(surr + coef * kl64, m, reduction)
    (loss64 * scale.double()).backward()
    assert torch.isfinite(loss) and abs(float(loss.detach())) < 1e4  # unclamped: ~1e11
    assert_close_fp64(loss.reshape(1), loss64.detach().reshape(1), torch.float32, name="loss")
    assert_close_fp64(x.grad, x64.grad, torch.float32, name="grad logp")
    want_kl = _mmean64(kl64.detach(), m)
    assert_close_fp64(
        stats["kl_loss"].reshape(1), torch.tensor([want_kl], dtype=torch.float64), torch.float32
    )
    # at the clamped tokens only the surrogate's gradient is left
    x_s = logp.double().requires_grad_()
    r_s = torch.exp(x_s - old.double())
    (
        _reduce64(torch.maximum(-a64 * r_s, -a64 * r_s.clamp(0.8, 1.2)), m, reduction) * scale.double()
    ).backward()
    for i, j in ((0, 2), (2, 5)):
        torch.testing.assert_close(x.grad[i, j].double(), x_s.grad[i, j], rtol=1e-4, atol=1e-6)


def test_kl_term_bad_inputs() -> None:
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="kl.kind"):
        ppo_policy_loss(x, x, x, m, kl=KLLossTerm(x, 0.1, "k4"))
    with pytest.raises(ValueError, match=r"kl.ref_logp\[3, 2\]"):
        ppo_policy_loss(x, x, x, m, kl=KLLossTerm(torch.zeros(3, 2), 0.1))
    with pytest.raises(TypeError, match="kl.ref_logp"):
        ppo_policy_loss(x, x, x, m, kl=KLLossTerm(x.long(), 0.1))
    with pytest.raises(ValueError, match="kl.coef"):
        ppo_policy_loss(x, x, x, m, kl=KLLossTerm(x, float("nan")))
    with pytest.raises(TypeError, match="KLLossTerm"):
        ppo_policy_loss(x, x, x, m, kl=(x, 0.1))
    with pytest.raises(ValueError, match="log_ratio_clamp must be > 0"):
        ppo_policy_loss(x, x, x, m, kl=KLLossTerm(x, 0.1, "k3", log_ratio_clamp=0.0))
