"""Token log-probabilities (and entropy) from logits, in one pass over the vocabulary.

``logprobs_from_logits(logits[..., V], targets[...])`` returns
``log_softmax(logits / T)[target]`` and, optionally, the entropy of the same
tempered distribution. It is the hot op of every PPO/GRPO step: the actor, the
reference model and the old policy all turn [N, V] logits into [N] log-probs.

Layout of this file (Liger-Kernel ops style): reference, Triton kernels, launch
wrappers, autograd Function, public API. ``kernels.linear_logprobs`` reuses the
launch wrappers on chunks of logits.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from kernels._dispatch import check_float, check_same_device, record_launch, use_triton

# ---------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------


def logprobs_from_logits_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eager PyTorch log-probs of ``targets`` under ``softmax(logits / temperature)``.

    Shapes: ``logits`` [..., V] (fp32/bf16/fp16/fp64), ``targets`` [...] (integer).
    Returns ``logp`` [...] float32, or ``(logp, entropy)``
    with ``entropy = -sum_v p_v log p_v``. Differentiable w.r.t. ``logits``; the
    gradient comes back in the logits dtype.

    Memory traffic: reads the N*V logits, then materializes and re-reads several
    fp32 [N, V] temporaries (upcast, log_softmax, and for entropy p and p*logp);
    autograd keeps the fp32 log_softmax alive for backward. The Triton path reads
    the logits once forward and once backward and keeps no [N, V] fp32 copy.

    -inf logits are masked entries (p = 0, contributing 0 to the entropy). On CPU,
    targets outside [0, V) raise ValueError (a host sync; on CUDA the check is
    skipped so the baseline stays sync-free).
    """
    vocab = logits.shape[-1]
    if targets.device.type == "cpu" and targets.numel() and bool(((targets < 0) | (targets >= vocab)).any()):
        bad = targets[(targets < 0) | (targets >= vocab)]
        raise ValueError(f"targets must lie in [0, V={vocab}); got values such as {bad[:4].tolist()}")
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # where() on logp (not on p * logp) so masked entries give 0 and a zero gradient, not NaN.
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return logp, entropy


