"""Token log-probabilities (and entropy) straight from hidden states and the LM head.

``linear_logprobs(hidden[..., H], weight[V, H], targets[...])`` equals
``logprobs_from_logits(hidden @ weight.T, targets)`` but never materializes the
[N, V] logits: rows are processed in chunks, each chunk's logits made by one
matmul (cuBLAS on GPU) and turned into log-probs by the fused kernel of
``kernels.logprobs``. Backward recomputes each chunk's logits and the kernel
overwrites them in place with d(loss)/d(logits) from the saved per-row softmax
statistics and the per-token upstream gradients (arbitrary per token, so unlike a
scalar-loss fused linear cross-entropy the gradient cannot be formed in forward).
This is what lets the actor train with 150k-token vocabularies.

Layout (Liger-Kernel ops style): reference, kernels (reused from
``kernels.logprobs``), chunking helpers, autograd Function, public API.

Chunk size: ``rows = CHUNK_BYTES // (V * element_size(hidden.dtype))``, at least 1,
rounded down to a multiple of 64 once it reaches 64, at most N. With the default
256 MiB budget a 151936 vocabulary in bf16 gives 832-row chunks.
"""

from __future__ import annotations

import torch

from kernels._dispatch import check_float, check_same_device, use_triton
from kernels.logprobs import (
    LogprobOptions,
    RowStats,
    check_targets,
    check_temperature,
    flat_index,
    logprobs_bwd,
    logprobs_from_logits_reference,
    logprobs_fwd,
)

# Budget for one chunk of logits, in bytes (see the module docstring).
CHUNK_BYTES = 256 * 2**20

