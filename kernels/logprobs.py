"""Token log-probabilities (and entropy) from logits, in one pass over the vocabulary.

``logprobs_from_logits(logits[..., V], targets[...])`` returns
``log_softmax(logits / T)[target]`` and, optionally, the entropy of the same
tempered distribution. It is the hot op of every PPO/GRPO step: the actor, the
reference model and the old policy all turn [N, V] logits into [N] log-probs.

Layout of this file (Liger-Kernel ops style): reference, Triton kernels, launch
wrappers, autograd Function, public API. ``tritonrlhf.kernels.linear_logprobs`` reuses the
launch wrappers on chunks of logits.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tritonrlhf.kernels._dispatch import check_float, check_same_device, record_launch, use_triton

# ---------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------

# Targets equal to this are skipped: log-prob 0, entropy 0, zero gradient (the label SFT
# pads with, and what Liger-Kernel and flash-attn's cross-entropy call ignore_index).
IGNORE_INDEX = -100


def check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise ValueError if a target other than ``ignore_index`` lies outside [0, V).

    CPU tensors only: on CUDA the check would be a host sync, so it is skipped there and
    such a target gives NaN instead (see ``logprobs_from_logits``)."""
    if targets.device.type != "cpu" or not targets.numel():
        return
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):
        raise ValueError(
            f"targets must lie in [0, V={vocab}) or equal ignore_index={ignore_index}; "
            f"got values such as {targets[bad][:4].tolist()}"
        )