# ---------------------------------------------------------------------------
# 2. Triton kernels
# ---------------------------------------------------------------------------
# Row r of the logits starts at (r // ROWS_B) * stride_a + (r % ROWS_B) * stride_b,
# which covers contiguous [N, V] (ROWS_B = 1) and strided [A, B, V] views such as
# logits[:, :-1] without a copy. Per-row statistics saved for backward are the row
# max m and log_s = log(sum exp(z - m)) (lse = m + log_s, kept split so that
# |logits| ~ 1e4 loses no precision in z - lse), and the entropy.


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
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // ROWS_B) * stride_a + (row % ROWS_B) * stride_b
    offs = tl.arange(0, BLOCK_V)

    # Online softmax over V blocks: running max m, s = sum exp(z - m),
    # t = sum exp(z - m) * (z - m). Then lse = m + log s and H = log s - t / s.
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
        ed = e * tl.where(e > 0.0, z - shift, 0.0)  # masked (-inf) entries: 0, not 0 * -inf
        t = alpha * (t + tl.where(s > 0.0, m - shift, 0.0) * s) + tl.sum(ed, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new

    log_s = tl.log(s)
    tgt = tl.load(tgt_ptr + row).to(tl.int64)
    valid = (tgt >= 0) & (tgt < V)
    z_t = tl.load(x_row + tl.where(valid, tgt, 0)).to(tl.float32) * inv_temp
    logp = tl.where(valid, (z_t - m) - log_s, float("nan"))
    tl.store(logp_ptr + row, logp)
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
    ROWS_B,
    stride_a,
    stride_b,
    dx_row_stride,
    inv_temp,
    HAS_DLOGP: tl.constexpr,
    HAS_DENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # dz_v = g_logp * (1[v == target] - p_v) - g_ent * p_v * (log p_v + H); dx = dz / T.
    # May run in place (dx_ptr == x_ptr): each element is read before it is written
    # by the same program.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // ROWS_B) * stride_a + (row % ROWS_B) * stride_b
    dx_row = dx_ptr + row * dx_row_stride
    offs = tl.arange(0, BLOCK_V)
    m = tl.load(max_ptr + row)
    log_s = tl.load(logs_ptr + row)
    if HAS_DLOGP:
        g_logp = tl.load(dlogp_ptr + row)
        tgt = tl.load(tgt_ptr + row).to(tl.int64)
        valid = (tgt >= 0) & (tgt < V)
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
            dz = g_logp * (tl.where(cols == tgt, 1.0, 0.0) - p)
            dz = tl.where(valid, dz, float("nan"))
        if HAS_DENT:
            dz = dz - g_ent * p * tl.where(p > 0.0, logp + ent, 0.0)
        tl.store(dx_row + cols, (dz * inv_temp).to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# 3. Launch wrappers
# ---------------------------------------------------------------------------

FWD_KERNEL = "logprobs_fwd"
BWD_KERNEL = "logprobs_bwd"
# Largest V block per loop step. 8192 fp32 values over 16 warps is 16 registers per
# thread per array: a long, latency-hiding sweep on H100 without spilling.
MAX_BLOCK_V = 8192


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
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, out: tuple[torch.Tensor, ...]
) -> None:
    """Fill ``out = (logp, entropy, row_max, log_s)`` (each [N] fp32) for logits [..., V]
    with N rows and int ``targets`` with N elements (any strides)."""
    x, rows_b, stride_a, stride_b = _row_layout(logits)
    targets = flat_index(targets)
    n_rows, vocab = logits.numel() // logits.shape[-1], logits.shape[-1]
    if n_rows == 0:
        return
    block, num_warps = _launch_config(vocab)
    logp, ent, row_max, log_s = out
    record_launch(FWD_KERNEL)
    _logprobs_fwd_kernel[(n_rows,)](
        x, targets, logp, ent, row_max, log_s, vocab, rows_b, stride_a, stride_b, 1.0 / temperature,
        BLOCK_V=block, num_warps=num_warps,
    )  # fmt: skip


def logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Write d(loss)/d(logits) into ``out`` [N, V] (contiguous rows, logits dtype).

    ``stats = (row_max, log_s, entropy)`` from the forward; ``grad_logp`` and
    ``grad_entropy`` are the [N] upstream gradients (None means zero). ``out`` may be
    ``logits`` itself (a contiguous [N, V] tensor) for in-place use.
    """
    x, rows_b, stride_a, stride_b = _row_layout(logits)
    targets = flat_index(targets)
    n_rows, vocab = out.shape
    if n_rows == 0:
        return
    block, num_warps = _launch_config(vocab)
    row_max, log_s, ent = stats
    dummy = row_max  # never read when the matching HAS_* flag is off
    record_launch(BWD_KERNEL)
    _logprobs_bwd_kernel[(n_rows,)](
        x, out, targets, row_max, log_s, ent,
        dummy if grad_logp is None else grad_logp.contiguous(),
        dummy if grad_entropy is None else grad_entropy.contiguous(),
        vocab, rows_b, stride_a, stride_b, out.stride(0), 1.0 / temperature,
        HAS_DLOGP=grad_logp is not None, HAS_DENT=grad_entropy is not None,
        BLOCK_V=block, num_warps=num_warps,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# 4. Autograd Function
# ---------------------------------------------------------------------------


class _LogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float):
        lead = logits.shape[:-1]
        n_rows = logits.numel() // logits.shape[-1]
        tgt = flat_index(targets)
        logp, ent, row_max, log_s = (
            torch.empty(n_rows, device=logits.device, dtype=torch.float32) for _ in range(4)
        )
        logprobs_fwd(logits, tgt, temperature, (logp, ent, row_max, log_s))
        ctx.save_for_backward(logits, tgt, row_max, log_s, ent)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return logp.view(lead), ent.view(lead)

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        logits, tgt, row_max, log_s, ent = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None
        vocab = logits.shape[-1]
        dlogits = torch.empty(
            (logits.numel() // max(vocab, 1), vocab), device=logits.device, dtype=logits.dtype
        )
        logprobs_bwd(
            logits,
            tgt,
            ctx.temperature,
            (row_max, log_s, ent),
            None if grad_logp is None else grad_logp.reshape(-1).float(),
            None if grad_entropy is None else grad_entropy.reshape(-1).float(),
            dlogits,
        )
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


def check_logprob_inputs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    """Validate ``logits`` [..., V], ``targets`` [...] and ``temperature``."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got logits{list(logits.shape)}")
    check_targets(targets, "logits", logits.shape)
    check_same_device(logits=logits, targets=targets)
    check_temperature(temperature)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` under ``softmax(logits / temperature)``.

    Shapes: ``logits`` [..., V] (fp32, bf16 or fp16), ``targets`` [...] (integer).
    Returns ``logp`` [...] float32, or ``(logp, entropy)`` [...] float32 when
    ``return_entropy``. Differentiable w.r.t. ``logits`` through both outputs; the
    gradient has the logits dtype.

    The Triton path (CUDA, or CPU under TRITON_INTERPRET=1) reads the logits once
    forward (online softmax) and once backward, keeps only 3 fp32 numbers per row,
    and never syncs with the host. It does not check targets: a target outside
    [0, V) gives ``logp = NaN`` for that row (and NaN gradients from that row's
    logp); it never reads out of bounds. The CPU path raises ValueError instead.
    -inf logits are masked entries; +inf logits and all -inf rows give NaN, as
    ``torch.log_softmax`` does.
    """
    check_logprob_inputs(logits, targets, temperature)
    if use_triton(logits):
        logp, entropy = _LogprobsFunction.apply(logits, targets, float(temperature))
        return (logp, entropy) if return_entropy else logp
    return logprobs_from_logits_reference(logits, targets, temperature, return_entropy)
