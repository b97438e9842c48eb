"""``ppo.kl.reference``: at KL coefficient 0, ``auto`` builds no reference model and runs no
reference forward; ``always`` builds it to log the KL. The config checks, the pieces that read
``ref_logprobs`` (rewards, KL stats, the loss spec, ``build_scoring``), and one short GRPO run
per setting that must give the same update."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tritonrlhf.engine.config import ConfigError, PPOConfig, load_config
from tritonrlhf.engine.rl.experience import Experience, compute_rewards

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
GRPO = CONFIGS / "grpo_tiny.yaml"


def _load(*overrides: str, path: Path = GRPO) -> PPOConfig:
    return load_config(PPOConfig, path, list(overrides))


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, needs",
    [
        (["ppo.kl.coef=0.04"], True),
        (["ppo.kl.coef=0"], False),
        (["ppo.kl.coef=0", "ppo.kl.placement=reward"], False),
        (["ppo.kl.coef=0", "ppo.kl.reference=always"], True),
        (["ppo.kl.coef=0.04", "ppo.kl.reference=always"], True),
        (["ppo.kl.coef=0.04", "ppo.kl.adaptive=true"], True),
    ],
)
def test_reference_is_needed_when_the_kl_acts_or_is_asked_for(overrides, needs) -> None:
    from tritonrlhf.engine.rl.actor import PolicyLossSpec

    cfg = _load(*overrides)
    cfg.validate()
    assert cfg.ppo.kl.needs_reference is needs
    # The KL term of the loss (placement=loss) reads the reference: none without one.
    expected = "k3" if needs and cfg.ppo.kl.placement == "loss" else None
    assert PolicyLossSpec.from_config(cfg).kl_kind == expected
    assert PolicyLossSpec.from_config(cfg).kl_clamp == 10.0
    assert PolicyLossSpec.from_config(_load(*overrides, "ppo.kl.log_ratio_clamp=4")).kl_clamp == 4.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ppo.kl.reference=never"], "ppo.kl.reference must be one of"),
        (["ppo.kl.log_ratio_clamp=0"], "ppo.kl.log_ratio_clamp must be > 0"),
        (["ppo.kl.coef=0", "ppo.kl.adaptive=true"], r"ppo.kl.adaptive=true .* needs ppo.kl.coef > 0"),
        (["ppo.kl.coef=-0.1", "ppo.kl.adaptive=true"], r"needs ppo.kl.coef > 0"),
        (["ppo.kl.coef=nan"], "ppo.kl.coef must be finite"),
    ],
)
def test_reference_config_errors_name_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(*overrides).validate()


def test_reference_key_typo_names_the_closest() -> None:
    with pytest.raises(ConfigError, match="'reference'"):
        _load("ppo.kl.referenc=always")


# --------------------------------------------------------------------------- the readers of ref_logprobs
def test_compute_rewards_without_a_reference_is_the_zero_kl_reward() -> None:
    g = torch.Generator().manual_seed(0)
    B, R = 4, 5
    mask = torch.arange(R).expand(B, R) < torch.tensor([[5], [3], [0], [1]])
    scores = torch.randn(B, generator=g)
    lp = -torch.rand(B, R, generator=g)
    rewards, kl = compute_rewards(scores, None, None, mask, 0.0)
    same, zero = compute_rewards(scores, lp, lp, mask, 0.0)  # the policy is its own reference
    assert torch.equal(rewards, same) and torch.equal(kl, zero) and not kl.any()
    assert rewards[2].abs().sum() == 0  # no response token: no score
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logprobs"):
        compute_rewards(scores, lp, None, mask, 0.1)


def test_logprob_stats_without_a_reference_have_no_kl_keys() -> None:
    from tritonrlhf.engine.rl.experience_maker import ExperienceMixin

    g = torch.Generator().manual_seed(0)
    B, P, R = 3, 2, 4
    seq = torch.zeros(B, P + R, dtype=torch.long)
    old = -torch.rand(B, R, generator=g)
    exp = Experience(seq, torch.ones_like(seq), torch.ones(B, R, dtype=torch.bool))
    exp.old_logprobs, exp.rollout_logprobs = old, old + 0.01
    trainer = SimpleNamespace(cfg=SimpleNamespace(ppo=SimpleNamespace(kl=SimpleNamespace(kind="k1"))))
    stats = ExperienceMixin.logprob_stats(trainer, exp, torch.full((B, R), 0.5))
    assert not [k for k in stats if k.startswith("kl/")]  # absent, not zero
    assert stats["entropy/mean"] == pytest.approx(0.5)
    assert stats["rollout/logprob_gap"] == pytest.approx(0.01, abs=1e-6)


@pytest.mark.parametrize("reference, built", [("auto", False), ("always", True)])
def test_build_scoring_builds_a_reference_only_when_needed(tmp_path, reference, built) -> None:
    """The trainer ranks and (``placement.scoring=rollout``) the rollout ranks both build through
    ``build_scoring``: at coefficient 0, ``auto`` loads no reference weights on either."""
    from tritonrlhf.engine.config import TinyModelConfig
    from tritonrlhf.engine.models import build_tiny_model, build_tokenizer
    from tritonrlhf.engine.rl.scoring import ReferenceModel, RewardScorer, build_scoring

    tok = build_tokenizer()
    build_tiny_model(tok, TinyModelConfig(), seed=0).save_pretrained(tmp_path)
    cfg = _load("ppo.kl.coef=0", f"ppo.kl.reference={reference}")
    ref, reward = build_scoring(cfg, str(tmp_path), torch.float32, torch.device("cpu"))
    assert isinstance(ref, ReferenceModel) is built and (ref is None) is not built
    assert isinstance(reward, RewardScorer)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def coef0_runs(tmp_path_factory) -> dict:
    """Two GRPO runs at KL coefficient 0 (the KL term in the loss), same seed, 2 steps of one
    update each (so the old log-probs come from the update's forward, whose buffers no longer
    take their shape from the reference log-probs): ``auto`` and ``always``."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "_scripts"))
    from ppo_launch import launch

    root = tmp_path_factory.mktemp("reference")
    extra = [
        "total_steps=2",
        "rollout.backend=hf",
        "ppo.kl.coef=0",
        "ppo.mini_batch_size=32",  # 8 prompts x 4 samples: one update per step
        "ppo.micro_batch_size=16",
        "logging.tensorboard=false",
    ]
    runs = {}
    for reference in ("auto", "always"):
        run = launch(root / reference, [*extra, f"ppo.kl.reference={reference}"], timeout_s=300, config=GRPO)
        run.check()
        runs[reference] = run
    return runs


