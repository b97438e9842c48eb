"""logprobs_from_logits against float64 formulas written here, forward and backward.

On CUDA, and on CPU under TRITON_INTERPRET=1, every call must launch the Triton
kernels; on plain CPU the same tests run the reference path and must launch nothing.
"""

from __future__ import annotations

import pytest
import torch

import tritonrlhf.kernels.logprobs as logprobs_module
from tests.conftest import DTYPES, assert_close_fp64, check_launched, triton_runs
from tritonrlhf.kernels import _dispatch, logprobs_from_logits, logprobs_from_logits_reference

FWD, BWD = logprobs_module.FWD_KERNEL, logprobs_module.BWD_KERNEL


def fp64_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """(leaf z64, logp64, entropy64): the float64 formula, differentiable w.r.t. z64."""
    z = logits.detach().double().requires_grad_()
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return z, logp, entropy


def run_and_check(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    grads: tuple[str, ...] = ("logp", "entropy"),
    always_eager: bool = False,
) -> None:
    """Forward + backward with random upstream grads through ``grads``, checked against fp64."""
    dtype = logits.dtype
    x = logits.clone().requires_grad_()
    before = _dispatch.LAUNCHES[FWD]
    logp, entropy = logprobs_from_logits(x, targets, temperature, return_entropy=True)
    check_launched({FWD: before}, (FWD,))
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert logp.shape == targets.shape and entropy.shape == targets.shape

    upstream = {"logp": torch.randn_like(logp), "entropy": torch.randn_like(entropy)}
    outs = {"logp": logp, "entropy": entropy}
    before = _dispatch.LAUNCHES[BWD]
    torch.autograd.backward([outs[k] for k in grads], [upstream[k] for k in grads])
    check_launched({BWD: before}, (BWD,))
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape

    z64, logp64, entropy64 = fp64_logprobs(logits, targets, temperature)
    outs64 = {"logp": logp64, "entropy": entropy64}
    (grad64,) = torch.autograd.grad([outs64[k] for k in grads], z64, [upstream[k].double() for k in grads])

    eager = {}
    if dtype != torch.float32 or always_eager:
        xe = logits.clone().requires_grad_()
        eager["logp"], eager["entropy"] = logprobs_from_logits_reference(xe, targets, temperature, True)
        torch.autograd.backward([eager[k] for k in grads], [upstream[k] for k in grads])
        eager = {k: v.detach() for k, v in eager.items()}
        eager["grad"] = xe.grad
    assert_close_fp64(logp, logp64.detach(), dtype, eager=eager.get("logp"), name="logp")
    assert_close_fp64(entropy, entropy64.detach(), dtype, eager=eager.get("entropy"), name="entropy")
    assert_close_fp64(x.grad, grad64, dtype, eager=eager.get("grad"), name="grad_logits")


def make_logits(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(shape) * scale).to(dtype)