# ---------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked eager PyTorch ``logprobs_from_logits_reference(hidden @ weight.T, targets, ...)``.

    Shapes: ``hidden`` [..., H], ``weight`` [V, H] (same float dtype), ``targets``
    [...] (integer). Returns ``logp`` [...] float32, or ``(logp, entropy)``.
    Differentiable w.r.t. ``hidden`` and ``weight``.

    Memory: never holds the [N, V] logits. Per chunk of ``rows`` (module docstring)
    it holds the chunk's logits plus the eager reference's fp32 temporaries, about
    5 * rows * V * 4 bytes at peak; backward recomputes the chunk's logits and
    runs autograd through the reference on them. Traffic: reads ``weight`` (V*H)
    once per chunk in forward and twice per chunk in backward. This is the CPU path
    and the "chunked eager" benchmark baseline.
    """
    hidden2d, targets1d = _check_inputs(hidden, weight, targets, temperature)
    logp, entropy = _LinearLogprobsFunction.apply(hidden2d, weight, targets1d, float(temperature), False)
    return _finish(logp, entropy, hidden.shape[:-1], return_entropy)


# ---------------------------------------------------------------------------
# 2./3. Kernels and launch wrappers: ``logprobs_fwd`` / ``logprobs_bwd`` from
# kernels.logprobs, launched once per chunk (LAUNCHES names "logprobs_fwd",
# "logprobs_bwd").
# ---------------------------------------------------------------------------


def chunk_rows(n_rows: int, vocab: int, element_size: int) -> int:
    """Rows per chunk so one [rows, V] logits chunk takes about CHUNK_BYTES."""
    rows = max(1, CHUNK_BYTES // (vocab * element_size))
    if rows >= 64:
        rows -= rows % 64  # tensor-core friendly M for the chunk matmuls
    return min(rows, max(n_rows, 1))


def _reference_dlogits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
) -> torch.Tensor:
    """d(loss)/d(logits) for one chunk by autograd through the eager reference."""
    with torch.enable_grad():
        x = logits.detach().requires_grad_()
        logp, entropy = logprobs_from_logits_reference(x, targets, temperature, return_entropy=True)
        pairs = [(o, g) for o, g in ((logp, grad_logp), (entropy, grad_entropy)) if g is not None]
        (dlogits,) = torch.autograd.grad([o for o, _ in pairs], x, [g for _, g in pairs])
    return dlogits


def _accumulate_grad_weight(grad_weight: torch.Tensor, dlogits: torch.Tensor, hidden: torch.Tensor) -> None:
    """``grad_weight += dlogits.T @ hidden``.

    ``grad_weight`` is fp32 (fp64 for fp64 weights). For fp32/fp64 inputs this is
    one in-place addmm. For bf16/fp16 each product is computed by the matmul with
    fp32 accumulation, rounded once to the input dtype, then added in fp32; it is
    split along V so that temporary stays within CHUNK_BYTES.
    """
    if dlogits.dtype == grad_weight.dtype:
        grad_weight.addmm_(dlogits.T, hidden)
        return
    vocab, width = grad_weight.shape
    block = max(1, CHUNK_BYTES // (width * dlogits.element_size()))
    for v0 in range(0, vocab, block):
        grad_weight[v0 : v0 + block] += dlogits[:, v0 : v0 + block].T @ hidden


# ---------------------------------------------------------------------------
# 4. Autograd Function
# ---------------------------------------------------------------------------


class _LinearLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], targets [N] -> (logp [N], entropy [N]) fp32, chunked."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, use_kernel: bool):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        rows = chunk_rows(n_rows, vocab, hidden.element_size())
        f32 = {"device": hidden.device, "dtype": torch.float32}
        logp, entropy = torch.empty(n_rows, **f32), torch.empty(n_rows, **f32)
        row_max = torch.empty(n_rows, **f32) if use_kernel else None
        log_s = torch.empty(n_rows, **f32) if use_kernel else None
        for start in range(0, n_rows, rows):
            sl = slice(start, start + rows)
            logits = hidden[sl] @ weight.T
            if use_kernel:
                logprobs_fwd(
                    logits,
                    targets[sl],
                    LogprobOptions(temperature),
                    (logp[sl], entropy[sl], row_max[sl], log_s[sl]),
                )
            else:
                logp[sl], entropy[sl] = logprobs_from_logits_reference(logits, targets[sl], temperature, True)
        ctx.save_for_backward(hidden, weight, targets, row_max, log_s, entropy)
        ctx.temperature, ctx.use_kernel, ctx.rows = temperature, use_kernel, rows
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, row_max, log_s, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if (grad_logp is None and grad_entropy is None) or not (need_hidden or need_weight):
            return None, None, None, None, None
        n_rows, rows = hidden.shape[0], ctx.rows
        grad_hidden = (
            torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype) if need_hidden else None
        )
        grad_weight = None
        if need_weight:
            acc_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
            grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=acc_dtype)
        grad_logp = None if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
        for start in range(0, n_rows, rows):
            sl = slice(start, start + rows)
            g_logp = None if grad_logp is None else grad_logp[sl]
            g_ent = None if grad_entropy is None else grad_entropy[sl]
            logits = hidden[sl] @ weight.T
            if ctx.use_kernel:
                stats = RowStats(row_max[sl], log_s[sl], entropy[sl])
                opts = LogprobOptions(ctx.temperature)
                logprobs_bwd(logits, targets[sl], opts, stats, (g_logp, g_ent), out=logits)
                dlogits = logits  # overwritten in place
            else:
                dlogits = _reference_dlogits(logits, targets[sl], ctx.temperature, g_logp, g_ent)
            if need_hidden:
                torch.mm(dlogits, weight, out=grad_hidden[sl])
            if need_weight:
                _accumulate_grad_weight(grad_weight, dlogits, hidden[sl])
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


# ---------------------------------------------------------------------------
# 5. Public API
# ---------------------------------------------------------------------------


def _check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the inputs; return ``hidden`` as [N, H] and ``targets`` as [N]."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        check_float(name, t)
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden and weight must share a dtype, got hidden {hidden.dtype}, weight {weight.dtype}"
        )
    if weight.dim() != 2 or hidden.dim() < 1:
        raise ValueError(
            f"expected hidden[..., H] and weight[V, H]; got hidden{list(hidden.shape)}, weight{list(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden{list(hidden.shape)} has H={hidden.shape[-1]}, weight{list(weight.shape)} has H={weight.shape[1]}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have a non-empty vocabulary dimension, got weight{list(weight.shape)}")
    check_targets(targets, "hidden", hidden.shape)
    check_same_device(hidden=hidden, weight=weight, targets=targets)
    check_temperature(temperature)
    return hidden.reshape(-1, hidden.shape[-1]), flat_index(targets)


def _finish(logp, entropy, lead, return_entropy):
    logp, entropy = logp.view(lead), entropy.view(lead)
    return (logp, entropy) if return_entropy else logp


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``logprobs_from_logits(hidden @ weight.T, targets, temperature, return_entropy)`` without the logits.

    Shapes: ``hidden`` [..., H], ``weight`` [V, H] (same dtype: fp32, bf16 or fp16),
    ``targets`` [...] (integer). Returns ``logp`` [...] float32, or ``(logp, entropy)``.
    Differentiable w.r.t. ``hidden`` and ``weight`` (gradients in their dtype).

    Extra memory beyond inputs and gradients is O(rows * V) for rows per chunk as in
    the module docstring: one [rows, V] logits buffer (about CHUNK_BYTES, reused in
    place for dlogits), 4 fp32 numbers per token, and for bf16/fp16 weights an fp32
    grad_weight accumulator (V*H*4 bytes) plus a product temporary of at most
    CHUNK_BYTES. No host syncs on the Triton path; targets outside [0, V) give NaN
    there (see ``logprobs_from_logits``) and raise ValueError on the CPU path.
    """
    hidden2d, targets1d = _check_inputs(hidden, weight, targets, temperature)
    logp, entropy = _LinearLogprobsFunction.apply(
        hidden2d, weight, targets1d, float(temperature), use_triton(hidden)
    )
    return _finish(logp, entropy, hidden.shape[:-1], return_entropy)