def logprobs_from_logits_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eager PyTorch log-probs of ``targets`` under ``softmax(logits / temperature)``.

    Shapes: ``logits`` [..., V] (fp32/bf16/fp16/fp64), ``targets`` [...] (integer).
    Returns ``logp`` [...] float32, or ``(logp, entropy)``
    with ``entropy = -sum_v p_v log p_v``. Differentiable w.r.t. ``logits``; the
    gradient comes back in the logits dtype. Positions whose target equals
    ``ignore_index`` get logp 0, entropy 0 and a zero gradient.

    Memory traffic: reads the N*V logits, then materializes and re-reads several
    fp32 [N, V] temporaries (upcast, log_softmax, and for entropy p and p*logp);
    autograd keeps the fp32 log_softmax alive for backward (about 4 fp32 [N, V]
    buffers at the forward's peak, 6 through backward). The Triton path reads the
    logits once forward and once backward and keeps no [N, V] fp32 copy.

    -inf logits are masked entries (p = 0, contributing 0 to the entropy). On CPU,
    other targets outside [0, V) raise ValueError (a host sync; on CUDA the check is
    skipped so the baseline stays sync-free).
    """
    check_target_range(targets, logits.shape[-1], ignore_index)
    ignored = targets == ignore_index
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    safe = targets.masked_fill(ignored, 0).long()
    logp = torch.where(ignored, 0.0, logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1))
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # where() on logp (not on p * logp) so masked entries give 0 and a zero gradient, not NaN.
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return logp, torch.where(ignored, 0.0, entropy)


# ---------------------------------------------------------------------------
# 2. Triton kernels
# ---------------------------------------------------------------------------
# Row r of the logits starts at (r // ROWS_B) * stride_a + (r % ROWS_B) * stride_b,
# which covers contiguous [N, V] (ROWS_B = 1) and strided [A, B, V] views such as
# logits[:, :-1] without a copy. Per-row statistics saved for backward are the row
# max m and log_s = log(sum exp(z - m)) (lse = m + log_s, kept split so that
# |logits| ~ 1e4 loses no precision in z - lse), and the entropy. Targets are read as
# tgt_ptr + row: the launch wrappers pass them contiguous (flat_index).


@triton.jit
def _logprobs_fwd_kernel(
    x_ptr,
    tgt_ptr,
    logp_ptr,
    ent_ptr,
    max_ptr,
    logs_ptr,
    V,
    ROWS_B,
    stride_a,
    stride_b,
    inv_temp,
    ignore_index,
    HAS_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + row).to(tl.int64)
    if tgt == ignore_index:  # skipped position: no pass over the logits at all
        tl.store(logp_ptr + row, 0.0)
        if HAS_ENT:
            tl.store(ent_ptr + row, 0.0)
        tl.store(max_ptr + row, 0.0)
        tl.store(logs_ptr + row, 0.0)
        return
    x_row = x_ptr + (row // ROWS_B) * stride_a + (row % ROWS_B) * stride_b
    offs = tl.arange(0, BLOCK_V)

    # Online softmax over V blocks: running max m, s = sum exp(z - m),
    # t = sum exp(z - m) * (z - m) (only with HAS_ENT). Then lse = m + log s and
    # H = log s - t / s.
    m = float("-inf")
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid inf - inf
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift)
        if HAS_ENT:
            ed = e * tl.where(e > 0.0, z - shift, 0.0)  # masked (-inf) entries: 0, not 0 * -inf
            t = alpha * (t + tl.where(s > 0.0, m - shift, 0.0) * s) + tl.sum(ed, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new

    log_s = tl.log(s)
    valid = (tgt >= 0) & (tgt < V)
    z_t = tl.load(x_row + tl.where(valid, tgt, 0)).to(tl.float32) * inv_temp
    logp = tl.where(valid, (z_t - m) - log_s, float("nan"))
    tl.store(logp_ptr + row, logp)
    if HAS_ENT:
        tl.store(ent_ptr + row, log_s - t / s)
    tl.store(max_ptr + row, m)
    tl.store(logs_ptr + row, log_s)


@triton.jit
def _logprobs_bwd_kernel(
    x_ptr,
    dx_ptr,
    tgt_ptr,
    max_ptr,
    logs_ptr,
    ent_ptr,
    dlogp_ptr,
    dent_ptr,
    V,
    col0,
    n_vocab,
    ROWS_B,
    stride_a,
    stride_b,
    dx_row_stride,
    inv_temp,
    ignore_index,
    HAS_DLOGP: tl.constexpr,
    HAS_DENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # dz_v = g_logp * (1[v == target] - p_v) - g_ent * p_v * (log p_v + H); dx = dz / T.
    # The V columns read here are columns [col0, col0 + V) of an n_vocab vocabulary
    # (col0 = 0, V = n_vocab for whole rows; a vocabulary block in linear_logprobs).
    # May run in place (dx_ptr == x_ptr): each element is read before it is written
    # by the same program.
    row = tl.program_id(0).to(tl.int64)
    dx_row = dx_ptr + row * dx_row_stride
    offs = tl.arange(0, BLOCK_V)
    tgt = tl.load(tgt_ptr + row).to(tl.int64)
    if tgt == ignore_index:  # skipped position: zero gradient, logits never read
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(dx_row + cols, tl.zeros([BLOCK_V], dtype=dx_ptr.dtype.element_ty), mask=cols < V)
        return
    x_row = x_ptr + (row // ROWS_B) * stride_a + (row % ROWS_B) * stride_b
    m = tl.load(max_ptr + row)
    log_s = tl.load(logs_ptr + row)
    if HAS_DLOGP:
        g_logp = tl.load(dlogp_ptr + row)
        valid = (tgt >= 0) & (tgt < n_vocab)
        local_tgt = tgt - col0
    if HAS_DENT:
        g_ent = tl.load(dent_ptr + row)
        ent = tl.load(ent_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        z = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        logp = (z - m) - log_s
        p = tl.exp(logp)
        dz = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_DLOGP:
            dz = g_logp * (tl.where(cols == local_tgt, 1.0, 0.0) - p)
            dz = tl.where(valid, dz, float("nan"))
        if HAS_DENT:
            dz = dz - g_ent * p * tl.where(p > 0.0, logp + ent, 0.0)
        tl.store(dx_row + cols, (dz * inv_temp).to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# 3. Launch wrappers
# ---------------------------------------------------------------------------

FWD_KERNEL = "logprobs_fwd"
BWD_KERNEL = "logprobs_bwd"
# Counted beside FWD_KERNEL when the forward also computes the entropy (HAS_ENT).
FWD_ENTROPY = "logprobs_fwd_entropy"
# Largest V block per loop step. 8192 fp32 values over 16 warps is 16 registers per
# thread per array: a long, latency-hiding sweep on H100 without spilling.
MAX_BLOCK_V = 8192


@dataclass(frozen=True)
class LogprobOptions:
    """The scalars the row math needs besides the tensors.

    ``entropy`` is the forward's compile-time switch: without it the kernel skips the
    entropy accumulator (the reference and old-policy passes need log-probs only).
    """

    temperature: float = 1.0
    ignore_index: int = IGNORE_INDEX
    entropy: bool = True


class RowStats(NamedTuple):
    """Per-row forward statistics the backward reads, each [N] fp32 (``entropy`` may be None)."""

    row_max: torch.Tensor
    log_s: torch.Tensor
    entropy: torch.Tensor | None


def _launch_config(vocab: int) -> tuple[int, int]:
    block = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    num_warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def _row_layout(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Return ``(x, rows_b, stride_a, stride_b)`` addressing the rows of ``logits`` without a copy
    when it is a contiguous-rows view or a strided 3-D view (e.g. ``logits[:, :-1]``)."""
    vocab = logits.shape[-1]
    if logits.stride(-1) == 1 or vocab == 1:
        try:
            x = logits.view(-1, vocab)
            return x, 1, x.stride(0), 0
        except RuntimeError:
            if logits.dim() == 3:
                return logits, logits.shape[1], logits.stride(0), logits.stride(1)
    x = logits.contiguous().view(-1, vocab)
    return x, 1, x.stride(0), 0


def flat_index(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous 1-D tensor: the kernels address index and mask tensors as
    ``ptr + row``, so a strided view such as ``ids[:, 0]`` must be compacted first
    (a copy of N integers; no copy when ``t`` is already contiguous)."""
    return t.reshape(-1).contiguous()


def logprobs_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    opts: LogprobOptions,
    out: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor],
) -> None:
    """Fill ``out = (logp, entropy, row_max, log_s)`` (each [N] fp32) for logits [..., V]
    with N rows and int ``targets`` with N elements (any strides). ``entropy`` is None
    (and not computed) unless ``opts.entropy``."""
    x, rows_b, stride_a, stride_b = _row_layout(logits)
    targets = flat_index(targets)
    n_rows, vocab = logits.numel() // logits.shape[-1], logits.shape[-1]
    if n_rows == 0:
        return
    block, num_warps = _launch_config(vocab)
    logp, ent, row_max, log_s = out
    record_launch(FWD_KERNEL)
    if opts.entropy:
        record_launch(FWD_ENTROPY)
    _logprobs_fwd_kernel[(n_rows,)](
        x, targets, logp, logp if ent is None else ent, row_max, log_s, vocab, rows_b, stride_a, stride_b,
        1.0 / opts.temperature, opts.ignore_index,
        HAS_ENT=opts.entropy, BLOCK_V=block, num_warps=num_warps,
    )  # fmt: skip


def logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    opts: LogprobOptions,
    stats: RowStats,
    grads: tuple[torch.Tensor | None, torch.Tensor | None],
    out: torch.Tensor,
    col0: int = 0,
    n_vocab: int | None = None,
) -> None:
    """Write d(loss)/d(logits) into ``out`` [N, V] (contiguous rows, logits dtype).

    ``stats`` come from the forward; ``grads = (grad_logp, grad_entropy)`` are the [N]
    upstream gradients (None means zero). ``out`` may be ``logits`` itself (a contiguous
    [N, V] tensor) for in-place use. The V columns may be the block ``[col0, col0 + V)``
    of an ``n_vocab`` vocabulary (default: the whole row).
    """
    x, rows_b, stride_a, stride_b = _row_layout(logits)
    targets = flat_index(targets)
    n_rows, vocab = out.shape
    if n_rows == 0:
        return
    block, num_warps = _launch_config(vocab)
    grad_logp, grad_entropy = grads
    dummy = stats.row_max  # never read when the matching HAS_* flag is off
    record_launch(BWD_KERNEL)
    _logprobs_bwd_kernel[(n_rows,)](
        x, out, targets, stats.row_max, stats.log_s, dummy if stats.entropy is None else stats.entropy,
        dummy if grad_logp is None else grad_logp.contiguous(),
        dummy if grad_entropy is None else grad_entropy.contiguous(),
        vocab, col0, vocab if n_vocab is None else n_vocab, rows_b, stride_a, stride_b, out.stride(0),
        1.0 / opts.temperature, opts.ignore_index,
        HAS_DLOGP=grad_logp is not None, HAS_DENT=grad_entropy is not None,
        BLOCK_V=block, num_warps=num_warps,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# 4. Autograd Function
# ---------------------------------------------------------------------------


class _LogprobsFunction(torch.autograd.Function):
    """logits [..., V], targets [...] -> logp [...] (and entropy [...] with ``opts.entropy``)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, opts: LogprobOptions):
        lead = logits.shape[:-1]
        n_rows = logits.numel() // logits.shape[-1]
        tgt = flat_index(targets)
        f32 = {"device": logits.device, "dtype": torch.float32}
        logp, row_max, log_s = (torch.empty(n_rows, **f32) for _ in range(3))
        ent = torch.empty(n_rows, **f32) if opts.entropy else None
        logprobs_fwd(logits, tgt, opts, (logp, ent, row_max, log_s))
        ctx.save_for_backward(logits, tgt, row_max, log_s, ent)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        return (logp.view(lead), ent.view(lead)) if opts.entropy else logp.view(lead)

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None = None):
        logits, tgt, row_max, log_s, ent = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None
        vocab = logits.shape[-1]
        dlogits = torch.empty(
            (logits.numel() // max(vocab, 1), vocab), device=logits.device, dtype=logits.dtype
        )
        grads = tuple(None if g is None else g.reshape(-1).float() for g in (grad_logp, grad_entropy))
        logprobs_bwd(logits, tgt, ctx.opts, RowStats(row_max, log_s, ent), grads, dlogits)
        return dlogits.view(logits.shape), None, None


# ---------------------------------------------------------------------------
# 5. Public API
# ---------------------------------------------------------------------------


def check_targets(targets: torch.Tensor, source: str, source_shape: torch.Size) -> None:
    """Raise unless ``targets`` is an integer tensor shaped like ``source.shape[:-1]``."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(source_shape[:-1]):
        raise ValueError(
            f"targets shape must equal {source}.shape[:-1]; "
            f"got targets{list(targets.shape)}, {source}{list(source_shape)}"
        )


def check_temperature(temperature: float) -> None:
    """Raise unless ``temperature`` is a positive, finite Python number."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a Python float, got {type(temperature).__name__}")
    if not 0.0 < float(temperature) < float("inf"):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")


