"""GPU-only kernel checks: sizes the CPU cannot afford, and properties only a GPU has.

- N=16384 x V=151936 bf16 (the README's shapes), checked against fp64 on sampled rows;
- a vocabulary that is not a multiple of 8 (32001);
- PPO losses with T=4096 over many sequences;
- no host sync on any kernel path (``torch.cuda.set_sync_debug_mode("error")``);
- bitwise-equal results when a call is repeated;
- CUDA-graph capture and replay of forward and backward.

Every test is marked ``cuda``: on a machine without a GPU each one is reported as
skipped with the reason. ``scripts/gpu_check.sh`` runs them on the GPU machine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch

from tests.conftest import assert_close_fp64, check_launched
from tests.kernels.test_linear_logprobs import fp64_linear_logprobs
from tests.kernels.test_logprobs import fp64_logprobs
from tests.kernels.test_ppo_loss import REDUCTIONS, _policy64, _value64
from tritonrlhf.kernels import (
    gae,
    kl_penalty,
    linear_logprobs,
    linear_logprobs_reference,
    logprobs_from_logits,
    logprobs_from_logits_reference,
    ppo_policy_loss,
    ppo_value_loss,
)
from tritonrlhf.kernels._dispatch import LAUNCHES
from tritonrlhf.kernels.logprobs import BWD_KERNEL as BWD
from tritonrlhf.kernels.logprobs import FWD_KERNEL as FWD

pytestmark = pytest.mark.cuda
# The package re-exports the function under the module's own name, so fetch the module explicitly.
linear_module = importlib.import_module("tritonrlhf.kernels.linear_logprobs")


def _sampled_rows(n: int, k: int = 48) -> torch.Tensor:
    return torch.randperm(n)[:k].sort().values


# --------------------------------------------------------------------------- sizes
def test_logprobs_readme_shape_bf16():
    """N=16384 x V=151936 bf16 forward and backward; fp64 check on sampled rows."""
    n, vocab = 16384, 151936
    logits = (torch.randn(n, vocab, dtype=torch.bfloat16) * 3).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    targets[::97] = -100
    before = dict(LAUNCHES)
    logp, entropy = logprobs_from_logits(logits, targets, 0.7, return_entropy=True)
    g_logp, g_ent = torch.randn_like(logp), torch.randn_like(entropy)
    torch.autograd.backward([logp, entropy], [g_logp, g_ent])
    check_launched(before, (FWD, BWD))
    rows = _sampled_rows(n)
    rows = rows[targets[rows] != -100]
    z64, logp64, ent64 = fp64_logprobs(logits.detach()[rows], targets[rows], 0.7)
    (grad64,) = torch.autograd.grad([logp64, ent64], z64, [g_logp[rows].double(), g_ent[rows].double()])
    assert_close_fp64(logp[rows], logp64.detach(), torch.bfloat16, name="logp")
    assert_close_fp64(entropy[rows], ent64.detach(), torch.bfloat16, name="entropy")
    assert_close_fp64(logits.grad[rows], grad64, torch.bfloat16, name="grad_logits")
    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (logits.grad[ignored] == 0).all()
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()


def test_linear_logprobs_readme_shape_bf16():
    """N=16384 x V=151936, H=1024 bf16 (several vocabulary blocks): sampled rows against fp64,
    grad_weight against the fp32 chunked reference within bf16 error."""
    n, vocab, width = 16384, 151936, 1024
    hidden = (torch.randn(n, width) * width**-0.5).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, width) * 2 * width**-0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    targets[5::211] = -100
    logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True)
    g_logp, g_ent = torch.randn_like(logp), torch.randn_like(entropy)
    torch.autograd.backward([logp, entropy], [g_logp, g_ent])
    assert linear_module.vocab_block_cols(n, vocab, 2) < vocab  # really several blocks

    rows = _sampled_rows(n)
    rows = rows[targets[rows] != -100]
    h64, _, logp64, ent64 = fp64_linear_logprobs(hidden.detach()[rows], weight.detach(), targets[rows], 1.0)
    (gh64,) = torch.autograd.grad([logp64, ent64], h64, [g_logp[rows].double(), g_ent[rows].double()])
    assert_close_fp64(logp[rows], logp64.detach(), torch.bfloat16, name="logp")
    assert_close_fp64(entropy[rows], ent64.detach(), torch.bfloat16, name="entropy")
    assert_close_fp64(hidden.grad[rows], gh64, torch.bfloat16, name="grad_hidden")

    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    outs = linear_logprobs_reference(h32, w32, targets, return_entropy=True)
    torch.autograd.backward(list(outs), [g_logp, g_ent])
    err = (weight.grad.float() - w32.grad).abs().max()
    scale = w32.grad.abs().max()
    assert torch.isfinite(weight.grad).all() and err <= 2e-2 * scale, (float(err), float(scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_not_multiple_of_8(dtype):
    """V=32001: unaligned logits rows and a partial last vocabulary block."""
    vocab, width = 32001, 64
    logits = (torch.randn(37, vocab) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (37,))
    targets[0] = vocab - 1
    logp = logprobs_from_logits(logits, targets, 1.3)
    g = torch.randn_like(logp)
    logp.backward(g)
    z64, logp64, _ = fp64_logprobs(logits.detach(), targets, 1.3)
    (grad64,) = torch.autograd.grad(logp64, z64, g.double())
    assert_close_fp64(logp, logp64.detach(), dtype, name="logp")
    assert_close_fp64(logits.grad, grad64, dtype, name="grad_logits")

    hidden = torch.randn(300, width).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, width) * 2 * width**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (300,))
    targets[1] = vocab - 1
    logp = linear_logprobs(hidden, weight, targets)
    g = torch.randn_like(logp)
    logp.backward(g)
    h64, w64, logp64, _ = fp64_linear_logprobs(hidden.detach(), weight.detach(), targets, 1.0)
    gh64, gw64 = torch.autograd.grad(logp64, (h64, w64), g.double())
    eager = {}
    if dtype != torch.float32:  # eager PyTorch at the same precision, full logits
        he, we = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        logp_e = logprobs_from_logits_reference(he @ we.T, targets)
        logp_e.backward(g)
        eager = {"logp": logp_e.detach(), "h": he.grad, "w": we.grad}
    assert_close_fp64(logp, logp64.detach(), dtype, eager=eager.get("logp"), name="linear logp")
    assert_close_fp64(hidden.grad, gh64, dtype, eager=eager.get("h"), name="grad_hidden")
    assert_close_fp64(weight.grad, gw64, dtype, eager=eager.get("w"), name="grad_weight")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ppo_losses_long_sequences(reduction):
    """T=4096 over 512 sequences with ragged masks; loss, stats and gradients against fp64."""
    S, T = 512, 4096
    logp = -2.0 * torch.rand(S, T)
    old = logp + 0.3 * torch.randn(S, T)
    adv = torch.randn(S, T)
    lengths = torch.randint(0, T + 1, (S,))
    mask = torch.arange(T)[None, :] < lengths[:, None]
    x = logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old, adv, mask, clip_high=0.28, dual_clip=3.0, reduction=reduction)
    loss.backward()
    x64, loss64, stats64 = _policy64(logp, old, adv, mask.double(), 0.2, 0.28, 3.0, reduction)
    loss64.backward()
    assert_close_fp64(loss.reshape(1), loss64.detach().reshape(1), torch.float32, name="loss")
    assert_close_fp64(x.grad, x64.grad, torch.float32, name="grad logp")
    for key in ("approx_kl", "ratio_mean", "ratio_max"):
        want = torch.tensor([stats64[key]], dtype=torch.float64)
        assert_close_fp64(stats[key].reshape(1), want, torch.float32, name=key)

    v = logp.clone().requires_grad_()
    vloss, _ = ppo_value_loss(v, old, adv, mask, clip=0.2, reduction=reduction)
    vloss.backward()
    v64, vloss64, _ = _value64(logp, old, adv, mask.double(), 0.2, reduction)
    vloss64.backward()
    assert_close_fp64(vloss.reshape(1), vloss64.detach().reshape(1), torch.float32, name="value loss")
    assert_close_fp64(v.grad, v64.grad, torch.float32, name="grad values")


# --------------------------------------------------------------------------- properties
def _every_kernel_step() -> tuple[Callable[[], list[torch.Tensor]], list[torch.Tensor]]:
    """``(step, inputs)``: ``step()`` runs one forward + backward through every kernel path
    and returns the outputs and gradients; ``inputs`` are its floating-point inputs."""
    n, vocab, width, S, T = 512, 32001, 128, 8, 256
    logits = torch.randn(n, vocab, dtype=torch.bfloat16).requires_grad_()
    hidden = torch.randn(n, width, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, width) * width**-0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (n, 2))[:, 1]  # strided, like the actor's one-token responses
    targets[::13] = -100
    logp_in = (-2 * torch.rand(S, T)).requires_grad_()
    old, adv, ref = -2 * torch.rand(S, T), torch.randn(S, T), -2 * torch.rand(S, T)
    mask = torch.rand(S, T) > 0.2
    g_n = torch.randn(n)

    def step() -> list[torch.Tensor]:
        for t in (logits, hidden, weight, logp_in):
            t.grad = None
        lp, ent = logprobs_from_logits(logits, targets, 0.7, return_entropy=True)
        lp_only = logprobs_from_logits(logits.detach(), targets)  # forward without entropy
        llp, lent = linear_logprobs(hidden, weight, targets, return_entropy=True)
        ref_lp = linear_logprobs(hidden.detach(), weight.detach(), targets)  # logp-only forward
        loss, stats = ppo_policy_loss(logp_in, old, adv, mask, reduction="seq_mean_token_mean")
        vloss, _ = ppo_value_loss(logp_in, old, adv, mask)
        kl = kl_penalty(logp_in, ref, "k3")
        adv_out, ret = gae(adv, old, mask, 1.0, 0.95)
        total = loss + vloss + (kl * mask).sum()
        torch.autograd.backward([lp, ent, llp, lent, total], [g_n, g_n, g_n, g_n, None])
        grads = [t.grad for t in (logits, hidden, weight, logp_in)]
        return [lp, ent, lp_only, llp, lent, ref_lp, loss, vloss, kl, adv_out, ret, *stats.values(), *grads]

    return step, [logits, hidden, weight, logp_in, old, adv, ref]


def test_no_host_sync():
    """No kernel path (forward or backward) makes the host wait for the GPU."""
    step, _ = _every_kernel_step()
    step()  # compile the Triton kernels and probe the GEMM modes outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_bitwise_repeatable():
    """The same call twice gives bitwise-equal outputs and gradients (no atomics, fixed orders)."""
    step, _ = _every_kernel_step()
    first = [t.clone() for t in step()]
    second = step()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {i} differs between two identical calls"


def test_cuda_graph_capture_forward_and_backward():
    """Forward and backward of every kernel path captured in one CUDA graph and replayed on new
    inputs (copied into the captured tensors) match eager calls on those inputs."""
    step, inputs = _every_kernel_step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up (Triton compilation, GEMM mode probe) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in inputs:
            t.add_(0.1 * torch.randn_like(t))
    graph.replay()
    replayed = [t.clone() for t in captured]
    eager = step()
    for i, (a, b) in enumerate(zip(replayed, eager)):
        # cuBLAS may pick another algorithm on the capture stream: equal up to rounding.
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3, msg=lambda m, i=i: f"result {i}: {m}")
