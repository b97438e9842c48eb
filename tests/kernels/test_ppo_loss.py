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


def _check_stats(stats: dict[str, torch.Tensor], want: dict[str, float], count: float) -> None:
    """Each stat is an fp32 scalar, held to the fp32 row whatever the inputs' dtype."""
    for key, value in want.items():
        got = stats[key]
        assert got.dim() == 0 and got.dtype == torch.float32, key
        if "frac" in key:  # one token sitting on a clip boundary may flip between fp32 and fp64
            assert abs(float(got) - value) <= 1.01 / max(count, 1.0) + 1e-6, (key, float(got), value)
        else:
            assert_close_fp64(got.reshape(1), torch.tensor([value], dtype=torch.float64), name=key)


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
    assert_close_fp64(loss.reshape(1), loss64.detach().reshape(1), name="loss")
    assert x.grad.dtype == dtype
    xe = logp.clone().requires_grad_()
    (ppo_policy_loss_reference(xe, old, adv, mask, reduction=reduction, **config)[0] * scale).backward()
    assert_close_fp64(x.grad, x64.grad, eager=xe.grad, name="grad logp")
    _check_stats(stats, stats64, float(mask.sum()))
    assert_close_fp64(eager_loss.reshape(1), loss64.detach().reshape(1), name="reference loss")


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
    assert_close_fp64(loss.reshape(1), loss64.detach().reshape(1), name="loss")
    xe = values.clone().requires_grad_()
    (ppo_value_loss_reference(xe, old, returns, mask, clip=clip, reduction=reduction)[0] * scale).backward()
    assert x.grad.dtype == dtype
    assert_close_fp64(x.grad, x64.grad, eager=xe.grad, name="grad values")
    _check_stats(stats, stats64, float(mask.sum()))


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


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_masked_positions_are_never_read(poison) -> None:
    """NaN/inf at masked positions of every input (logp, old_logp, advantages, ref_logp, values,
    old_values, returns) changes nothing: losses, stats and gradients stay finite and equal the
    clean-input result, for every reduction."""
    shape = (3, 17)
    mask = _mask(shape)
    clean = [torch.randn(shape) - 1.0 for _ in range(7)]
    dirty = [torch.where(mask, t, poison) for t in clean]
    for reduction in REDUCTIONS:
        results = []
        for logp, old, adv, ref, values, old_values, returns in (clean, dirty):
            x, v = logp.clone().requires_grad_(), values.clone().requires_grad_()
            loss, stats = ppo_policy_loss(
                x, old, adv, mask, dual_clip=3.0, reduction=reduction, kl=KLLossTerm(ref, 0.1, "k3")
            )
            vloss, vstats = ppo_value_loss(v, old_values, returns, mask, reduction=reduction)
            (loss + vloss).backward()
            out = {
                "loss": loss,
                "value loss": vloss,
                **stats,
                **vstats,
                "grad logp": x.grad,
                "grad values": v.grad,
            }
            results.append({k: t.detach() for k, t in out.items()})
        for name, want in results[0].items():
            got = results[1][name]
            assert torch.isfinite(got).all(), (
                f"{reduction} {name}: non-finite values leaked from masked positions"
            )
            assert torch.equal(got, want), f"{reduction} {name} differs from the clean-input result"


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
    assert_close_fp64(loss.reshape(1), want.detach().reshape(1), name="loss")


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
        assert_close_fp64(loss.reshape(1), loss64.detach().reshape(1), name="loss")
        assert_close_fp64(x.grad, x64.grad, name="grad logp")
        _check_stats(stats, stats64, float(mask.sum()))
        values = logp.detach().requires_grad_()
        vloss, _ = ppo_value_loss(values, old, adv, mask, reduction=reduction)
        vloss.backward()
        v64, vloss64, _ = _value64(logp, old, adv, mask.double(), reduction=reduction)
        vloss64.backward()
        assert_close_fp64(vloss.reshape(1), vloss64.detach().reshape(1), name="value loss")
        assert_close_fp64(values.grad, v64.grad, name="grad values")


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
    assert_close_fp64(loss.reshape(1), loss64.detach().reshape(1), name="loss")
    xe = logp.clone().requires_grad_()
    eager_loss, eager_stats = ppo_policy_loss_reference(
        xe, old, adv, mask, reduction=reduction, kl=KLLossTerm(ref, coef, kind), **config
    )
    (eager_loss * scale).backward()
    assert_close_fp64(x.grad, x64.grad, eager=xe.grad, name="grad logp")
    want_kl = _mmean64(kl64.detach(), m)
    for got in (stats["kl_loss"], eager_stats["kl_loss"]):
        assert got.dim() == 0 and got.dtype == torch.float32
        assert_close_fp64(got.reshape(1), torch.tensor([want_kl], dtype=torch.float64), name="kl_loss")
    assert_close_fp64(eager_loss.reshape(1), loss64.detach().reshape(1), name="reference loss")


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


