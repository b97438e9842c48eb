"""Per-token KL penalty estimators between the policy and the reference model.

``kind`` picks Schulman's estimator (http://joschu.net/blog/kl-approx.html):

- ``k1 = logp - ref_logp``
- ``k2 = 0.5 * (logp - ref_logp) ** 2``
- ``k3 = exp(r) - r - 1`` with ``r = ref_logp - logp`` clamped to ``[-log_ratio_clamp, log_ratio_clamp]``
  (10 by default, as verl's ``low_var_kl``), evaluated as ``expm1(r) - r`` (a series for small ``|r|``)
  so that tiny differences don't cancel. Unclamped, a token the policy pushed to logp -30 gives
  ``exp(30)`` ~ 1e13 and a skipped step; clamped it is at most ``exp(10) - 11`` ~ 2.2e4, and its
  gradient is 0 outside the clamp (``torch.clamp``'s, so every path agrees). k1 and k2 are polynomial
  and are not clamped.

One elementwise launch forward, one backward (which writes both gradients).
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

KINDS = ("k1", "k2", "k3")
_KIND_ID = {"k1": 0, "k2": 1, "k3": 2}
_BLOCK = 2048
LOG_RATIO_CLAMP = 10.0  # k3's default bound on |ref_logp - logp| (verl's)


# --------------------------------------------------------------------------- reference
def kl_penalty_reference(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1", log_ratio_clamp: float = LOG_RATIO_CLAMP
) -> torch.Tensor:
    """Per-token KL estimate, PyTorch reference (the CPU path and the benchmarks' baseline).

    Shapes: ``logp`` and ``ref_logp`` are ``[...]`` (any float dtype); returns float32 ``[...]``.
    Memory traffic: reads both inputs once and writes N fp32 values (eager PyTorch also
    materialises a few N-sized temporaries). k3 is evaluated in float64 internally so the
    reference stays exact for tiny ``|r|`` where fp32 ``expm1(r) - r`` keeps only ~1 ulp of ``r``.
    """
    if kind == "k1":
        return logp.float() - ref_logp.float()
    if kind == "k2":
        d = logp.float() - ref_logp.float()
        return 0.5 * d * d
    if kind == "k3":
        r = (ref_logp.double() - logp.double()).clamp(-log_ratio_clamp, log_ratio_clamp)
        return (torch.expm1(r) - r).float()
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# --------------------------------------------------------------------------- kernels
@triton.jit
def _expm1(x):
    """exp(x) - 1 accurate to a few ulp: Taylor series for |x| < 0.03, else exp(x) - 1."""
    series = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0)))))
    return tl.where(tl.abs(x) < 0.03, series, tl.exp(x) - 1.0)


@triton.jit
def _k3(r):
    """exp(r) - 1 - r without cancellation: series to r**9 for |r| < 0.25, else expm1(r) - r."""
    s = 1.0 / 40320.0 + r * (1.0 / 362880.0)
    s = 1.0 / 5040.0 + r * s
    s = 1.0 / 720.0 + r * s
    s = 1.0 / 120.0 + r * s
    s = 1.0 / 24.0 + r * s
    s = 1.0 / 6.0 + r * s
    s = 0.5 + r * s
    return tl.where(tl.abs(r) < 0.25, r * r * s, _expm1(r) - r)


@triton.jit
def _k3_clamped(logp, ref, clamp):
    """(k3, dk3/dlogp) with r = ref - logp clamped to [-clamp, clamp]; the gradient is 0 outside."""
    r = ref - logp
    rc = tl.minimum(tl.maximum(r, -clamp), clamp)
    inside = (r >= -clamp) & (r <= clamp)
    return _k3(rc), tl.where(inside, -_expm1(rc), 0.0)  # d/dlogp [expm1(r) - r] = -expm1(r)


@triton.jit
def _kl_fwd_kernel(logp_ptr, ref_ptr, out_ptr, n, clamp, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if KIND == 0:
        out = logp - ref
    elif KIND == 1:
        d = logp - ref
        out = 0.5 * d * d
    else:
        out, _ = _k3_clamped(logp, ref, clamp)
    tl.store(out_ptr + offs, out, mask=valid)


@triton.jit
def _kl_bwd_kernel(
    grad_out_ptr,
    logp_ptr,
    ref_ptr,
    grad_logp_ptr,
    grad_ref_ptr,
    n,
    clamp,
    KIND: tl.constexpr,
    NEED_LOGP: tl.constexpr,
    NEED_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(grad_out_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if KIND == 0:
        dlogp = g
    else:
        logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if KIND == 1:
            dlogp = g * (logp - ref)
        else:
            _, dk3 = _k3_clamped(logp, ref, clamp)
            dlogp = g * dk3
    if NEED_LOGP:
        tl.store(grad_logp_ptr + offs, dlogp, mask=valid)
    if NEED_REF:
        tl.store(grad_ref_ptr + offs, -dlogp, mask=valid)


# --------------------------------------------------------------------------- launchers
def _kl_fwd(logp: torch.Tensor, ref: torch.Tensor, kind_id: int, clamp: float) -> torch.Tensor:
    out = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    n = logp.numel()
    if n:
        record_launch("kl_fwd")
        _kl_fwd_kernel[(triton.cdiv(n, _BLOCK),)](logp, ref, out, n, clamp, KIND=kind_id, BLOCK=_BLOCK)
    return out


def _kl_bwd(
    grad_out: torch.Tensor,
    logp: torch.Tensor,
    ref: torch.Tensor,
    kind_id: int,
    clamp: float,
    need_logp: bool,
    need_ref: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    grad_logp = torch.empty_like(logp) if need_logp else None
    grad_ref = torch.empty_like(ref) if need_ref else None
    n = logp.numel()
    if n:
        record_launch("kl_bwd")
        _kl_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
            grad_out,
            logp,
            ref,
            grad_logp if need_logp else grad_out,  # dummy pointer when unused
            grad_ref if need_ref else grad_out,
            n,
            clamp,
            KIND=kind_id,
            NEED_LOGP=need_logp,
            NEED_REF=need_ref,
            BLOCK=_BLOCK,
        )
    return grad_logp, grad_ref


# --------------------------------------------------------------------------- autograd
class KLPenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp: torch.Tensor, ref_logp: torch.Tensor, kind_id: int, clamp: float) -> torch.Tensor:
        logp, ref_logp = logp.contiguous(), ref_logp.contiguous()
        ctx.save_for_backward(logp, ref_logp)
        ctx.kind_id, ctx.clamp = kind_id, clamp
        return _kl_fwd(logp, ref_logp, kind_id, clamp)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logp, ref_logp = ctx.saved_tensors
        need_logp, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_logp or need_ref):
            return None, None, None, None
        grad_logp, grad_ref = _kl_bwd(
            grad_out.contiguous(), logp, ref_logp, ctx.kind_id, ctx.clamp, need_logp, need_ref
        )
        return grad_logp, grad_ref, None, None


# --------------------------------------------------------------------------- public API
def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1", log_ratio_clamp: float = LOG_RATIO_CLAMP
) -> torch.Tensor:
    """Per-token KL penalty between policy and reference log-probs.

    Args:
        logp: ``[...]`` policy log-probs (fp32/bf16/fp16).
        ref_logp: ``[...]`` reference log-probs, same shape and device.
        kind: ``"k1"``, ``"k2"`` or ``"k3"`` (see module docstring).
        log_ratio_clamp: k3's bound on ``|ref_logp - logp|`` (> 0; ``math.inf``: unclamped).

    Returns:
        float32 ``[...]``, differentiable w.r.t. both inputs.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_log_ratio_clamp(log_ratio_clamp)
    check_float("logp", logp)
    check_float("ref_logp", ref_logp)
    check_same_device(logp=logp, ref_logp=ref_logp)
    check_same_shape(logp=logp, ref_logp=ref_logp)
    if use_triton(logp):
        return KLPenaltyFunction.apply(logp, ref_logp, _KIND_ID[kind], float(log_ratio_clamp))
    return kl_penalty_reference(logp, ref_logp, kind, log_ratio_clamp)


def check_log_ratio_clamp(log_ratio_clamp: float) -> None:
    """Raise unless ``log_ratio_clamp`` is a number > 0 (``math.inf`` allowed)."""
    if not isinstance(log_ratio_clamp, (int, float)) or not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0, got {log_ratio_clamp!r}")
