"""PPO clipped policy loss and clipped value loss, with their statistics.

Both losses share one layout: inputs are ``[..., T]`` (the last dim is the sequence; all
leading dims are flattened into sequences), ``mask`` is bool, integer or float (a float
mask weights tokens). The scalar loss is one of three reductions:

- ``token_mean``: ``sum(loss * mask) / sum(mask)``; 0 when every token is masked.
- ``seq_mean_token_mean``: mean over each sequence's masked tokens, then mean over
  sequences. Sequences with no unmasked token are excluded from the outer mean; 0 if
  every sequence is empty.
- ``seq_mean_token_sum``: sum of each sequence's masked token losses, then mean over the
  sequences that have at least one unmasked token (empty sequences excluded, as above).

``ppo_policy_loss(..., kl=KLLossTerm(ref_logp, coef, kind))`` adds ``coef * kl_t`` per token
(``tritonrlhf.kernels.kl``'s k1/k2/k3 estimate of KL(policy || reference), GRPO's loss term) before the
reduction, inside the same kernels: the launch count is unchanged.

``loss_type`` picks the policy objective, each in the same kernels (``LOSS`` constexpr):
``ppo`` (the clipped token ratio), ``gspo`` (the clipped sequence ratio, the geometric mean of the
token ratios: one more forward launch computes each sequence's mean log-ratio first) and
``cispo`` (REINFORCE weighted by the clipped, stop-gradient token ratio). The formulas are in
``ppo_policy_loss_reference``.

Masked tokens never contribute, even when their inputs are inf/NaN padding. Statistics
are masked means (0 when nothing is unmasked), returned as 0-d float32 tensors without a
host sync.

Launches: forward is two Triton launches (a streaming kernel writing per-block partial
sums, then a one-program kernel that reduces them deterministically and writes the loss,
the statistics and the per-sequence gradient weights); backward is one launch. No atomics
and no memset, so results are bitwise reproducible.

The PyTorch references and ``KLLossTerm`` live in ``kernels/ppo_loss_reference.py``.
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
from tritonrlhf.kernels.kl import _KIND_ID, KINDS, _k3, _k3_clamped, check_log_ratio_clamp
from tritonrlhf.kernels.ppo_loss_reference import (  # noqa: F401 (re-exported)
    LOSS_TYPES,
    REDUCTIONS,
    KLLossTerm,
    ppo_policy_loss_reference,
    ppo_value_loss_reference,
)

_NSTAT = 8  # partial-sum columns: count, loss, clipped, stat_a, stat_b, dual, max, kl


# --------------------------------------------------------------------------- kernels
@triton.jit
def _token_terms(x, old, y, seq, p0, p1, p2, IS_VALUE: tl.constexpr, FLAG: tl.constexpr, LOSS: tl.constexpr):
    """Per-token (loss, dloss/dx, clipped, stat_a, stat_b, dual, max_val), all fp32 (flags 0/1).

    Policy: x=logp, old=old_logp, y=advantages, p0=1-clip_low, p1=1+clip_high, p2=dual
    clip, FLAG=has dual clip, LOSS 0 ppo / 1 gspo (seq: the row's mean log-ratio, [BLOCK_S, 1])
    / 2 cispo. Value: x=values, old=old_values, y=returns, p0=clip, FLAG=has clip.
    """
    if IS_VALUE:
        diff = x - y
        l1 = diff * diff
        if FLAG:
            v_clip = old + tl.minimum(tl.maximum(x - old, -p0), p0)
            l2 = (v_clip - y) * (v_clip - y)
            clipped = (l2 > l1).to(tl.float32)
            loss = 0.5 * tl.maximum(l1, l2)
            coef = tl.where(l2 > l1, 0.0, diff)
        else:
            clipped = tl.zeros_like(l1)
            loss = 0.5 * l1
            coef = diff
        dual = tl.zeros_like(l1)
        stat_a = x
        stat_b = y
        max_val = x
    else:
        d = x - old
        if LOSS == 1:  # GSPO: the sequence ratio on every token; d s_t / d logp_t = s (sg(s) pi / sg(pi))
            ratio = tl.exp(seq + tl.zeros_like(d))
        else:
            ratio = tl.exp(d)
        if LOSS == 2:  # CISPO: -sg(clamp(r)) * A * logp; the clamped weight keeps every gradient
            w_is = tl.minimum(tl.maximum(ratio, p0), p1)
            loss = -y * w_is * x
            coef = -y * w_is
            clipped = ((ratio < p0) | (ratio > p1)).to(tl.float32)
        else:
            l1 = -y * ratio
            l2 = -y * tl.minimum(tl.maximum(ratio, p0), p1)
            clipped = (l2 > l1).to(tl.float32)
            loss = tl.maximum(l1, l2)
            coef = tl.where(l2 > l1, 0.0, l1)  # d(-A * ratio)/dlogp = -A * ratio
        if FLAG:
            l3 = -y * p2
            is_dual = (y < 0.0) & (loss > l3)
            loss = tl.where(is_dual, l3, loss)
            coef = tl.where(is_dual, 0.0, coef)
            dual = is_dual.to(tl.float32)
        else:
            dual = tl.zeros_like(ratio)
        stat_a = _k3(d)
        stat_b = ratio
        max_val = ratio
    return loss, coef, clipped, stat_a, stat_b, dual, max_val


@triton.jit
def _kl_loss_term(x, ref, kl_clamp, KL_KIND: tl.constexpr):
    """Per-token (kl, dkl/dx) of the policy's KL term, x = logp: k1, k2 or k3 (``tritonrlhf.kernels.kl``;
    k3's log-ratio clamped to ``[-kl_clamp, kl_clamp]``)."""
    if KL_KIND == 0:
        kl = x - ref
        dkl = tl.full(x.shape, 1.0, tl.float32)
    elif KL_KIND == 1:
        kl = 0.5 * (x - ref) * (x - ref)
        dkl = x - ref
    else:
        kl, dkl = _k3_clamped(x, ref, kl_clamp)
    return kl, dkl


@triton.jit
def _gspo_seq_kernel(x_ptr, old_ptr, mask_ptr, seq_ptr, S, T, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
    """seq[s] = masked mean over t of (logp - old_logp)[s, t] (0 for an empty row): GSPO's log ratio."""
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < S
    num = tl.zeros([BLOCK_S], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_S], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        inb = row_ok[:, None] & (cols < T)[None, :]
        offs = rows.to(tl.int64)[:, None] * T + cols[None, :]
        m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        on = m != 0.0
        num += tl.sum(tl.where(on, (tl.where(on, x, 0.0) - tl.where(on, old, 0.0)) * m, 0.0), axis=1)
        cnt += tl.sum(m, axis=1)
    tl.store(seq_ptr + rows, tl.where(cnt > 0.0, num / tl.where(cnt > 0.0, cnt, 1.0), 0.0), mask=row_ok)


@triton.jit
def _ppo_fwd_kernel(
    x_ptr,
    old_ptr,
    y_ptr,
    mask_ptr,
    ref_ptr,
    seq_ptr,
    part_ptr,
    rowpart_ptr,
    S,
    T,
    n_tb,
    p0,
    p1,
    p2,
    kl_coef,
    kl_clamp,
    IS_VALUE: tl.constexpr,
    FLAG: tl.constexpr,
    KL_KIND: tl.constexpr,
    SEQ: tl.constexpr,
    LOSS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = (rows < S)[:, None] & (cols < T)[None, :]
    offs = rows.to(tl.int64)[:, None] * T + cols[None, :]
    m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    on = m != 0.0  # zero masked positions so inf/NaN padding never enters the math
    x, old, y = tl.where(on, x, 0.0), tl.where(on, old, 0.0), tl.where(on, y, 0.0)
    if LOSS == 1:
        seq = tl.load(seq_ptr + rows, mask=rows < S, other=0.0)[:, None]
    else:
        seq = 0.0
    loss, coef, clipped, stat_a, stat_b, dual, max_val = _token_terms(
        x, old, y, seq, p0, p1, p2, IS_VALUE, FLAG, LOSS
    )
    kl = tl.zeros_like(x)
    if KL_KIND >= 0:  # the KL term against the reference (KL_KIND -1: none)
        ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        kl, _ = _kl_loss_term(x, tl.where(on, ref, 0.0), kl_clamp, KL_KIND)
        loss = loss + kl_coef * kl
    lm = tl.where(on, loss * m, 0.0)
    base = part_ptr + (pid_s * n_tb + pid_t) * 8
    tl.store(base + 0, tl.sum(tl.sum(m, axis=1), axis=0))
    tl.store(base + 1, tl.sum(tl.sum(lm, axis=1), axis=0))
    tl.store(base + 2, tl.sum(tl.sum(tl.where(on, clipped * m, 0.0), axis=1), axis=0))
    tl.store(base + 3, tl.sum(tl.sum(tl.where(on, stat_a * m, 0.0), axis=1), axis=0))
    tl.store(base + 4, tl.sum(tl.sum(tl.where(on, stat_b * m, 0.0), axis=1), axis=0))
    tl.store(base + 5, tl.sum(tl.sum(tl.where(on, dual * m, 0.0), axis=1), axis=0))
    tl.store(base + 6, tl.max(tl.max(tl.where(on, max_val, float("-inf")), axis=1), axis=0))
    tl.store(base + 7, tl.sum(tl.sum(tl.where(on, kl * m, 0.0), axis=1), axis=0))
    if SEQ:
        row_ok = rows < S
        tl.store(rowpart_ptr + rows * n_tb + pid_t, tl.sum(lm, axis=1), mask=row_ok)
        tl.store(rowpart_ptr + S * n_tb + rows * n_tb + pid_t, tl.sum(m, axis=1), mask=row_ok)


@triton.jit
def _ppo_finalize_kernel(
    part_ptr,
    n_part,
    rowpart_ptr,
    S,
    n_tb,
    rowscale_ptr,
    loss_ptr,
    stats_ptr,
    REDUCTION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    k = tl.arange(0, 8)
    acc_sum = tl.zeros([8], dtype=tl.float32)
    acc_max = tl.full([8], float("-inf"), dtype=tl.float32)
    for p in range(0, n_part, BLOCK_P):
        pr = p + tl.arange(0, BLOCK_P)
        ok = (pr < n_part)[:, None] & (k < 8)[None, :]
        tile = tl.load(part_ptr + pr[:, None] * 8 + k[None, :], mask=ok, other=0.0)
        acc_sum += tl.sum(tile, axis=0)
        acc_max = tl.maximum(acc_max, tl.max(tl.where(ok, tile, float("-inf")), axis=0))
    count = tl.sum(tl.where(k == 0, acc_sum, 0.0), axis=0)
    has = count > 0.0
    den = tl.where(has, count, 1.0)
    if REDUCTION == 0:
        loss = tl.sum(tl.where(k == 1, acc_sum, 0.0), axis=0) / den
        inv_den = 1.0 / den
    else:
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        nvalid = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r0 in range(0, S, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_ok = rows < S
            rs = tl.zeros([BLOCK_R], dtype=tl.float32)
            rc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for j in range(0, n_tb):
                rs += tl.load(rowpart_ptr + rows * n_tb + j, mask=row_ok, other=0.0)
                rc += tl.load(rowpart_ptr + S * n_tb + rows * n_tb + j, mask=row_ok, other=0.0)
            valid = rc > 0.0
            if REDUCTION == 1:
                rc_safe = tl.where(valid, rc, 1.0)
                total += tl.where(valid, rs / rc_safe, 0.0)
                scale = tl.where(valid, 1.0 / rc_safe, 0.0)
            else:
                total += tl.where(valid, rs, 0.0)
                scale = tl.where(valid, 1.0, 0.0)
            tl.store(rowscale_ptr + rows, scale, mask=row_ok)
            nvalid += valid.to(tl.float32)
        nden = tl.maximum(tl.sum(nvalid, axis=0), 1.0)
        loss = tl.sum(total, axis=0) / nden
        inv_den = 1.0 / nden
    # stats: 0 clipped, 1 stat_a, 2 stat_b, 3 dual (masked means), 4 max, 5 backward scale, 6 kl.
    tl.store(stats_ptr + 0, tl.sum(tl.where(k == 2, acc_sum, 0.0), axis=0) / den)
    tl.store(stats_ptr + 1, tl.sum(tl.where(k == 3, acc_sum, 0.0), axis=0) / den)
    tl.store(stats_ptr + 2, tl.sum(tl.where(k == 4, acc_sum, 0.0), axis=0) / den)
    tl.store(stats_ptr + 3, tl.sum(tl.where(k == 5, acc_sum, 0.0), axis=0) / den)
    vmax = tl.max(tl.where(k == 6, acc_max, float("-inf")), axis=0)
    tl.store(stats_ptr + 4, tl.where(has, vmax, 0.0))
    tl.store(stats_ptr + 5, inv_den)
    tl.store(stats_ptr + 6, tl.sum(tl.where(k == 7, acc_sum, 0.0), axis=0) / den)
    tl.store(loss_ptr, loss)


@triton.jit
def _ppo_bwd_kernel(
    g_ptr,
    stats_ptr,
    rowscale_ptr,
    x_ptr,
    old_ptr,
    y_ptr,
    mask_ptr,
    ref_ptr,
    seq_ptr,
    grad_ptr,
    S,
    T,
    p0,
    p1,
    p2,
    kl_coef,
    kl_clamp,
    IS_VALUE: tl.constexpr,
    FLAG: tl.constexpr,
    KL_KIND: tl.constexpr,
    SEQ: tl.constexpr,
    LOSS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < S
    inb = row_ok[:, None] & (cols < T)[None, :]
    offs = rows.to(tl.int64)[:, None] * T + cols[None, :]
    m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    on = m != 0.0  # zero masked positions so inf/NaN padding never enters the math
    x, old, y = tl.where(on, x, 0.0), tl.where(on, old, 0.0), tl.where(on, y, 0.0)
    if LOSS == 1:
        seq = tl.load(seq_ptr + rows, mask=row_ok, other=0.0)[:, None]
    else:
        seq = 0.0
    _, coef, _, _, _, _, _ = _token_terms(x, old, y, seq, p0, p1, p2, IS_VALUE, FLAG, LOSS)
    if KL_KIND >= 0:
        ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        _, dkl = _kl_loss_term(x, tl.where(on, ref, 0.0), kl_clamp, KL_KIND)
        coef = coef + kl_coef * dkl
    scale = tl.load(g_ptr).to(tl.float32) * tl.load(stats_ptr + 5)
    if SEQ:
        w = scale * tl.load(rowscale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    else:
        w = scale
    grad = tl.where(on, (w * m) * coef, 0.0)
    tl.store(grad_ptr + offs, grad, mask=inb)


# --------------------------------------------------------------------------- launchers
def _blocks(S: int, T: int) -> tuple[int, int]:
    block_t = min(triton.next_power_of_2(T), 1024)
    block_s = min(triton.next_power_of_2(S), max(1, 4096 // block_t))
    return block_s, block_t


def _gspo_seq(x, old, mask) -> torch.Tensor:
    S, T = x.shape
    block_t = min(triton.next_power_of_2(T), 1024)
    block_s = min(triton.next_power_of_2(S), max(1, 4096 // block_t))
    seq = torch.empty((S,), dtype=torch.float32, device=x.device)
    record_launch("ppo_policy_loss_gspo_seq")
    _gspo_seq_kernel[(triton.cdiv(S, block_s),)](
        x, old, mask, seq, S, T, BLOCK_S=block_s, BLOCK_T=block_t, num_warps=4
    )
    return seq


def _loss_fwd(
    x, old, y, mask, ref, seq, params, is_value: bool, flag: bool, reduction_id: int, kl_cfg, loss_id
):
    S, T = x.shape
    block_s, block_t = _blocks(S, T)
    grid = (triton.cdiv(S, block_s), triton.cdiv(T, block_t))
    n_tb = grid[1]
    n_part = grid[0] * grid[1]
    seq_red = reduction_id != 0
    dev = x.device
    part = torch.empty((n_part, _NSTAT), dtype=torch.float32, device=dev)
    rowpart = torch.empty((2, S, n_tb) if seq_red else (1,), dtype=torch.float32, device=dev)
    rowscale = torch.empty((S,) if seq_red else (1,), dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    stats = torch.empty((_NSTAT,), dtype=torch.float32, device=dev)
    name = "ppo_value_loss" if is_value else "ppo_policy_loss"
    record_launch(f"{name}_fwd")
    _ppo_fwd_kernel[grid](
        x, old, y, mask, x if ref is None else ref, x if seq is None else seq, part, rowpart, S, T, n_tb,
        *params, kl_cfg[0], kl_cfg[2], IS_VALUE=is_value, FLAG=flag, KL_KIND=kl_cfg[1], SEQ=seq_red,
        LOSS=loss_id, BLOCK_S=block_s, BLOCK_T=block_t, num_warps=8,
    )  # fmt: skip
    record_launch(f"{name}_finalize")
    _ppo_finalize_kernel[(1,)](
        part, n_part, rowpart, S, n_tb, rowscale, loss, stats,
        REDUCTION=reduction_id, BLOCK_P=256, BLOCK_R=1024, num_warps=4,
    )  # fmt: skip
    return loss, stats, rowscale


def _loss_bwd(
    g, stats, rowscale, x, old, y, mask, ref, seq, params, is_value: bool, flag: bool, reduction_id: int,
    kl_cfg, loss_id,
):  # fmt: skip
    S, T = x.shape
    block_s, block_t = _blocks(S, T)
    grid = (triton.cdiv(S, block_s), triton.cdiv(T, block_t))
    grad = torch.empty_like(x)
    record_launch("ppo_value_loss_bwd" if is_value else "ppo_policy_loss_bwd")
    _ppo_bwd_kernel[grid](
        g, stats, rowscale, x, old, y, mask, x if ref is None else ref, x if seq is None else seq, grad,
        S, T, *params, kl_cfg[0], kl_cfg[2], IS_VALUE=is_value, FLAG=flag, KL_KIND=kl_cfg[1],
        SEQ=reduction_id != 0, LOSS=loss_id, BLOCK_S=block_s, BLOCK_T=block_t, num_warps=8,
    )  # fmt: skip
    return grad


# --------------------------------------------------------------------------- autograd
class PPOLossFunction(torch.autograd.Function):
    """Shared autograd wrapper for both losses; differentiable w.r.t. ``x`` only.

    ``ref`` and ``kl_cfg = (coef, kind id, k3 log-ratio clamp)``: the policy loss's KL term (``ref`` None,
    kind -1: none). ``loss_id``: the index of the policy objective in ``LOSS_TYPES`` (GSPO's sequence
    log-ratios are computed once in the forward and saved for the backward).
    """

    @staticmethod
    def forward(
        ctx, x, old, y, mask, ref, params, is_value, flag, reduction_id, kl_cfg=(0.0, -1, 0.0), loss_id=0
    ):
        seq = _gspo_seq(x, old, mask) if loss_id == 1 else None
        loss, stats, rowscale = _loss_fwd(
            x, old, y, mask, ref, seq, params, is_value, flag, reduction_id, kl_cfg, loss_id
        )
        ctx.save_for_backward(x, old, y, mask, ref, seq, stats, rowscale)
        ctx.cfg = (params, is_value, flag, reduction_id, kl_cfg, loss_id)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        x, old, y, mask, ref, seq, stats, rowscale = ctx.saved_tensors
        grad = _loss_bwd(grad_loss.contiguous(), stats, rowscale, x, old, y, mask, ref, seq, *ctx.cfg)
        return grad, None, None, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- public API
def _validate(names: tuple[str, str, str], tensors, mask, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, t in zip(names, tensors):
        check_float(name, t)
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be bool, integer or float, got {mask.dtype}")
    kw = dict(zip(names, tensors), mask=mask)
    check_same_device(**kw)
    check_same_shape(**kw)
    if tensors[0].dim() == 0 or tensors[0].numel() == 0:
        raise ValueError(
            f"inputs must be non-empty with at least one dim, got shape {list(tensors[0].shape)}"
        )


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1]).contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _stat_views(stats: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {name: stats[i] for i, name in enumerate(names) if name}


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    reduction: str = "token_mean",
    kl: KLLossTerm | None = None,
    loss_type: str = "ppo",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (optionally asymmetric and dual-clipped), or GSPO's or CISPO's, and its stats.

    Per token: ``ratio = exp(logp - old_logp)``,
    ``loss = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))``
    (``clip_high=None`` means ``clip_low``); with ``dual_clip=c``, tokens with ``A < 0`` are
    capped at ``-A * c``. ``kl``: add ``kl.coef * kl_t`` per token, the KL term against the
    reference fused into the same launches. ``loss_type``: ``ppo``, ``gspo`` (the ratio is the
    sequence's geometric mean of token ratios, clipped per sequence with ``clip_low``/``clip_high``)
    or ``cispo`` (``-sg(clamp(ratio, 1 - clip_low, 1 + clip_high)) * A * logp``); see
    :func:`ppo_policy_loss_reference`. See the module docstring for the reductions.

    Args:
        logp, old_logp, advantages: ``[..., T]`` float tensors.
        mask: ``[..., T]`` bool, integer or float.
        kl: optional :class:`KLLossTerm` (``ref_logp`` ``[..., T]``, ``coef``, ``kind``).

    Returns:
        ``(loss, stats)``: 0-d float32 loss, differentiable w.r.t. ``logp`` only, and 0-d
        float32 stats ``clipfrac``, ``approx_kl``, ``ratio_mean``, ``ratio_max``,
        ``dual_clipfrac`` and, with ``kl``, ``kl_loss`` (see :func:`ppo_policy_loss_reference`).
    """
    _validate(("logp", "old_logp", "advantages"), (logp, old_logp, advantages), mask, reduction)
    if kl is not None:
        _validate_kl(kl, logp)
    if clip_low < 0 or (clip_high is not None and clip_high < 0):
        raise ValueError(f"clip_low/clip_high must be >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if dual_clip is not None and loss_type != "ppo":
        raise ValueError(f"dual_clip is PPO's; loss_type={loss_type!r} takes none")
    if not use_triton(logp):
        return ppo_policy_loss_reference(
            logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, reduction, kl, loss_type
        )
    clip_high = clip_low if clip_high is None else clip_high
    params = (1.0 - clip_low, 1.0 + clip_high, float(dual_clip or 0.0))
    x, old, y, m = (_as_2d(t) for t in (logp, old_logp, advantages, mask))
    ref = None if kl is None else _as_2d(kl.ref_logp)
    kl_cfg = (0.0, -1, 0.0) if kl is None else (float(kl.coef), _KIND_ID[kl.kind], float(kl.log_ratio_clamp))
    loss, stats = PPOLossFunction.apply(
        x, old, y, m, ref, params, False, dual_clip is not None, REDUCTIONS.index(reduction), kl_cfg,
        LOSS_TYPES.index(loss_type),
    )  # fmt: skip
    names = ("clipfrac", "approx_kl", "ratio_mean", "dual_clipfrac", "ratio_max", "", "kl_loss" if kl else "")
    return loss, _stat_views(stats, names)


def _validate_kl(kl: KLLossTerm, logp: torch.Tensor) -> None:
    if not isinstance(kl, KLLossTerm):
        raise TypeError(f"kl must be a KLLossTerm, got {type(kl).__name__}")
    if kl.kind not in KINDS:
        raise ValueError(f"kl.kind must be one of {KINDS}, got {kl.kind!r}")
    if not isinstance(kl.coef, (int, float)) or not float("-inf") < float(kl.coef) < float("inf"):
        raise ValueError(f"kl.coef must be a finite number, got {kl.coef!r}")
    check_log_ratio_clamp(kl.log_ratio_clamp)
    check_float("kl.ref_logp", kl.ref_logp)
    check_same_device(logp=logp, **{"kl.ref_logp": kl.ref_logp})
    check_same_shape(logp=logp, **{"kl.ref_logp": kl.ref_logp})


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    reduction: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * max((v - R)^2, (v_clip - R)^2)`` and its stats.

    ``v_clip = old_values + clamp(values - old_values, -clip, clip)``; ``clip=None`` gives
    the unclipped ``0.5 * (v - R)^2``. See the module docstring for the reductions.

    Args:
        values, old_values, returns: ``[..., T]`` float tensors.
        mask: ``[..., T]`` bool, integer or float.

    Returns:
        ``(loss, stats)``: 0-d float32 loss, differentiable w.r.t. ``values`` only, and 0-d
        float32 stats ``vf_clipfrac``, ``values_mean``, ``returns_mean``, ``values_max``.
    """
    _validate(("values", "old_values", "returns"), (values, old_values, returns), mask, reduction)
    if clip is not None and clip < 0:
        raise ValueError(f"clip must be >= 0 or None, got {clip}")
    if not use_triton(values):
        return ppo_value_loss_reference(values, old_values, returns, mask, clip, reduction)
    params = (float(clip or 0.0), 0.0, 0.0)
    x, old, y, m = (_as_2d(t) for t in (values, old_values, returns, mask))
    loss, stats = PPOLossFunction.apply(
        x, old, y, m, None, params, True, clip is not None, REDUCTIONS.index(reduction)
    )
    names = ("vf_clipfrac", "values_mean", "returns_mean", "", "values_max")
    return loss, _stat_views(stats, names)