@pytest.mark.slow
def test_coef0_auto_builds_no_reference_and_logs_no_kl(coef0_runs) -> None:
    run = coef0_runs["auto"]
    assert "no reference model, no reference forward" in run.output
    assert run.summary["algo/reference"] == "skipped" and run.summary["algo/old_logprobs"] == "update"
    rows = run.metrics
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["algo/reference"] == "skipped" and r["kl_coef"] == 0
        assert not [k for k in r if k.startswith("kl/") or k == "actor/kl_loss"], r
    samples = [json.loads(x) for x in (run.out_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["kl"] is None for s in samples)


@pytest.mark.slow
def test_coef0_always_logs_kl(coef0_runs) -> None:
    run = coef0_runs["always"]
    assert "no reference model" not in run.output
    assert run.summary["algo/reference"] == "model"
    rows = run.metrics
    assert all(r["algo/reference"] == "model" for r in rows)
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-6)  # the first rollout's policy is the reference
    assert rows[1]["kl/mean"] > 0 and math.isfinite(rows[1]["kl/token_mean"])
    assert all(r["actor/kl_loss"] >= 0 for r in rows)


@pytest.mark.slow
def test_coef0_auto_and_always_make_the_same_update(coef0_runs) -> None:
    from tests.engine._scripts.stage_launch import max_weight_diff, metric_diffs, metrics

    a, b = (coef0_runs[k].out_dir for k in ("auto", "always"))
    keys = ("reward/mean", "loss/policy", "actor/grad_norm", "entropy/mean", "rollout/logprob_gap")
    diffs = metric_diffs(metrics(a), metrics(b), keys, 1e-6)
    assert not diffs, f"auto and always differ (step, key): (auto, always): {diffs}"
    assert max_weight_diff(a / "final", b / "final") <= 1e-6


# The split path with placement.scoring=rollout at coefficient 0 (no reference on either side) is
# tests/engine/rl/test_grpo_e2e.py::test_split_with_the_hf_backend_samples_from_the_synced_policy.
