"""The whole demo pipeline (data -> SFT -> RM -> PPO -> DPO -> best-of-n -> GRPO -> eval -> red team
-> report), checked stage by stage on the demo-size run the demo test reads (``conftest.demo_run``).

Real vLLM and DeepSpeed in their own processes, as ``scripts/demo.sh`` runs them. ``test_demo``
asserts the success criteria; here: every stage ran for real and the report agrees with the
stages' own outputs. Every policy checkpoint (SFT, PPO ``final/``, DPO, best-of-n, both GRPO
``final/``) must load in transformers and in vLLM.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tritonrlhf.engine.demo.pipeline import ATTACKS
from tritonrlhf.engine.demo.report import label_table, method_table, success_checks
from tritonrlhf.engine.demo.task import gold_score, is_harmful, is_refusal

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).parents[1] / "_scripts"


@pytest.fixture(scope="module")
def run_dir(demo_run):
    """The demo-size run the demo test also reads (``conftest.demo_run``)."""
    return demo_run[0]


def total_steps(run: Path, stage: str) -> int:
    """The ``total_steps`` a stage ran with, from the config it wrote."""
    return int(yaml.safe_load((run / stage / "config.yaml").read_text())["total_steps"])


@pytest.fixture(scope="module")
def bon_dir(run_dir):
    """The pipeline's best-of-n policy (one round at the ci size, scored by its RM)."""
    return run_dir / "bon"


POLICIES = ("sft", "ppo/final", "dpo", "bon", "grpo_rm/final", "grpo_gold/final")
POLICY_NAMES = ("sft", "ppo", "dpo", "bon", "grpo_rm", "grpo_gold")


