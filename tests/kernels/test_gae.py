"""GAE: advantages and returns against the exact recursion in float64."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DTYPES, assert_close_fp64, check_launched
from tritonrlhf.kernels import gae, gae_reference
from tritonrlhf.kernels._dispatch import LAUNCHES


def _gae64(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """The spec's per-row loop, verbatim, in Python floats (float64)."""
    T = rewards.shape[-1]
    r = rewards.double().reshape(-1, T).tolist()
    v = values.double().reshape(-1, T).tolist()
    m = (mask != 0).reshape(-1, T).tolist()
    w = mask.double().reshape(-1, T).tolist()
    adv = [[0.0] * T for _ in r]
    ret = [[0.0] * T for _ in r]
    for i in range(len(r)):
        nextvalue = last = 0.0
        for t in range(T - 1, -1, -1):
            if m[i][t]:
                delta = r[i][t] + gamma * nextvalue - v[i][t]
                last = delta + gamma * lam * last
                nextvalue = v[i][t]
                adv[i][t] = last
                ret[i][t] = (last + v[i][t]) * w[i][t]
    shape = rewards.shape
    return torch.tensor(adv, dtype=torch.float64).reshape(shape), torch.tensor(
        ret, dtype=torch.float64
    ).reshape(shape)


def _mask(shape: tuple[int, ...]) -> torch.Tensor:
    T = shape[-1]
    m = torch.ones(shape, dtype=torch.bool)
    rows = m.reshape(-1, T)
    rows[:, T - T // 5 :] = False  # right padding
    rows[0, T // 4 : T // 2] = False  # hole in the middle
    rows[0, 2] = False
    if rows.shape[0] > 1:
        rows[1] = False  # fully masked row
    if rows.shape[0] > 2:
        rows[2, : T // 3] = False  # left padding
        rows[2] &= torch.rand(T) > 0.3  # scattered holes
    return m


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("shape", [(50,), (4, 37), (2, 3, 29)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gae_matches_fp64(shape, dtype, gamma, lam) -> None:
    rewards = (0.5 * torch.randn(shape)).to(dtype)
    values = torch.randn(shape).to(dtype)
    mask = _mask(shape)
    before = dict(LAUNCHES)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    check_launched(before, ("gae",), count=1)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == ret.shape == shape
    want_adv, want_ret = _gae64(rewards, values, mask, gamma, lam)
    assert_close_fp64(adv, want_adv, dtype, name="advantages")
    assert_close_fp64(ret, want_ret, dtype, name="returns")
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_float_mask_and_reference() -> None:
    rewards, values = torch.randn(3, 40), torch.randn(3, 40)
    mask = _mask((3, 40)).float()
    adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma=0.97, lam=0.9)
    want_adv, want_ret = _gae64(rewards, values, mask, 0.97, 0.9)
    for out in (adv, ref_adv):
        assert_close_fp64(out, want_adv, torch.float32, name="advantages")
    for out in (ret, ref_ret):
        assert_close_fp64(out, want_ret, torch.float32, name="returns")


def test_gae_long_rows() -> None:
    """T = 8192 spans several kernel chunks; holes straddle the chunk boundaries."""
    T = 8192
    rewards = 0.1 * torch.randn(2, T)
    values = torch.randn(2, T)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, 1000:3100] = False  # straddles the 1024 and 2048 chunk edges
    mask[0, 8000:] = False
    mask[1] &= torch.rand(T) > 0.1
    before = dict(LAUNCHES)
    adv, ret = gae(rewards, values, mask, gamma=0.999, lam=0.95)
    check_launched(before, ("gae",), count=1)
    want_adv, want_ret = _gae64(rewards, values, mask, 0.999, 0.95)
    assert_close_fp64(adv, want_adv, torch.float32, name="advantages")
    assert_close_fp64(ret, want_ret, torch.float32, name="returns")


def test_gae_strided_inputs_and_mask() -> None:
    """Every other token of wider tensors, and a transposed mask: strided views give the fp64 result."""
    rewards = torch.randn(3, 2 * 37)[:, ::2]
    values = torch.randn(37, 3).t()
    mask = _mask((37, 3)).t()
    assert not (rewards.is_contiguous() or values.is_contiguous() or mask.is_contiguous())
    before = dict(LAUNCHES)
    adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    check_launched(before, ("gae",), count=1)
    want_adv, want_ret = _gae64(rewards, values, mask, 0.97, 0.9)
    assert_close_fp64(adv, want_adv, torch.float32, name="advantages")
    assert_close_fp64(ret, want_ret, torch.float32, name="returns")


def test_gae_not_differentiable() -> None:
    values = torch.randn(2, 5, requires_grad=True)
    adv, ret = gae(torch.randn(2, 5), values, torch.ones(2, 5))
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_bad_inputs() -> None:
    x = torch.zeros(2, 5)
    m = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="rewards"):
        gae(x.long(), x, m)
    with pytest.raises(TypeError, match="values"):
        gae(x, x.int(), m)
    with pytest.raises(ValueError, match=r"values\[5, 2\]"):
        gae(x, torch.zeros(5, 2), m)
    with pytest.raises(ValueError, match=r"mask\[2, 4\]"):
        gae(x, x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="values on meta"):
        gae(x, torch.zeros(2, 5, device="meta"), m)