# --------------------------------------------------------------------------- GSPO and CISPO
def _objective64(logp, old, adv, m, loss_type, clip_low, clip_high, reduction):
    """GSPO's or CISPO's loss in float64, written from the papers (x: the differentiable fp64 leaf).

    GSPO: s = exp(masked mean of the token log-ratios) per sequence, per token
    max(-A s_t, -A clamp(s_t)) with s_t = sg(s) * pi_t / sg(pi_t) (verl's token-level form).
    CISPO: -sg(clamp(r, 1 - low, 1 + high)) * A * logp.
    """
    x = logp.double().requires_grad_()
    old, adv = old.double(), adv.double()
    d = x - old
    if loss_type == "gspo":
        rows = m.reshape(-1, m.shape[-1])
        cnt = rows.sum(-1)
        seq = ((d.detach() * m).reshape(-1, m.shape[-1]).sum(-1) / cnt.clamp(min=1e-300)).where(cnt > 0, 0.0)
        ratio = torch.exp(x - x.detach() + seq.reshape(*m.shape[:-1], 1))
        l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
        loss, clipped = torch.maximum(l1, l2), l2 > l1
    else:
        ratio = torch.exp(d.detach())
        loss = -adv * ratio.clamp(1 - clip_low, 1 + clip_high) * x
        clipped = (ratio < 1 - clip_low) | (ratio > 1 + clip_high)
    on = m > 0
    stats = {
        "clipfrac": _mmean64(clipped.double(), m),
        "approx_kl": _mmean64(torch.expm1(d.detach()) - d.detach(), m),
        "ratio_mean": _mmean64(ratio.detach(), m),
        "ratio_max": float(ratio.detach()[on].max()) if on.any() else 0.0,
    }
    return x, _reduce64(loss * m.ne(0), m, reduction), stats


OBJECTIVES = [("gspo", 0.03, 0.04), ("gspo", 3e-4, 4e-4), ("cispo", 1.0, 0.2), ("cispo", 0.2, 0.28)]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=["gspo", "gspo_tiny", "cispo", "cispo_low"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(4, 23), (2, 3, 19), (7, 131)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gspo_cispo_match_fp64(objective, reduction, shape, dtype) -> None:
    """Loss, stats and the gradient of a random upstream scale against float64, Triton and torch."""
    loss_type, lo, hi = objective
    logp = (-2.0 * torch.rand(shape)).to(dtype)
    # Per-row offsets around the clip range, so some sequences (GSPO) and tokens fall inside it.
    rows = torch.randn(*shape[:-1], 1) * (hi if loss_type == "gspo" else 0.2)
    old = (logp.float() + rows + (0.02 if loss_type == "gspo" else 0.2) * torch.randn(shape)).to(dtype)
    adv = torch.randn(shape).to(dtype)
    mask = _mask(shape)
    cfg = dict(clip_low=lo, clip_high=hi, reduction=reduction, loss_type=loss_type)
    x = logp.clone().requires_grad_()
    before = dict(LAUNCHES)
    loss, stats = ppo_policy_loss(x, old, adv, mask, **cfg)
    scale = torch.randn(())
    (loss * scale).backward()
    extra = ("ppo_policy_loss_gspo_seq",) if loss_type == "gspo" else ()
    names = ("ppo_policy_loss_fwd", "ppo_policy_loss_finalize", "ppo_policy_loss_bwd", *extra)
    check_launched(before, names, count=1)

    x64, loss64, stats64 = _objective64(logp, old, adv, mask.double(), loss_type, lo, hi, reduction)
    (loss64 * scale.double()).backward()
    assert loss.dim() == 0 and loss.dtype == torch.float32 and x.grad.dtype == dtype
    assert_close_fp64(loss.reshape(1), loss64.detach().reshape(1), dtype, name="loss")
    xe = logp.clone().requires_grad_()
    eager_loss, _ = ppo_policy_loss_reference(xe, old, adv, mask, **cfg)
    (eager_loss * scale).backward()
    eager = xe.grad.float() if dtype != torch.float32 else None
    assert_close_fp64(x.grad.float(), x64.grad, dtype, eager=eager, name="grad logp")
    assert_close_fp64(eager_loss.reshape(1), loss64.detach().reshape(1), dtype, name="reference loss")
    # GSPO flags whole sequences: one on a clip boundary may flip a row's worth of tokens.
    row = shape[-1] if loss_type == "gspo" else 1
    for key, value in stats64.items():
        got = stats[key]
        if key == "clipfrac":
            assert abs(float(got) - value) <= 1.01 * row / max(float(mask.sum()), 1.0) + 1e-6, (got, value)
        else:
            assert_close_fp64(got.reshape(1), torch.tensor([value], dtype=torch.float64), dtype, name=key)


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_gspo_cispo_with_kl_term_match_fp64(kind) -> None:
    """The fused KL term adds to GSPO's and CISPO's losses as to PPO's (loss and gradient, fp32)."""
    shape = (5, 37)
    logp = -2.0 * torch.rand(shape)
    old = logp + 0.05 * torch.randn(shape)
    ref = logp + 0.3 * torch.randn(shape)
    adv = torch.randn(shape)
    mask = _mask(shape)
    for loss_type in ("gspo", "cispo"):
        x = logp.clone().requires_grad_()
        kl = KLLossTerm(ref, 0.1, kind)
        loss, stats = ppo_policy_loss(
            x, old, adv, mask, 0.03, 0.04, reduction="seq_mean_token_mean", kl=kl, loss_type=loss_type
        )
        g = torch.randn(())
        (loss * g).backward()
        x64 = logp.double().requires_grad_()
        base = _objective64(logp, old, adv, mask.double(), loss_type, 0.03, 0.04, "seq_mean_token_mean")
        x64 = base[0]
        d = x64 - ref.double()
        per = (torch.expm1(-d) + d) if kind == "k3" else d
        m = mask.double()
        rows = ((per * m).sum(-1) / m.sum(-1).clamp(min=1))[m.sum(-1) > 0].mean()
        (g.double() * (base[1] + 0.1 * rows)).backward()
        assert_close_fp64(loss.reshape(1), (base[1] + 0.1 * rows).detach().reshape(1), torch.float32)
        assert_close_fp64(x.grad, x64.grad, torch.float32, name=f"{loss_type} grad")
        assert "kl_loss" in stats


def test_gspo_gradient_is_the_sequence_objectives() -> None:
    """With one advantage per sequence and seq_mean_token_mean, GSPO's token-level form has the
    gradient of the sequence-level objective mean_i max(-A_i s_i, -A_i clip(s_i)), s_i = exp(mean d)
    (differentiated through s itself here): the paper's length-normalised sequence gradient."""
    S, T = 6, 29
    logp = -2.0 * torch.rand(S, T, dtype=torch.float64)
    old = logp + torch.tensor([0.0, 1e-4, -1e-4, 0.3, -0.3, 2e-4], dtype=torch.float64)[:, None]
    old = old + 1e-5 * torch.randn(S, T, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0, 2.0, -0.7], dtype=torch.float64)[:, None].expand(S, T)
    mask = torch.rand(S, T) > 0.2
    x = logp.clone().float().requires_grad_()
    loss, stats = ppo_policy_loss(
        x, old.float(), adv.float(), mask, 3e-4, 4e-4, reduction="seq_mean_token_mean", loss_type="gspo"
    )
    loss.backward()
    x64 = logp.clone().requires_grad_()
    m = mask.double()
    s = torch.exp(((x64 - old) * m).sum(-1) / m.sum(-1))
    a = adv[:, 0]
    want = torch.maximum(-a * s, -a * s.clamp(1 - 3e-4, 1 + 4e-4)).mean()
    want.backward()
    assert_close_fp64(loss.reshape(1), want.detach().reshape(1), torch.float32)
    assert_close_fp64(x.grad, x64.grad, torch.float32, name="grad")
    # Rows 3 and 4 leave the range (clipped: no gradient); row 0's ratio is 1 (gradient -A/L).
    assert (x.grad[3] == 0).all() and (x.grad[4] == 0).all() and (x.grad[0][mask[0]] != 0).all()
    assert abs(float(stats["ratio_max"]) - float(s.detach().max())) < 1e-4


