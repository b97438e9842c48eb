"""Token log-probabilities (and entropy) straight from hidden states and the LM head.

``linear_logprobs(hidden[..., H], weight[V, H], targets[...])`` equals
``logprobs_from_logits(hidden @ weight.T, targets)`` but never materializes the
[N, V] logits. This is what lets the actor train with 150k-token vocabularies.

Forward: rows in chunks; each chunk's logits [rows, V] come from one matmul
(cuBLAS on GPU) and the fused kernel of ``tritonrlhf.kernels.logprobs`` turns them into
log-probs (and entropies, only when asked: a compile-time switch), keeping the
per-row softmax statistics (max, log-sum) for backward.

Backward (Triton path): the vocabulary in blocks of ``cols`` columns (verl's
vocabulary split). For each block, one matmul over all N rows recomputes its
logits [N, cols]; the backward kernel overwrites them in place with
d(loss)/d(logits) from the saved statistics and the per-token upstream gradients
(arbitrary per token, so unlike a scalar-loss fused linear cross-entropy the
gradient cannot be formed in forward); then

- ``grad_weight[block] = dlogits.T @ hidden``: one GEMM over all N rows, fp32
  accumulation inside the GEMM, written once in the weight dtype and never read back;
- ``grad_hidden += dlogits @ weight[block]`` into an fp32 [N, H] accumulator
  (``out_dtype=torch.float32`` GEMMs where torch has them, see ``accumulate_fp32``).

The old scheme (row chunks accumulating into an fp32 [V, H] weight gradient) read
and rewrote V*H*4 bytes per chunk: about 150 GB per 16k-token step at H=4096.

Backward (reference, the CPU path): row chunks as in forward; each chunk's dlogits
come from autograd through ``logprobs_from_logits_reference`` on sub-blocks of the
chunk's rows, so the eager reference's fp32 temporaries stay within one chunk.

Layout (Liger-Kernel ops style): reference, kernels (reused from
``tritonrlhf.kernels.logprobs``), chunking and GEMM helpers, autograd Function, public API.

Chunk sizes (``CHUNK_BYTES`` of logits, default 256 MiB; e = element size):
forward ``rows = CHUNK_BYTES // (V * e)``, at least 1, rounded down to a multiple of
64 once it reaches 64, at most N (832 rows for V=151936 in bf16); backward
``cols = CHUNK_BYTES // (N * e)`` rounded down to a multiple of 128, at least 128,
at most V (8192 columns for N=16384 in bf16).
"""

from __future__ import annotations

import functools

import torch

from tritonrlhf.kernels._dispatch import check_float, check_same_device, use_triton
from tritonrlhf.kernels.logprobs import (
    IGNORE_INDEX,
    LogprobOptions,
    RowStats,
    check_ignore_index,
    check_target_range,
    check_targets,
    check_temperature,
    flat_index,
    logprobs_bwd,
    logprobs_from_logits_reference,
    logprobs_fwd,
)

# Budget for one chunk of logits, in bytes (see the module docstring).
CHUNK_BYTES = 256 * 2**20
# Narrowest vocabulary block of the Triton backward (tensor-core friendly GEMM width);
# only beyond N = CHUNK_BYTES / (128 * e) tokens (1M in bf16) does a block exceed the budget.
MIN_BLOCK_COLS = 128
# The reference path runs the eager reference on up to this many equal sub-blocks of
# each chunk: its fp32 temporaries peak near 6 [rows, V] buffers through backward
# (measured), so eight sub-blocks keep them under one chunk. Each sub-block's fp32
# [rows, V] buffer stays at 32 MiB or more where the chunk allows: glibc serves such
# allocations with mmap and unmaps them on free, while smaller ones come from its heap
# once a free has raised the mmap threshold, and the heap held on to about 0.4 GB after
# a 4096 x 151936 fp32 step (measured).
REFERENCE_SPLIT = 8
MIN_SUB_BLOCK_BYTES = 32 * 2**20

