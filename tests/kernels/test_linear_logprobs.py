"""linear_logprobs against float64 formulas written here, forward and backward.

Small CHUNK_BYTES budgets force several chunks so the chunk loop, the in-place
dlogits and the grad_weight accumulation are all exercised.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import tritonrlhf.kernels.logprobs as logprobs_module
from tests.conftest import DTYPES, assert_close_fp64, check_launched, triton_runs
from tritonrlhf.kernels import (
    _dispatch,
    linear_logprobs,
    linear_logprobs_reference,
    logprobs_from_logits_reference,
)

# The package re-exports the function under the module's own name, so fetch the module explicitly.
linear_module = importlib.import_module("tritonrlhf.kernels.linear_logprobs")

FWD, BWD = logprobs_module.FWD_KERNEL, logprobs_module.BWD_KERNEL


def fp64_linear_logprobs(hidden, weight, targets, temperature):
    """(h64, w64, logp64, entropy64): the float64 formula on the full logits."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp_all = torch.log_softmax((h @ w.T) / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return h, w, logp, entropy


def run_and_check(hidden, weight, targets, temperature=1.0, grads=("logp", "entropy"), fn=linear_logprobs):
    dtype = hidden.dtype
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    before = _dispatch.LAUNCHES[FWD]
    logp, entropy = fn(h, w, targets, temperature, return_entropy=True)
    if fn is linear_logprobs:
        check_launched({FWD: before}, (FWD,))
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert logp.shape == targets.shape

    upstream = {"logp": torch.randn_like(logp), "entropy": torch.randn_like(entropy)}
    outs = {"logp": logp, "entropy": entropy}
    before = _dispatch.LAUNCHES[BWD]
    torch.autograd.backward([outs[k] for k in grads], [upstream[k] for k in grads])
    if fn is linear_logprobs:
        check_launched({BWD: before}, (BWD,))
    assert h.grad.dtype == dtype and w.grad.dtype == dtype

    h64, w64, logp64, entropy64 = fp64_linear_logprobs(hidden, weight, targets, temperature)
    outs64 = {"logp": logp64, "entropy": entropy64}
    gh64, gw64 = torch.autograd.grad(
        [outs64[k] for k in grads], (h64, w64), [upstream[k].double() for k in grads]
    )

    eager = {}
    if dtype != torch.float32:
        # Eager PyTorch at the same precision, full (unchunked) logits.
        he, we = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        outs_e = logprobs_from_logits_reference(he @ we.T, targets, temperature, return_entropy=True)
        torch.autograd.backward(
            [dict(zip(("logp", "entropy"), outs_e))[k] for k in grads], [upstream[k] for k in grads]
        )
        eager = {"logp": outs_e[0].detach(), "entropy": outs_e[1].detach(), "h": he.grad, "w": we.grad}
    assert_close_fp64(logp, logp64.detach(), dtype, eager=eager.get("logp"), name="logp")
    assert_close_fp64(entropy, entropy64.detach(), dtype, eager=eager.get("entropy"), name="entropy")
    assert_close_fp64(h.grad, gh64, dtype, eager=eager.get("h"), name="grad_hidden")
    assert_close_fp64(w.grad, gw64, dtype, eager=eager.get("w"), name="grad_weight")


def make_inputs(lead, hidden_size, vocab, dtype):
    hidden = torch.randn(*lead, hidden_size).to(dtype)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5 * 2).to(dtype)
    targets = torch.randint(0, vocab, lead)
    return hidden, weight, targets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead, vocab", [((9,), 1271), ((2, 5), 401), ((2, 2, 3), 1000)])