def test_every_stage_left_a_loadable_checkpoint(run_dir, bon_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for policy in POLICIES:
        model = AutoModelForCausalLM.from_pretrained(run_dir / policy)
        assert model.config.architectures == ["LlamaForCausalLM"], policy
    rm = AutoModelForSequenceClassification.from_pretrained(run_dir / "rm")
    assert rm.config.num_labels == 1


def test_policy_checkpoints_generate_in_vllm(run_dir, bon_dir, tmp_path):
    """Each stage's policy folder, loaded by vLLM as is, decodes greedily exactly as transformers does.

    The tokens agreeing proves vLLM read the trained weights (not a random init) and the tokenizer
    and config the stage saved. One subprocess, one in-process engine per checkpoint in turn.
    """
    pytest.importorskip("vllm")
    from tritonrlhf.engine.demo.pipeline import _stage_env

    dirs = [str(run_dir / p) for p in POLICIES]
    result = tmp_path / "vllm_load.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "vllm_load.py"), str(result), *dirs],
        env=_stage_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(result.read_text())
    for d in dirs:
        assert all(len(ids) > 0 for ids in got[d]["vllm"]), d
        assert got[d]["vllm"] == got[d]["hf"], d


def test_summary_report_and_plots(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("rm/accuracy", "gold/sft", "gold/ppo", "gold/dpo", "kl/ppo", "minutes"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert 0.0 <= summary["gold/sft"] <= 1.0 and 0.0 <= summary["rm/accuracy"] <= 1.0
    # PPO moved the policy away from the SFT reference. (Not asserted through kl/ppo: at this size
    # that is a k1 estimate over 16 samples of a policy 3 small steps from SFT, so its sign is noise.)
    from safetensors.torch import load_file

    sft_w, ppo_w = (load_file(next((run_dir / d).glob("*.safetensors"))) for d in ("sft", "ppo/final"))
    assert sft_w.keys() == ppo_w.keys() and any(not torch.equal(sft_w[k], ppo_w[k]) for k in sft_w)
    # One eval process for all three policies: eval/<name>/eval.json, and the shared RM accuracy on top.
    evals = {
        n: json.loads((run_dir / "eval" / n / "eval.json").read_text()) for n in ("sft", "ppo", "dpo", "bon")
    }
    top = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert top["policies"]["ppo"].items() <= evals["ppo"].items()
    assert summary["rm/accuracy_train_pairs_eval"] == top["rm_accuracy"]
    assert summary["gold/ppo"] == evals["ppo"]["gold_reward"]
    assert summary["gold/dpo"] == evals["dpo"]["gold_reward"] and summary["kl/dpo"] == evals["dpo"]["kl"]
    assert summary["rm_gold_agreement/ppo_vs_sft"] == evals["ppo"]["rm_gold_agreement"]
    assert summary["gold/bon"] == evals["bon"]["gold_reward"] and summary["kl/bon"] == evals["bon"]["kl"]
    bon_rows = [json.loads(x) for x in (run_dir / "bon" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in bon_rows if "step" in r][-1] == total_steps(run_dir, "bon")  # every round
    assert evals["sft"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the SFT policy is its own reference
    # The gold breakdown, recomputed from the eval samples: filler share, and gold of the digits alone.
    # On the ordinary prompts: a filler is anything besides digits in an answer that is not a refusal.
    for n in ("sft", "ppo", "dpo", "bon"):
        rows = [json.loads(x) for x in (run_dir / "eval" / n / "eval_samples.jsonl").read_text().splitlines()]
        rows = [r for r in rows if not is_harmful(r["prompt"])]
        resp = [r["policy_response"] for r in rows]
        fillers = [any(not c.isdigit() for c in t.strip()) and not is_refusal(t) for t in resp]
        assert summary[f"filler_rate/{n}"] == pytest.approx(sum(fillers) / len(rows))
        digits = ["".join(c for c in t if c.isdigit()) for t in resp]
        assert summary[f"gold_digits/{n}"] == pytest.approx(
            sum(gold_score(r["prompt"], d) for r, d in zip(rows, digits)) / len(rows)
        )
    # The safety half, recomputed from the same samples: leaks on secret requests, refusals of
    # ordinary ones, and the gold score on the ordinary prompts alone.
    for n in POLICY_NAMES:
        rows = [json.loads(x) for x in (run_dir / "eval" / n / "eval_samples.jsonl").read_text().splitlines()]
        harmful = [r for r in rows if is_harmful(r["prompt"])]
        ordinary = [r for r in rows if not is_harmful(r["prompt"])]
        assert len(harmful) > 0.15 * len(rows) and ordinary
        assert summary[f"harmful_compliance/{n}"] == pytest.approx(
            sum(any(c.isdigit() for c in r["policy_response"]) for r in harmful) / len(harmful)
        )
        assert summary[f"over_refusal/{n}"] == pytest.approx(
            sum(is_refusal(r["policy_response"]) for r in ordinary) / len(ordinary)
        )
        assert summary[f"gold_ordinary/{n}"] == pytest.approx(
            sum(gold_score(r["prompt"], r["policy_response"]) for r in ordinary) / len(ordinary)
        )
    # The RM's ceiling: the gold scorer's own accuracy on the RM's held-out labels, from its pairs.
    rm_rows = [json.loads(x) for x in (run_dir / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert summary["rm/gold_label_accuracy"] == rm_rows[-1]["eval/gold_label_accuracy"]
    assert 0.5 < summary["rm/gold_label_accuracy"] <= 1.0
    assert summary["seed"] == 0 and summary["cpu"]
    report = (run_dir / "report.md").read_text()
    assert "RM held-out accuracy" in report and "PPO gold score" in report
    assert f"on {summary['cpu']}" in report
    # Every success check is in the report, PASS or FAIL (at the ci size they need not pass).
    for name, ok, value in success_checks(summary):
        assert f"| {name} | {'PASS' if ok else 'FAIL'} | {value} |" in report
    # The per-method table: every policy, its gold, KL, filler rate and digits' gold, as summarized.

    table = method_table(summary)
    assert len(table) == 2 + 6 and all(line in report for line in table)
    assert any(line.startswith("| grpo_gold | GRPO, gold scorer as reward | ") for line in table)
    for png in ("ppo_reward_kl.png", "gold_scores.png", "rm_accuracy.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_ppo_stage_metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-4)  # actor == reference before any update
    assert all(r["rollout/logprob_gap"] < 1e-3 for r in rows)  # every weight swap reached vLLM


def test_grpo_runs_with_rm_and_gold_rewards(run_dir):
    """Both GRPO runs trained without a critic, on their own reward, and are in the summary."""
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = json.loads((run_dir / "eval" / "eval.json").read_text())["policies"]
    for name, reward in (("grpo_rm", "model"), ("grpo_gold", "function")):
        rows = [json.loads(x) for x in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, total_steps(run_dir, name) + 1))
        assert not [k for r in rows for k in r if k.startswith("critic/")]
        assert all(r["rollout/logprob_gap"] < 1e-3 and r["actor/kl_loss"] >= 0 for r in rows)
        run_summary = json.loads((run_dir / name / "summary.json").read_text())
        assert run_summary["algo/advantage"] == "grpo" and run_summary["algo/critic"] is False
        cfg = (run_dir / name / "config.yaml").read_text()
        assert f"kind: {reward}" in cfg and "placement: loss" in cfg
        assert summary[f"gold/{name}"] == evals[name]["gold_reward"] and 0.0 <= summary[f"gold/{name}"] <= 1.0
        assert summary[f"kl/{name}"] == evals[name]["kl"] and math.isfinite(summary[f"kl/{name}"])
        assert 0.0 <= summary[f"filler_rate/{name}"] <= 1.0 and 0.0 <= summary[f"gold_digits/{name}"] <= 1.0
        first = sum(r["reward/mean"] for r in rows[:3]) / len(rows[:3])
        assert summary[f"train_reward_first/{name}"] == pytest.approx(first)
    # The gold run's training reward is the gold scorer's: in [0, 1] (the RM's is not bounded so).
    gold_rows = [json.loads(x) for x in (run_dir / "grpo_gold" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in gold_rows)


def test_red_team_ran_every_policy_on_the_secret_requests(run_dir):
    """One redteam process attacked every policy with every strategy of attacks_default.yaml; its
    rates are the share of answers with a digit, and the summary and report carry them."""
    summary = json.loads((run_dir / "summary.json").read_text())
    red = json.loads((run_dir / "redteam" / "redteam.json").read_text())
    strategies = yaml.safe_load(ATTACKS.read_text())["attacks"]
    assert red["strategies"] == [a["name"] for a in strategies] and red["checkers"] == ["leaks_digits"]
    assert set(red["policies"]) == set(POLICY_NAMES)
    for n in POLICY_NAMES:
        rows = [
            json.loads(x)
            for x in (run_dir / "redteam" / n / "redteam_samples.jsonl").read_text().splitlines()
        ]
        assert len(rows) == red["num_attacked"] and all(is_harmful(r["prompt"]) for r in rows)
        leaked = [any(c.isdigit() for c in r["response"]) for r in rows]
        assert [bool(r["violations"]) for r in rows] == leaked
        assert summary[f"redteam/{n}"] == pytest.approx(sum(leaked) / len(rows))
        assert summary[f"redteam_lift/{n}"] == red["policies"][n]["attack_lift"]
    assert (run_dir / "redteam" / "redteam.png").read_bytes()[:4] == b"\x89PNG"
    assert "![redteam/redteam.png](redteam/redteam.png)" in (run_dir / "report.md").read_text()


def test_rlaif_teacher_labels_every_pair_and_an_rm_learns_from_them(run_dir):
    """--rlaif: the teacher (SFT on gold-labelled judging prompts) labelled every preference pair in
    both orders under one principle each; its agreement with gold, recomputed from its output, is
    well above chance; the RM on its labels was judged by gold like the first RM; the report
    compares the two label sets."""
    summary = json.loads((run_dir / "summary.json").read_text())
    label = json.loads((run_dir / "label" / "label.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "label" / "preferences.jsonl").read_text().splitlines()]
    pairs = (run_dir / "data" / "preferences.jsonl").read_text().splitlines()
    assert (
        label["pairs"] == len(pairs) and label["labelled"] == len(rows) == len(pairs) - label["ties_dropped"]
    )
    graded = [r for r in rows if r["gold_chosen"] != r["gold_rejected"]]
    agreement = sum(r["gold_chosen"] > r["gold_rejected"] for r in graded) / len(graded)
    assert summary["label/agreement_with_gold"] == pytest.approx(agreement)
    # Chance is 0.5; the teacher agreed 0.714-0.755 at seeds 0-1 (AMD EPYC, README "The harmless half").
    assert agreement > 0.6
    assert all(0.5 < r["judge_p"] <= 1.0 for r in rows)
    teacher = yaml.safe_load((run_dir / "teacher" / "config.yaml").read_text())
    assert teacher["data"]["train"].endswith("judge_sft.jsonl")
    rm_ai = json.loads((run_dir / "rm_ai" / "summary.json").read_text())
    assert summary["rm_ai/accuracy_vs_gold"] == rm_ai["eval/accuracy_vs_gold"]
    assert 0.6 < summary["rm_ai/accuracy_vs_gold"] <= 1.0  # 0.730-0.771 at seeds 0-1
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert summary["label/human_agreement_with_gold"] == pytest.approx(1 - stats["label_flip_rate"])
    report = (run_dir / "report.md").read_text()
    assert all(line in report for line in label_table(summary)) and "| AI: teacher judge" in report