def check_ignore_index(ignore_index: int) -> None:
    """Raise TypeError unless ``ignore_index`` is a Python int."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be a Python int, got {type(ignore_index).__name__}")


def check_logprob_inputs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int
) -> None:
    """Validate ``logits`` [..., V], ``targets`` [...], ``temperature`` and ``ignore_index``."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got logits{list(logits.shape)}")
    check_targets(targets, "logits", logits.shape)
    check_same_device(logits=logits, targets=targets)
    check_temperature(temperature)
    check_ignore_index(ignore_index)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` under ``softmax(logits / temperature)``.

    Shapes: ``logits`` [..., V] (fp32, bf16 or fp16), ``targets`` [...] (integer, any
    strides). Returns ``logp`` [...] float32, or ``(logp, entropy)`` [...] float32 when
    ``return_entropy``. Differentiable w.r.t. ``logits`` through both outputs; the
    gradient has the logits dtype. Positions whose target equals ``ignore_index``
    (default -100, as in Liger-Kernel and flash-attn) get logp 0, entropy 0 and a zero
    gradient (the Triton path does not even read their logits).

    The Triton path (CUDA, or CPU under TRITON_INTERPRET=1) reads the logits once
    forward (online softmax; the entropy accumulator is compiled out unless
    ``return_entropy``) and once backward, keeps only 3 fp32 numbers per row, and
    never syncs with the host. It does not check targets: any other target outside
    [0, V) gives ``logp = NaN`` for that row (and NaN gradients from that row's logp);
    it never reads out of bounds. The CPU path raises ValueError instead. -inf logits
    are masked entries; +inf logits and all -inf rows give NaN, as
    ``torch.log_softmax`` does.
    """
    check_logprob_inputs(logits, targets, temperature, ignore_index)
    if use_triton(logits):
        opts = LogprobOptions(float(temperature), int(ignore_index), bool(return_entropy))
        return _LogprobsFunction.apply(logits, targets, opts)
    return logprobs_from_logits_reference(logits, targets, temperature, return_entropy, ignore_index)
