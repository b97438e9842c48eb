"""kernels/_dispatch.py: TRITONRLHF_KERNELS=reference forces every op onto its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import triton_runs
from tritonrlhf.kernels import _dispatch
from tritonrlhf.kernels._dispatch import LAUNCHES
from tritonrlhf.kernels.gae import gae
from tritonrlhf.kernels.logprobs import logprobs_from_logits


def test_reference_switch_decides_before_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1)
    monkeypatch.setattr(_dispatch, "interpret_mode", lambda: True)
    monkeypatch.delenv(_dispatch.KERNELS_ENV, raising=False)
    assert _dispatch.use_triton(cpu)
    monkeypatch.setenv(_dispatch.KERNELS_ENV, "auto")
    assert _dispatch.use_triton(cpu)
    monkeypatch.setenv(_dispatch.KERNELS_ENV, "reference")
    assert not _dispatch.use_triton(cpu)
    assert not _dispatch.use_triton(torch.empty(0, device="meta"))  # any device, CUDA included


def test_reference_runs_no_kernel(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ops give the kernels' results with no Triton launch (on CUDA, or CPU when interpreted)."""
    logits = torch.randn(3, 5, 37)
    labels = torch.randint(0, 37, (3, 5))
    rewards, values, mask = torch.randn(2, 6), torch.randn(2, 6), torch.ones(2, 6)
    monkeypatch.delenv(_dispatch.KERNELS_ENV, raising=False)
    before = sum(LAUNCHES.values())
    auto = logprobs_from_logits(logits, labels), gae(rewards, values, mask, 1.0, 0.95)
    assert (sum(LAUNCHES.values()) > before) == triton_runs(logits.device)

    monkeypatch.setenv(_dispatch.KERNELS_ENV, "reference")
    before = dict(LAUNCHES)
    ref = logprobs_from_logits(logits, labels), gae(rewards, values, mask, 1.0, 0.95)
    assert dict(LAUNCHES) == before, "a Triton kernel launched under TRITONRLHF_KERNELS=reference"
    torch.testing.assert_close(ref, auto, atol=1e-5, rtol=1e-5)


def test_unknown_value_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_dispatch.KERNELS_ENV, "refrence")
    with pytest.raises(ValueError, match="TRITONRLHF_KERNELS='refrence'"):
        _dispatch.use_triton(torch.zeros(1))