# Leading ranks 1 to 3; vocabularies that are not powers of two.
SHAPES = [(7, 1271), (2, 5, 401), (2, 3, 2, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_fp64(shape, dtype):
    logits = make_logits(shape, dtype)
    targets = torch.randint(0, shape[-1], shape[:-1])
    run_and_check(logits, targets)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature(temperature, dtype):
    logits = make_logits((5, 1000), dtype)
    targets = torch.randint(0, 1000, (5,))
    run_and_check(logits, targets, temperature)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_extreme_logits(temperature, dtype):
    """+-1e4 entries and -inf (masked) entries, never at the target."""
    vocab = 1271
    logits = make_logits((6, vocab), dtype)
    targets = torch.randint(0, vocab, (6,))
    logits[0, (targets[0] + 1) % vocab] = 1e4  # one dominant entry: near-zero entropy
    logits[1, (targets[1] + 3) % vocab] = 1e4
    logits[1, (targets[1] + 4) % vocab] = 1e4 - 1  # two close dominant entries
    logits[2, targets[2]] = 1e4  # dominant target
    logits[3, (targets[3] + 2) % vocab] = -1e4
    logits[4, (targets[4] + 1) % vocab :] = float("-inf")  # a masked tail
    logits[4, : targets[4]] = float("-inf")  # ... and head: only the target survives
    logits[5, ::7] = float("-inf")
    logits[5, targets[5]] = 0.5
    # fp32 at |z| ~ 1e4 with T != 1 rounds z itself (~5e-4): hold to eager there.
    run_and_check(logits, targets, temperature, always_eager=True)


def test_large_vocab():
    """Qwen-sized vocabulary (151936), a few rows; several V blocks with a masked tail."""
    vocab = 151936
    logits = make_logits((2, vocab), torch.bfloat16)
    targets = torch.randint(0, vocab, (2,))
    logits[1, 100] = float("-inf")
    run_and_check(logits, targets, temperature=0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multiblock_tail(monkeypatch, dtype):
    """Force small V blocks so a 1271 vocabulary takes five loop steps, the last one masked."""
    monkeypatch.setattr(logprobs_module, "MAX_BLOCK_V", 256)
    logits = make_logits((3, 1271), dtype)
    logits[0, 1270] = 9.0  # the max lives in the masked tail block
    logits[1, :256] = float("-inf")  # first block fully masked
    targets = torch.tensor([1270, 300, 5])
    run_and_check(logits, targets, 1.3)


@pytest.mark.parametrize("grads", [("logp",), ("entropy",)])
def test_single_output_backward(grads):
    logits = make_logits((4, 1000), torch.float32)
    targets = torch.randint(0, 1000, (4,))
    run_and_check(logits, targets, 0.7, grads=grads)


def test_logp_only_api():
    logits = make_logits((3, 401), torch.float16).requires_grad_()
    targets = torch.randint(0, 401, (3,))
    logp = logprobs_from_logits(logits, targets)
    assert isinstance(logp, torch.Tensor) and logp.dtype == torch.float32
    _, logp64, _ = fp64_logprobs(logits, targets, 1.0)
    assert_close_fp64(logp, logp64.detach(), torch.float16, name="logp")
    logp.backward(torch.randn_like(logp))
    assert logits.grad.dtype == torch.float16


def test_strided_views():
    """logits[:, :-1] (strided rows, no copy on the Triton path) and a non-unit last-dim stride."""
    full = make_logits((2, 6, 401), torch.float32)
    targets = torch.randint(0, 401, (2, 5))
    run_and_check(full[:, :-1], targets, 0.7)
    transposed = make_logits((401, 4), torch.bfloat16).t()
    run_and_check(transposed, torch.randint(0, 401, (4,)))


def test_strided_targets():
    """Targets that are strided views: ``ids[:, 0]`` and the one-token response ``ids[:, P:]``.

    The kernels index targets as ``ptr + row``; a strided view read that way gives log-probs
    off by several nats (issue 13), so every path must compact it first."""
    ids = torch.randint(0, 401, (6, 9))
    run_and_check(make_logits((6, 401), torch.float32), ids[:, 0], 0.7)
    response = ids[:, 8:]  # [B, 1] with row stride 9
    assert response.stride() == (9, 1)
    run_and_check(make_logits((6, 1, 401), torch.bfloat16), response)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ignore_index(dtype):
    """Targets equal to ignore_index: logp 0, entropy 0, zero gradient rows."""
    logits = make_logits((3, 4, 401), dtype)
    targets = torch.randint(0, 401, (3, 4))
    targets[0, 2:] = -100
    targets[2, 0] = -100
    ignored = targets == -100
    x = logits.clone().requires_grad_()
    before = _dispatch.LAUNCHES[FWD]
    logp, entropy = logprobs_from_logits(x, targets, 0.7, return_entropy=True)
    check_launched({FWD: before}, (FWD,))
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
    g_logp, g_ent = torch.randn_like(logp), torch.randn_like(entropy)
    torch.autograd.backward([logp, entropy], [g_logp, g_ent])
    assert (x.grad[ignored] == 0).all()

    keep = ~ignored
    z64, logp64, entropy64 = fp64_logprobs(logits[keep], targets[keep], 0.7)
    (grad64,) = torch.autograd.grad([logp64, entropy64], z64, [g_logp[keep].double(), g_ent[keep].double()])
    eager = {}
    if dtype != torch.float32:
        xe = logits[keep].clone().requires_grad_()
        outs = logprobs_from_logits_reference(xe, targets[keep], 0.7, True)
        torch.autograd.backward(list(outs), [g_logp[keep], g_ent[keep]])
        eager = {"logp": outs[0].detach(), "entropy": outs[1].detach(), "grad": xe.grad}
    assert_close_fp64(logp[keep], logp64.detach(), dtype, eager=eager.get("logp"), name="logp")
    assert_close_fp64(entropy[keep], entropy64.detach(), dtype, eager=eager.get("entropy"), name="entropy")
    assert_close_fp64(x.grad[keep], grad64, dtype, eager=eager.get("grad"), name="grad_logits")


def test_custom_ignore_index_inside_vocab():
    logits = make_logits((4, 50), torch.float32)
    targets = torch.tensor([7, 3, 7, 0])
    logp = logprobs_from_logits(logits, targets, ignore_index=7)
    _, logp64, _ = fp64_logprobs(logits, targets, 1.0)
    assert (logp[[0, 2]] == 0).all()
    assert_close_fp64(logp[[1, 3]], logp64[[1, 3]].detach(), torch.float32, name="logp")


def test_logp_only_skips_entropy():
    """return_entropy=False compiles the forward without the entropy accumulator."""
    logits = make_logits((5, 1271), torch.bfloat16)
    targets = torch.randint(0, 1271, (5,))
    before = _dispatch.LAUNCHES[logprobs_module.FWD_ENTROPY]
    run_and_check(logits, targets, grads=("logp",))  # with entropy
    if triton_runs():
        assert _dispatch.LAUNCHES[logprobs_module.FWD_ENTROPY] == before + 1
    x = logits.clone().requires_grad_()
    logp = logprobs_from_logits(x, targets, 0.7)
    assert _dispatch.LAUNCHES[logprobs_module.FWD_ENTROPY] == before + int(triton_runs())
    g = torch.randn_like(logp)
    logp.backward(g)
    z64, logp64, _ = fp64_logprobs(logits, targets, 0.7)
    (grad64,) = torch.autograd.grad(logp64, z64, g.double())
    assert_close_fp64(logp, logp64.detach(), torch.bfloat16, name="logp")
    assert_close_fp64(x.grad, grad64, torch.bfloat16, name="grad_logits")


def test_empty_rows():
    logits = torch.randn(0, 7, requires_grad=True)
    logp, entropy = logprobs_from_logits(logits, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert logp.shape == (0,) and entropy.shape == (0,) and logp.dtype == torch.float32
    (logp.sum() + entropy.sum()).backward()
    assert logits.grad.shape == (0, 7)


def test_out_of_range_targets():
    logits = make_logits((4, 50), torch.float32)
    targets = torch.tensor([3, 50, -1, -100])
    if not triton_runs():
        with pytest.raises(ValueError, match="targets"):
            logprobs_from_logits(logits, targets)
        return
    # Triton path: no out-of-bounds read; the row of an invalid target gives NaN.
    logp = logprobs_from_logits(logits, targets)
    _, logp64, _ = fp64_logprobs(logits[:1], targets[:1], 1.0)
    assert_close_fp64(logp[:1], logp64.detach(), torch.float32, name="logp")
    assert torch.isnan(logp[1:3]).all() and logp[3] == 0


@pytest.mark.parametrize(
    "logits, targets, kwargs, error, match",
    [
        (
            torch.randn(3, 10),
            torch.zeros(4, dtype=torch.long),
            {},
            ValueError,
            r"targets\[4\].*logits\[3, 10\]",
        ),
        (torch.randn(2, 3, 10), torch.zeros(3, 2, dtype=torch.long), {}, ValueError, "targets"),
        (torch.randint(0, 5, (3, 10)), torch.zeros(3, dtype=torch.long), {}, TypeError, "logits"),
        (torch.randn(3, 10), torch.zeros(3), {}, TypeError, "targets"),
        (torch.randn(3, 0), torch.zeros(3, dtype=torch.long), {}, ValueError, r"logits\[3, 0\]"),
        (torch.randn(3, 10), torch.zeros(3, dtype=torch.long, device="meta"), {}, ValueError, "device"),
        (
            torch.randn(3, 10),
            torch.zeros(3, dtype=torch.long),
            {"temperature": 0.0},
            ValueError,
            "temperature",
        ),
        (
            torch.randn(3, 10),
            torch.zeros(3, dtype=torch.long),
            {"ignore_index": -1.5},
            TypeError,
            "ignore_index",
        ),
    ],
)
def test_bad_inputs(logits, targets, kwargs, error, match):
    with pytest.raises(error, match=match):
        logprobs_from_logits(logits, targets, **kwargs)
