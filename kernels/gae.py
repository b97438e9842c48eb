"""Generalized advantage estimation (GAE) over masked token sequences.

Exact semantics per row (the last dim is time; masked tokens are skipped and do not break
the recursion)::

    nextvalue = 0; last = 0
    for t from T-1 down to 0:
        if mask[t]:
            delta = r[t] + gamma * nextvalue - V[t]
            last = delta + gamma * lam * last
            nextvalue = V[t]
            A[t] = last
        else:
            A[t] = 0
    returns = (A + V) * mask

The kernel runs one program per row and walks the row right to left in chunks. Each step
is an affine map on the state ``s = (last, nextvalue)``::

    unmasked: s' = [[gamma*lam, gamma], [0, 0]] @ s + (r - V, V)
    masked:   s' = s                                  (the identity)

Maps compose associatively, so each chunk is one ``tl.associative_scan`` over the
5-tuple ``(a, b, d, c1, c2)`` of an upper-triangular map ``[[a, b], [0, d]]`` plus offset
``(c1, c2)``, applied to the state carried in from the chunk to its right. One launch for
the whole batch; outputs are not differentiable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonrlhf.kernels._dispatch import (
    check_float,
    check_same_device,
    check_same_shape,
    record_launch,
    use_triton,
)


# --------------------------------------------------------------------------- reference
@torch.no_grad()
def gae_reference(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns, PyTorch reference (CPU path and benchmarks' baseline).

    Shapes: ``rewards``, ``values``, ``mask`` are ``[..., T]``; returns float32
    ``(advantages, returns)`` of the same shape. Computed in float32 by a Python loop over T,
    vectorised over the rows (T small launches of [rows] tensors; it reads the inputs and
    writes both outputs once, but is launch-bound on GPU).
    """
    shape = rewards.shape
    r = rewards.reshape(-1, shape[-1]).float()
    v = values.reshape(-1, shape[-1]).float()
    m = mask.reshape(-1, shape[-1])
    on = m != 0
    adv = torch.zeros_like(r)
    last = r.new_zeros(r.shape[0])
    nextv = r.new_zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):
        on_t = on[:, t]
        cand = r[:, t] + gamma * nextv - v[:, t] + (gamma * lam) * last
        last = torch.where(on_t, cand, last)
        nextv = torch.where(on_t, v[:, t], nextv)
        adv[:, t] = torch.where(on_t, cand, 0.0)
    returns = torch.where(on, (adv + v) * m.float(), 0.0)
    return adv.reshape(shape), returns.reshape(shape)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _compose(a1, b1, d1, c1, e1, a2, b2, d2, c2, e2):
    """Map 1 then map 2, each ``s -> [[a, b], [0, d]] @ s + (c, e)``."""
    return a2 * a1, a2 * b1 + b2 * d1, d2 * d1, a2 * c1 + b2 * e1 + c2, d2 * e1 + e2


@triton.jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, T, gamma, gamma_lam, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * T
    idx = tl.arange(0, BLOCK)
    carry_last = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)
    carry_next = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)
    for start in range(0, T, BLOCK):
        t = T - 1 - start - idx  # reversed index: lane 0 is the rightmost position of the chunk
        ok = t >= 0
        offs = base + tl.where(ok, t, 0)
        mval = tl.load(m_ptr + offs, mask=ok, other=0).to(tl.float32)
        on = mval != 0.0
        r = tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        a = tl.where(on, gamma_lam, 1.0)
        b = tl.where(on, gamma, 0.0)
        d = tl.where(on, 0.0, 1.0)
        c = tl.where(on, r - v, 0.0)
        e = tl.where(on, v, 0.0)
        a, b, d, c, e = tl.associative_scan((a, b, d, c, e), 0, _compose)
        last = a * carry_last + b * carry_next + c
        nextv = d * carry_next + e
        adv = tl.where(on, last, 0.0)
        tl.store(adv_ptr + offs, adv, mask=ok)
        tl.store(ret_ptr + offs, tl.where(on, (adv + v) * mval, 0.0), mask=ok)
        is_end = idx == BLOCK - 1
        carry_last = tl.sum(tl.where(is_end, last, 0.0), axis=0)
        carry_next = tl.sum(tl.where(is_end, nextv, 0.0), axis=0)


# --------------------------------------------------------------------------- launchers
def _gae_launch(r: torch.Tensor, v: torch.Tensor, m: torch.Tensor, gamma: float, lam: float):
    rows, T = r.shape
    adv = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    ret = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    block = min(triton.next_power_of_2(T), 1024)
    record_launch("gae")
    _gae_kernel[(rows,)](r, v, m, adv, ret, T, float(gamma), float(gamma * lam), BLOCK=block, num_warps=4)
    return adv, ret


# --------------------------------------------------------------------------- public API
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked GAE (see the module docstring for the exact recursion).

    Args:
        rewards, values: ``[..., T]`` float tensors (usually ``[B, T]``).
        mask: ``[..., T]`` bool, integer or float; nonzero marks a real token.
        gamma, lam: discount and GAE lambda.

    Returns:
        float32 ``(advantages, returns)``, both ``[..., T]``; not differentiable.
    """
    check_float("rewards", rewards)
    check_float("values", values)
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be bool, integer or float, got {mask.dtype}")
    check_same_device(rewards=rewards, values=values, mask=mask)
    check_same_shape(rewards=rewards, values=values, mask=mask)
    if rewards.dim() == 0:
        raise ValueError("rewards must have a time dimension, got a 0-d tensor")
    if not use_triton(rewards) or rewards.numel() == 0:
        return gae_reference(rewards, values, mask, gamma, lam)
    shape = rewards.shape
    r, v, m = (t.detach().reshape(-1, shape[-1]).contiguous() for t in (rewards, values, mask))
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    adv, ret = _gae_launch(r, v, m, gamma, lam)
    return adv.reshape(shape), ret.reshape(shape)
