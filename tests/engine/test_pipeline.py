"""The whole demo pipeline (data -> SFT -> RM -> PPO -> DPO -> eval -> report) at CI size.

Real vLLM and DeepSpeed in their own processes, as ``scripts/demo.sh`` runs them.
The success thresholds of the full demo (RM accuracy >= 0.75, PPO gold > SFT gold)
belong to the demo size; at CI size this checks that every stage ran for real and
the report is consistent with the stages' own outputs.
"""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from engine.pipeline import run_pipeline

    run = tmp_path_factory.mktemp("demo")
    run_pipeline(run, size="ci")
    return run


def test_every_stage_left_a_loadable_checkpoint(run_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for policy in ("sft", "ppo/final", "dpo"):
        AutoModelForCausalLM.from_pretrained(run_dir / policy)
    rm = AutoModelForSequenceClassification.from_pretrained(run_dir / "rm")
    assert rm.config.num_labels == 1


def test_summary_report_and_plots(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("rm/accuracy", "gold/sft", "gold/ppo", "gold/dpo", "kl/ppo", "minutes"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert 0.0 <= summary["gold/sft"] <= 1.0 and 0.0 <= summary["rm/accuracy"] <= 1.0
    assert summary["kl/ppo"] > 0.0  # PPO moved the policy away from the SFT reference
    evals = {n: json.loads((run_dir / f"eval_{n}" / "eval.json").read_text()) for n in ("sft", "ppo", "dpo")}
    assert summary["gold/ppo"] == evals["ppo"]["gold_reward"]
    assert evals["sft"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the SFT policy is its own reference
    report = (run_dir / "report.md").read_text()
    assert "RM held-out accuracy" in report and "PPO gold score" in report
    for png in ("ppo_reward_kl.png", "gold_scores.png", "rm_accuracy.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_ppo_stage_metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-4)  # actor == reference before any update
    assert all(r["rollout/logprob_gap"] < 1e-3 for r in rows)  # every weight swap reached vLLM
