"""One update per step, one micro-batch per rank: the values and the old log-probs come from the
update's own forwards (``PPOTrainer.fused_update``, ``train_fused``), with the KL in the reward
formed between the forwards and the backwards. The same update as scoring passes followed by
``train`` (``ppo.reuse_update_forward=false``), step by step: real vLLM and DeepSpeed (ZeRO-3, so
the update's forwards gather partitioned weights), PPO with a critic and the KL in the reward, the
config where both passes were needed before. The fused run is the session's
``ppo_one_update_zero3`` (``tests/engine/rl/conftest.py``), which ``test_ppo_e2e`` reads too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "_scripts"))
from ppo_launch import ONE_UPDATE_ZERO3, launch, require  # noqa: E402

pytestmark = pytest.mark.slow

COMPARED = ("reward/mean", "loss/policy", "loss/value", "kl/mean", "actor/grad_norm", "critic/grad_norm",
            "advantages/mean", "values/mean", "returns/mean", "entropy/mean")  # fmt: skip


def test_values_and_old_logprobs_from_the_update_make_the_same_update(tmp_path, ppo_one_update_zero3) -> None:
    """Fused against separate scoring passes: every compared metric of every step agrees at fp32
    noise (measured: relative 1e-6 or less, 2-core AMD EPYC; asserted 1e-4); the fused run times
    no old-log-prob or value pass, the separate run both; the ratio of the one update is 1."""
    require("vllm", "deepspeed")
    separate = launch(
        tmp_path / "separate", [*ONE_UPDATE_ZERO3, "ppo.reuse_update_forward=false"], timeout_s=300
    )
    separate.check()
    fused = ppo_one_update_zero3
    assert fused.summary["algo/values"] == "update" and fused.summary["algo/old_logprobs"] == "update"
    assert separate.summary["algo/values"] == "scoring" and separate.summary["algo/old_logprobs"] == "scoring"
    assert "the values from the critic's" in fused.output
    for a, b in zip(separate.metrics, fused.metrics, strict=True):
        for k in COMPARED:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k, a[k], b[k])
        assert "time/score/values_s" not in b and "time/score/old_logprobs_s" not in b
        assert a["time/score/values_s"] > 0 and a["time/score/old_logprobs_s"] > 0
        assert b["clipfrac"] == 0 and b["time/train/critic_s"] > 0  # ratio 1 in the one update
    assert fused.metrics[-1]["kl/mean"] > 1e-3  # the policy moved: later steps sample from updates
