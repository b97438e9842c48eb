"""Responses cut at ``max_new_tokens``: the finish reason reaches the batch, the reward function,
the score (``reward.missing_eos_penalty``), the loss mask (``reward.on_truncated``) and the log."""

from __future__ import annotations

import pytest
import torch

from tritonrlhf.engine.config import ConfigError, PPOConfig
from tritonrlhf.engine.rl.experience import collate_samples, truncation_terms
from tritonrlhf.engine.rl.rollout import Sample
from tritonrlhf.engine.rl.scoring import RewardScorer


class _Tok:
    pad_token_id = 0

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(map(str, x)) for x in ids]


def _samples() -> list[Sample]:
    return [
        Sample([1, 2], [5, 6, 2], [-1.0, -1.0, -0.5], "stop", 0),
        Sample([1], [7, 7, 7, 7], [-1.0] * 4, "length", 0),
        Sample([3, 4, 5], [2], [-0.1], "stop", 0),
    ]


def test_collate_carries_finish_reasons_and_truncated() -> None:
    rb = collate_samples(_samples(), _Tok(), 0)
    assert rb.finish_reasons == ["stop", "length", "stop"]
    assert rb.truncated.tolist() == [False, True, False]


def test_reward_functions_get_finish_reasons_when_they_take_them() -> None:
    seen = {}

    def with_reasons(prompts, responses, finish_reasons):
        seen["reasons"] = finish_reasons
        return [0.0 if r == "length" else 1.0 for r in finish_reasons]

    def with_kwargs(prompts, responses, **kw):
        seen["kw"] = kw
        return [1.0] * len(prompts)

    def plain(prompts, responses):
        return [1.0] * len(prompts)

    rb = collate_samples(_samples(), _Tok(), 0)
    scores, _ = RewardScorer.from_function(with_reasons).score(
        rb.prompts, rb.responses, None, None, rb.finish_reasons
    )
    assert seen["reasons"] == ["stop", "length", "stop"] and scores.tolist() == [1.0, 0.0, 1.0]
    RewardScorer.from_function(with_kwargs).score(rb.prompts, rb.responses, None, None, rb.finish_reasons)
    assert seen["kw"] == {"finish_reasons": ["stop", "length", "stop"]}
    scores, _ = RewardScorer.from_function(plain).score(
        rb.prompts, rb.responses, None, None, rb.finish_reasons
    )
    assert scores.tolist() == [1.0, 1.0, 1.0]  # a function without the argument is called as before

    s = _samples()
    RewardScorer.from_function(with_reasons).score_samples(s, _Tok())  # the rollout ranks' path
    assert [x.score for x in s] == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("reward.on_truncated", "drop", "reward.on_truncated"),
        ("reward.missing_eos_penalty", -1.0, "reward.missing_eos_penalty must be >= 0"),
        ("reward.missing_eos_penalty", float("nan"), "reward.missing_eos_penalty must be >= 0"),
    ],
)
def test_truncation_options_are_checked(key, value, match) -> None:
    cfg = PPOConfig()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_best_of_n_refuses_the_rl_only_truncation_options() -> None:
    from tritonrlhf.engine.stages.best_of_n import BoNConfig

    cfg = BoNConfig()
    cfg.reward.missing_eos_penalty = 1.0
    with pytest.raises(ConfigError, match="apply to RL runs"):
        cfg.validate()


def test_truncated_defaults_to_none_cut() -> None:
    rb = collate_samples(_samples(), _Tok(), 0)
    rb.finish_reasons = None  # a batch built without them (older callers): nothing counts as cut
    assert rb.truncated.tolist() == [False, False, False]
    assert torch.equal(rb.truncated, torch.zeros(3, dtype=torch.bool))


def test_truncation_terms_penalize_and_mask() -> None:
    cut = torch.tensor([False, True, True, False])
    penalty, trained = truncation_terms(cut, 0.5, "score")
    assert penalty.tolist() == [0.0, -0.5, -0.5, 0.0] and trained.tolist() == [True] * 4
    penalty, trained = truncation_terms(cut, 0.0, "mask")
    assert penalty.tolist() == [0.0] * 4 and trained.tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="on_truncated"):
        truncation_terms(cut, 0.0, "drop")


@pytest.mark.slow
def test_run_logs_truncated_share_and_penalizes_it(tmp_path) -> None:
    """A GRPO run (transformers rollout) whose 4-token responses are mostly cut: each step logs the
    truncated share, and the missing-EOS penalty it applied is exactly -penalty x that share."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "_scripts"))
    from ppo_launch import REPO, launch

    extra = [
        "total_steps=2",
        "rollout.backend=hf",
        "rollout.max_new_tokens=4",
        "reward.missing_eos_penalty=0.5",
        "reward.on_truncated=mask",
        "logging.tensorboard=false",
    ]
    run = launch(tmp_path / "trunc", extra, timeout_s=300, config=REPO / "configs" / "grpo_tiny.yaml")
    run.check()
    rows = run.metrics
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["rollout/truncated_frac"] <= 1  # a random policy rarely stops within 4 tokens
        assert r["reward/missing_eos_penalty"] == pytest.approx(-0.5 * r["rollout/truncated_frac"], abs=1e-6)