def test_matches_fp64_chunked(monkeypatch, lead, vocab, dtype):
    # A budget of ~3 rows per chunk: several chunks, the last one partial.
    monkeypatch.setattr(
        linear_module, "CHUNK_BYTES", 3 * vocab * torch.tensor([], dtype=dtype).element_size()
    )
    run_and_check(*make_inputs(lead, 64, vocab, dtype), temperature=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature_single_chunk(temperature, dtype):
    run_and_check(*make_inputs((6,), 48, 1000, dtype), temperature=temperature)


@pytest.mark.parametrize("grads", [("logp",), ("entropy",)])
def test_single_output_backward(monkeypatch, grads):
    monkeypatch.setattr(linear_module, "CHUNK_BYTES", 2 * 401 * 4)
    run_and_check(*make_inputs((5,), 32, 401, torch.float32), temperature=0.7, grads=grads)


def test_reference_is_chunked_and_matches(monkeypatch):
    """The public reference (CPU path, benchmark baseline) chunks too, runs the eager
    reference on sub-blocks of each chunk (its temporaries stay within a chunk) and matches fp64."""
    monkeypatch.setattr(linear_module, "CHUNK_BYTES", 16 * 401 * 4)
    monkeypatch.setattr(linear_module, "MIN_SUB_BLOCK_BYTES", 1)
    calls = []
    original = linear_module.logprobs_from_logits_reference

    def spy(logits, *args, **kwargs):
        calls.append(logits.shape[0])
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(linear_module, "logprobs_from_logits_reference", spy)
    run_and_check(*make_inputs((37,), 32, 401, torch.float32), temperature=1.3, fn=linear_logprobs_reference)
    assert max(calls) == 16 // linear_module.REFERENCE_SPLIT, calls


def test_large_vocab(monkeypatch):
    """151936 vocabulary, 3 rows, bf16, two chunks."""
    vocab = 151936
    monkeypatch.setattr(linear_module, "CHUNK_BYTES", 2 * vocab * 2)
    run_and_check(*make_inputs((3,), 16, vocab, torch.bfloat16), temperature=1.0)


def test_chunk_rules(monkeypatch):
    monkeypatch.setattr(linear_module, "CHUNK_BYTES", 256 * 2**20)
    assert linear_module.chunk_rows(10_000, 151936, 2) == 832
    assert linear_module.chunk_rows(100, 151936, 2) == 100
    assert linear_module.chunk_rows(10_000, 10**9, 4) == 1
    assert linear_module.vocab_block_cols(16384, 151936, 2) == 8192
    assert linear_module.vocab_block_cols(1000, 151936, 2) == 134144
    assert linear_module.vocab_block_cols(10, 32001, 4) == 32001
    assert linear_module.vocab_block_cols(10**8, 151936, 2) == linear_module.MIN_BLOCK_COLS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_targets(monkeypatch, dtype):
    """``ids[:, P:]`` with one response token: a [B, 1] view with row stride L, and ``ids[:, 0]``."""
    monkeypatch.setattr(linear_module, "CHUNK_BYTES", 2 * 401 * 4)
    ids = torch.randint(0, 401, (5, 7))
    hidden, weight, _ = make_inputs((5, 1), 32, 401, dtype)
    run_and_check(hidden, weight, ids[:, 6:], temperature=0.7)
    run_and_check(hidden[:, 0], weight, ids[:, 0])


def test_out_of_range_targets():
    hidden, weight, _ = make_inputs((3,), 16, 50, torch.float32)
    targets = torch.tensor([3, 50, -1])
    if not triton_runs():
        with pytest.raises(ValueError, match="targets"):
            linear_logprobs(hidden, weight, targets)
        return
    logp = linear_logprobs(hidden, weight, targets)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_ignore_index(monkeypatch, dtype):
    """-100 targets: logp 0, entropy 0, no gradient, and a finite grad_weight (it used to be all NaN)."""
    monkeypatch.setattr(linear_module, "CHUNK_BYTES", 3 * 401 * 4)
    hidden, weight, targets = make_inputs((2, 5), 32, 401, dtype)
    targets[0, 3:] = -100  # right padding
    targets[1, 0] = -100
    ignored = targets == -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = linear_logprobs(h, w, targets, 0.7, return_entropy=True)
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
    g_logp, g_ent = torch.randn_like(logp), torch.randn_like(entropy)
    torch.autograd.backward([logp, entropy], [g_logp, g_ent])
    assert torch.isfinite(w.grad).all() and (h.grad[ignored] == 0).all()

    keep = ~ignored
    h64, w64, logp64, entropy64 = fp64_linear_logprobs(hidden[keep], weight, targets[keep], 0.7)
    gh64, gw64 = torch.autograd.grad(
        [logp64, entropy64], (h64, w64), [g_logp[keep].double(), g_ent[keep].double()]
    )
    eager = {}
    if dtype != torch.float32:
        he, we = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        outs = logprobs_from_logits_reference(he @ we.T, targets, 0.7, True)
        torch.autograd.backward(list(outs), [g_logp, g_ent])
        eager = {"logp": outs[0][keep].detach(), "h": he.grad[keep], "w": we.grad}
    assert_close_fp64(logp[keep], logp64.detach(), dtype, eager=eager.get("logp"), name="logp")
    assert_close_fp64(entropy[keep], entropy64.detach(), dtype, name="entropy")
    assert_close_fp64(h.grad[keep], gh64, dtype, eager=eager.get("h"), name="grad_hidden")
    assert_close_fp64(w.grad, gw64, dtype, eager=eager.get("w"), name="grad_weight")


def test_ignore_index_custom_and_out_of_range():
    """A custom ignore_index (a pad id inside [0, V)) is skipped; other bad targets keep their behaviour."""
    hidden, weight, targets = make_inputs((4,), 16, 50, torch.float32)
    targets[1] = 7
    logp = linear_logprobs(hidden, weight, targets, ignore_index=7)
    assert logp[1] == 0 and (logp[[0, 2, 3]] < 0).all()
    bad = torch.tensor([3, -100, 50, 2])
    if not triton_runs():
        with pytest.raises(ValueError, match="ignore_index=-100"):
            linear_logprobs(hidden, weight, bad)
        return
    logp = linear_logprobs(hidden, weight, bad)
    assert logp[1] == 0 and torch.isnan(logp[2]) and torch.isfinite(logp[[0, 3]]).all()


def test_logp_only_skips_entropy():
    """return_entropy=False compiles the forward without the entropy accumulator and still matches."""
    hidden, weight, targets = make_inputs((6,), 24, 401, torch.float32)
    h = hidden.clone().requires_grad_()
    before = _dispatch.LAUNCHES[logprobs_module.FWD_ENTROPY]
    logp = linear_logprobs(h, weight, targets, 1.3)
    assert isinstance(logp, torch.Tensor) and logp.shape == (6,)
    assert _dispatch.LAUNCHES[logprobs_module.FWD_ENTROPY] == before
    g = torch.randn_like(logp)
    logp.backward(g)
    h64, _, logp64, _ = fp64_linear_logprobs(hidden, weight, targets, 1.3)
    (gh64,) = torch.autograd.grad(logp64, h64, g.double())
    assert_close_fp64(logp, logp64.detach(), torch.float32, name="logp")
    assert_close_fp64(h.grad, gh64, torch.float32, name="grad_hidden")


@pytest.mark.parametrize(
    "hidden, weight, targets, error, match",
    [
        (
            torch.randn(3, 8),
            torch.randn(10, 7),
            torch.zeros(3, dtype=torch.long),
            ValueError,
            r"hidden\[3, 8\].*weight\[10, 7\]",
        ),
        (
            torch.randn(3, 8),
            torch.randn(10, 8),
            torch.zeros(2, dtype=torch.long),
            ValueError,
            r"targets\[2\]",
        ),
        (
            torch.randn(3, 8),
            torch.randn(0, 8),
            torch.zeros(3, dtype=torch.long),
            ValueError,
            r"weight\[0, 8\]",
        ),
        (
            torch.randint(0, 3, (3, 8)),
            torch.randn(10, 8),
            torch.zeros(3, dtype=torch.long),
            TypeError,
            "hidden",
        ),
        (torch.randn(3, 8), torch.randn(10, 8).half(), torch.zeros(3, dtype=torch.long), TypeError, "dtype"),
        (torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3), TypeError, "targets"),
        (
            torch.randn(3, 8),
            torch.randn(10, 8, device="meta"),
            torch.zeros(3, dtype=torch.long),
            ValueError,
            "device",
        ),
    ],
)
def test_bad_inputs(hidden, weight, targets, error, match):
    with pytest.raises(error, match=match):
        linear_logprobs(hidden, weight, targets)


@pytest.mark.parametrize("ignore_index", [-100.0, True, None])
def test_bad_ignore_index(ignore_index):
    with pytest.raises(TypeError, match="ignore_index"):
        linear_logprobs(
            torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long), ignore_index=ignore_index
        )