# ---------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked eager PyTorch ``logprobs_from_logits_reference(hidden @ weight.T, targets, ...)``.

    Shapes: ``hidden`` [..., H], ``weight`` [V, H] (same float dtype), ``targets``
    [...] (integer). Returns ``logp`` [...] float32, or ``(logp, entropy)``.
    Differentiable w.r.t. ``hidden`` and ``weight``.

    Memory: never holds the [N, V] logits. Per chunk of ``rows`` (module docstring)
    it holds the chunk's logits plus the eager reference's fp32 temporaries on one
    sub-block of the chunk (under one more chunk); backward recomputes the chunk's
    logits and replaces them in place by autograd's dlogits, sub-block by sub-block.
    Traffic: reads ``weight`` (V*H) once per chunk in forward and twice per chunk
    in backward. This is the CPU path and the "chunked eager" benchmark baseline.
    """
    args = (hidden, weight, targets, temperature, return_entropy, ignore_index)
    return _linear_logprobs(*args, use_kernel=False)


# ---------------------------------------------------------------------------
# 2./3. Kernels and launch wrappers: ``logprobs_fwd`` / ``logprobs_bwd`` from
# kernels.logprobs, launched once per row chunk (forward) and once per vocabulary
# block (backward); LAUNCHES names "logprobs_fwd", "logprobs_bwd".
# ---------------------------------------------------------------------------


def chunk_rows(n_rows: int, vocab: int, element_size: int) -> int:
    """Rows per forward chunk so one [rows, V] logits chunk takes about CHUNK_BYTES."""
    rows = max(1, CHUNK_BYTES // (vocab * element_size))
    if rows >= 64:
        rows -= rows % 64  # tensor-core friendly M for the chunk matmuls
    return min(rows, max(n_rows, 1))


def vocab_block_cols(n_rows: int, vocab: int, element_size: int) -> int:
    """Columns per backward vocabulary block so one [N, cols] logits block takes about CHUNK_BYTES."""
    cols = CHUNK_BYTES // (max(n_rows, 1) * element_size)
    cols = max(MIN_BLOCK_COLS, cols - cols % MIN_BLOCK_COLS)
    return min(cols, vocab)


@functools.cache
def _fp32_gemm_mode(device: torch.device) -> str:
    """How this torch accumulates a bf16/fp16 GEMM into an fp32 tensor on ``device``.

    ``"addmm"``: ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` (newer CUDA builds:
    no temporary); ``"mm"``: ``torch.mm(a, b, out_dtype=float32)`` then an add (the
    out_dtype GEMM exists but wants ``self`` in the input dtype); ``""``: neither (CPU,
    or torch without ``out_dtype``). Found by trying it once on 2x2 tensors, since the
    operator's dtype rules changed between releases.
    """
    a = torch.zeros(2, 2, dtype=torch.bfloat16, device=device)
    acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return "addmm"
    except (RuntimeError, TypeError):
        pass
    try:
        torch.mm(a, a, out_dtype=torch.float32)
        return "mm"
    except (RuntimeError, TypeError):
        return ""


def accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 (or fp64) ``acc`` and ``a``, ``b`` in the input dtype.

    Same dtypes: one in-place addmm. bf16/fp16 inputs: a GEMM that accumulates in fp32
    and writes fp32 (``out_dtype``) where torch has one for this device; otherwise each
    product is rounded once to the input dtype and added in fp32, split along ``acc``'s
    rows so that temporary stays within CHUNK_BYTES.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    mode = _fp32_gemm_mode(acc.device)
    if mode == "addmm":
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        return
    step = max(1, CHUNK_BYTES // (acc.shape[1] * (4 if mode else a.element_size())))
    for r0 in range(0, acc.shape[0], step):
        rows = slice(r0, r0 + step)
        acc[rows] += torch.mm(a[rows], b, out_dtype=acc.dtype) if mode else a[rows] @ b


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _sub_blocks(rows: int, vocab: int) -> list[slice]:
    """The equal row sub-blocks of a [rows, V] chunk on which the reference path runs
    the eager reference (at most REFERENCE_SPLIT, each at least MIN_SUB_BLOCK_BYTES of fp32
    where the chunk allows)."""
    parts = max(1, min(REFERENCE_SPLIT, rows * vocab * 4 // MIN_SUB_BLOCK_BYTES))
    edges = [rows * k // parts for k in range(parts + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def _reference_dlogits_(
    logits: torch.Tensor, targets: torch.Tensor, opts: LogprobOptions, grads: tuple
) -> None:
    """Overwrite one chunk's ``logits`` with d(loss)/d(logits), by autograd through the
    eager reference on sub-blocks of its rows (``_sub_blocks``)."""
    for rows in _sub_blocks(*logits.shape):
        with torch.enable_grad():
            x = logits[rows].detach().requires_grad_()
            outs = logprobs_from_logits_reference(
                x, targets[rows], opts.temperature, return_entropy=True, ignore_index=opts.ignore_index
            )
            pairs = [(o, g[rows]) for o, g in zip(outs, grads) if g is not None]
            (dlogits,) = torch.autograd.grad([o for o, _ in pairs], x, [g for _, g in pairs])
        logits[rows].copy_(dlogits)


def _forward_chunks(hidden, weight, targets, opts: LogprobOptions, use_kernel: bool):
    """(logp, entropy or None, row_max, log_s), each [N] fp32, row chunk by row chunk."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    rows = chunk_rows(n_rows, vocab, hidden.element_size())
    f32 = {"device": hidden.device, "dtype": torch.float32}
    logp = torch.empty(n_rows, **f32)
    entropy = torch.empty(n_rows, **f32) if opts.entropy else None
    row_max = torch.empty(n_rows, **f32) if use_kernel else None
    log_s = torch.empty(n_rows, **f32) if use_kernel else None
    for start in range(0, n_rows, rows):
        sl = slice(start, start + rows)
        logits = hidden[sl] @ weight.T
        if use_kernel:
            out = (logp[sl], None if entropy is None else entropy[sl], row_max[sl], log_s[sl])
            logprobs_fwd(logits, targets[sl], opts, out)
            continue
        chunk_targets, chunk_logp = targets[sl], logp[sl]
        for sub in _sub_blocks(*logits.shape):
            res = logprobs_from_logits_reference(
                logits[sub], chunk_targets[sub], opts.temperature, opts.entropy, opts.ignore_index
            )
            if opts.entropy:
                chunk_logp[sub], entropy[sl][sub] = res
            else:
                chunk_logp[sub] = res
    return logp, entropy, row_max, log_s


def _backward_vocab_blocks(hidden, weight, targets, opts, stats: RowStats, grads, need: tuple[bool, bool]):
    """(grad_hidden, grad_weight) of the Triton path, one vocabulary block at a time."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    cols = vocab_block_cols(n_rows, vocab, hidden.element_size())
    need_hidden, need_weight = need
    acc = None
    if need_hidden:
        acc = torch.zeros(hidden.shape, device=hidden.device, dtype=_acc_dtype(hidden.dtype))
    grad_weight = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype) if need_weight else None
    for v0 in range(0, vocab, cols):
        w_block = weight[v0 : v0 + cols]
        dlogits = hidden @ w_block.T  # [N, cols], overwritten in place with d(loss)/d(logits)
        logprobs_bwd(dlogits, targets, opts, stats, grads, dlogits, col0=v0, n_vocab=vocab)
        if need_weight:
            torch.mm(dlogits.T, hidden, out=grad_weight[v0 : v0 + cols])
        if need_hidden:
            accumulate_fp32(acc, dlogits, w_block)
    return (None if acc is None else acc.to(hidden.dtype)), grad_weight


def _backward_row_chunks(hidden, weight, targets, opts, grads, need: tuple[bool, bool]):
    """(grad_hidden, grad_weight) of the reference path, one row chunk at a time."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    rows = chunk_rows(n_rows, vocab, hidden.element_size())
    need_hidden, need_weight = need
    grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype) if need_hidden else None
    acc = None
    if need_weight:
        acc = torch.zeros(weight.shape, device=weight.device, dtype=_acc_dtype(weight.dtype))
    for start in range(0, n_rows, rows):
        sl = slice(start, start + rows)
        logits = hidden[sl] @ weight.T
        chunk_grads = tuple(None if g is None else g[sl] for g in grads)
        _reference_dlogits_(logits, targets[sl], opts, chunk_grads)  # logits now hold dlogits
        if need_hidden:
            torch.mm(logits, weight, out=grad_hidden[sl])
        if need_weight:
            accumulate_fp32(acc, logits.T, hidden[sl])
    return grad_hidden, (None if acc is None else acc.to(weight.dtype))


# ---------------------------------------------------------------------------
# 4. Autograd Function
# ---------------------------------------------------------------------------


class _LinearLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], targets [N] -> logp [N] (and entropy [N]) fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, opts: LogprobOptions, use_kernel: bool):
        logp, entropy, row_max, log_s = _forward_chunks(hidden, weight, targets, opts, use_kernel)
        ctx.save_for_backward(hidden, weight, targets, row_max, log_s, entropy)
        ctx.opts, ctx.use_kernel = opts, use_kernel
        ctx.set_materialize_grads(False)
        return (logp, entropy) if opts.entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, targets, row_max, log_s, entropy = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:2])
        if (grad_logp is None and grad_entropy is None) or not any(need):
            return None, None, None, None, None
        grads = tuple(None if g is None else g.float().contiguous() for g in (grad_logp, grad_entropy))
        if ctx.use_kernel:
            stats = RowStats(row_max, log_s, entropy)
            grad_hidden, grad_weight = _backward_vocab_blocks(
                hidden, weight, targets, ctx.opts, stats, grads, need
            )
        else:
            grad_hidden, grad_weight = _backward_row_chunks(hidden, weight, targets, ctx.opts, grads, need)
        return grad_hidden, grad_weight, None, None, None


# ---------------------------------------------------------------------------
# 5. Public API
# ---------------------------------------------------------------------------


def _check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the inputs; return ``hidden`` as [N, H] and ``targets`` as a contiguous [N]."""
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
    check_ignore_index(ignore_index)
    return hidden.reshape(-1, hidden.shape[-1]), flat_index(targets)


def _linear_logprobs(hidden, weight, targets, temperature, return_entropy, ignore_index, use_kernel):
    """Validate, then run the Function on the Triton path (``use_kernel``) or the reference path."""
    hidden2d, targets1d = _check_inputs(hidden, weight, targets, temperature, ignore_index)
    if not use_kernel:
        check_target_range(targets1d, weight.shape[0], ignore_index)  # before any work
    opts = LogprobOptions(float(temperature), int(ignore_index), bool(return_entropy))
    out = _LinearLogprobsFunction.apply(hidden2d, weight, targets1d, opts, use_kernel)
    lead = hidden.shape[:-1]
    return (out[0].view(lead), out[1].view(lead)) if return_entropy else out.view(lead)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``logprobs_from_logits(hidden @ weight.T, targets, ...)`` without the [N, V] logits.

    Shapes: ``hidden`` [..., H], ``weight`` [V, H] (same dtype: fp32, bf16 or fp16),
    ``targets`` [...] (integer, any strides). Returns ``logp`` [...] float32, or
    ``(logp, entropy)``. Differentiable w.r.t. ``hidden`` and ``weight`` (gradients in
    their dtype). Positions whose target equals ``ignore_index`` (default -100) get
    logp 0, entropy 0 and contribute nothing to either gradient.

    Extra memory beyond inputs, outputs and gradients, on every path, is about two
    chunks of CHUNK_BYTES (module docstring): one logits chunk (forward, and the
    reference backward, reused in place for dlogits) or vocabulary block (Triton
    backward), plus either the eager reference's temporaries on a sub-block (CPU) or,
    for bf16/fp16, the fp32 [N, H] grad-hidden accumulator (Triton); 4 fp32 numbers per
    token are kept for backward. For bf16/fp16 on the CPU path an fp32 [V, H]
    grad-weight accumulator is added. No host syncs on the Triton path; any other
    target outside [0, V) gives NaN there (see ``logprobs_from_logits``) and raises
    ValueError on the CPU path, before any work.
    """
    args = (hidden, weight, targets, temperature, return_entropy, ignore_index)
    return _linear_logprobs(*args, use_kernel=use_triton(hidden))