def test_cispo_keeps_the_gradient_of_clipped_tokens() -> None:
    """A token whose ratio is far above 1 + clip_high: PPO gives it no gradient, CISPO gives it
    -A * (1 + clip_high) / n (the clamped weight times the advantage, per token of the mean)."""
    logp = torch.tensor([[1.0, 0.0, -1.0, 0.0]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    grads = {}
    for loss_type in ("ppo", "cispo"):
        x = logp.clone().requires_grad_()
        loss, stats = ppo_policy_loss(x, old, adv, mask, 0.2, 0.28, loss_type=loss_type)
        loss.backward()
        grads[loss_type] = x.grad[0]
        assert abs(float(stats["clipfrac"]) - 0.5) < 1e-6  # tokens 0 (e > 1.28) and 2 (1/e < 0.8)
    assert grads["ppo"][0] == 0 and grads["ppo"][2] == 0
    want = torch.tensor([-1.28, -1.0, 0.8, 2.0]) / 4
    torch.testing.assert_close(grads["cispo"], want, rtol=1e-6, atol=1e-7)


def test_gspo_cispo_masked_padding_and_bad_inputs() -> None:
    logp = torch.randn(3, 7, requires_grad=True)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, :3] = True
    junk = torch.where(mask, torch.zeros(3, 7), torch.full((3, 7), float("nan")))
    for loss_type in ("gspo", "cispo"):
        for reduction in REDUCTIONS:
            loss, stats = ppo_policy_loss(logp, junk, junk, mask, reduction=reduction, loss_type=loss_type)
            loss.backward()
            assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
            assert torch.isfinite(logp.grad).all() and (logp.grad[~mask] == 0).all()
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="loss_type"):
        ppo_policy_loss(x, x, x, m, loss_type="grpo")
    with pytest.raises(ValueError, match="dual_clip is PPO's"):
        ppo_policy_loss(x, x, x, m, dual_clip=3.0, loss_type="gspo")
