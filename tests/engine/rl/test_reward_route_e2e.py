"""End to end: PPO (real vLLM, real DeepSpeed, one rank on CPU) with reward models on their own tokenizer.

* ``text_run``: the policy is the tiny toy-tokenizer Llama (64 tokens); the reward model a tiny
  Llama on ``_scripts/other_tokenizer.py``'s tokenizer (89 tokens, 128 embedding rows, its own
  chat template). The run must log the text route, and every score it trained on must equal the
  RM's score of the same texts rendered with the RM's template and tokenized by hand.
* ``split_run``: the same on two ranks, ``placement.mode=split`` with ``placement.scoring=rollout``:
  the rollout rank scores through the text route, and the trainer trains on its scores.
* ``calibrated_run``: a reward model on the policy's own tokenizer, ``critic.init_from=reward`` and
  ``ppo.reward_norm``: the critic's first values must be on the normalised scale.
* ``refusals``: ``critic.init_from=reward`` with the other-tokenizer RM, and ``reward.tokenizer=policy``
  where the policy emits ids the RM has no row for, fail before vLLM is imported.

The runs go through ``_scripts/ppo_rm_text.py`` (the real CLI, with the scorer's calls recorded).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.engine._scripts.launch import REPO, run
from tests.engine._scripts.other_tokenizer import build_other_tokenizer, save_tiny_reward_model
from tritonrlhf.engine.config import TinyModelConfig
from tritonrlhf.engine.models import build_tiny_model, build_tokenizer, load_reward_model

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parents[1] / "_scripts"
CONFIG = REPO / "configs" / "ppo_tiny.yaml"
STEPS = 2
COMMON = [
    f"total_steps={STEPS}",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "reward.kind=model",
]


def _launch(
    out: Path, overrides: list[str], record_name: str = "record.json", ranks: int = 1
) -> tuple[str, dict]:
    from tests.engine._scripts.launch import deepspeed_cmd, free_port
    from tests.engine._scripts.ppo_launch import require

    require("vllm", "deepspeed")
    record = out / record_name
    script = [str(SCRIPTS / "ppo_rm_text.py"), str(record), "ppo", "--config", str(CONFIG)]
    port = free_port()
    cmd = [sys.executable, *script] if ranks == 1 else deepspeed_cmd(ranks, port, *script)
    args = [f"output_dir={out / 'run'}", *COMMON, *overrides]
    proc = run([*cmd, *args], 900, port=port, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout, json.loads(record.read_text())


@pytest.fixture(scope="module")
def other_rm(tmp_path_factory) -> Path:
    return save_tiny_reward_model(tmp_path_factory.mktemp("rm_other") / "rm", build_other_tokenizer())


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, other_rm) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("ppo_text")
    return _launch(out, [f"reward.model_path={other_rm}", "critic.init_from=policy"])


def _metrics(out: Path) -> list[dict]:
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory) -> dict:
    """3 steps checkpointed every step, then the same run resumed from step 1's checkpoint."""
    out = tmp_path_factory.mktemp("ppo_calib")
    rm = save_tiny_reward_model(out / "rm", build_tokenizer(), seed=5)
    args = [f"reward.model_path={rm}", "critic.init_from=reward", "ppo.reward_norm=true"]
    args += ["total_steps=3", "save_every=1", "keep_last=3"]
    output, record = _launch(out, args)
    rows = _metrics(out)
    ckpt = out / "run" / "checkpoints" / "step_000001"
    resumed_output, _ = _launch(out, [*args, f"resume={ckpt}"], "record_resumed.json")
    return {
        "output": output,
        "record": record,
        "rows": rows,
        "resumed": resumed_output,
        "resumed_rows": _metrics(out),
    }


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, other_rm) -> tuple[str, dict]:
    """Two ranks: rank 0 trains, rank 1 runs vLLM and scores (``placement.scoring=rollout``)."""
    out = tmp_path_factory.mktemp("ppo_split")
    split = ["placement.mode=split", "placement.scoring=rollout", "placement.timeout_s=300"]
    return _launch(out, [f"reward.model_path={other_rm}", "critic.init_from=policy", *split], ranks=2)


def _check_own_scores(record: dict, other_rm: Path) -> None:
    """Every score the run trained on equals the RM on the same texts, rendered and tokenized by hand."""
    rm = load_reward_model(other_rm)
    tok = build_other_tokenizer()
    calls = record["scored"]
    assert len(calls) == STEPS
    used, expected = [], []
    for call in calls:
        for p, r, s, v in zip(call["prompts"], call["responses"], call["scores"], call["valid"]):
            assert v
            ids = tok(f"<s><|user|>{p}<|bot|>{r}</s>", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                expected.append(float(rm(input_ids=torch.tensor([ids])).logits[0, 0]))
            used.append(s)
    assert len(used) == STEPS * 16
    torch.testing.assert_close(torch.tensor(used), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert torch.tensor(expected).std() > 1e-3  # distinct samples, distinct scores: the check can fail
    assert any(c["responses"][i] for c in calls for i in range(16))  # real, non-empty responses


def test_text_route_is_logged_and_its_scores_are_the_rms_own(text_run, other_rm) -> None:
    output, record = text_run
    assert record["route"] == "text"
    assert (
        "[reward] reward.model_path: text route (reward.tokenizer=auto; tokenizers differ: vocabulary (64 vs 89"
        in output
    )
    _check_own_scores(record, other_rm)


def test_rollout_ranks_score_through_the_text_route(split_run, other_rm) -> None:
    output, record = split_run
    assert "text route" in output
    _check_own_scores(record, other_rm)


def test_calibrated_critic_starts_on_the_normalised_scale(calibrated_run) -> None:
    output, record = calibrated_run["output"], calibrated_run["record"]
    assert record["route"] == "token"
    assert "critic (init_from=reward) calibrated to the normalised reward scale" in output
    first = record["first_values"]
    assert first["calibrated"]
    raw = torch.tensor(record["scored"][0]["scores"])
    # The critic started as the reward model: at the last real token it gives the RM's score, now mapped.
    norm = (raw - first["reward_mean"]) / (first["reward_std"] + 1e-8)
    torch.testing.assert_close(torch.tensor(first["scores"]), norm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(first["values_last"]), norm, atol=1e-4, rtol=1e-4)
    assert (norm - raw).abs().max() > 0.1  # raw and normalised scales differ: the check can fail


def test_refusals_come_before_any_rollout(tmp_path: Path, other_rm: Path) -> None:
    policy = tmp_path / "policy_other"  # a policy on the 89-token tokenizer
    tok = build_other_tokenizer()
    build_tiny_model(tok, TinyModelConfig(), 0).save_pretrained(policy)
    tok.save_pretrained(policy)
    toy_rm = save_tiny_reward_model(tmp_path / "toy_rm", build_tokenizer())  # 64 embedding rows
    base = ["ppo", "--config", str(CONFIG), *COMMON]
    cases = {
        "critic_from_other_rm": [
            *base,
            f"output_dir={tmp_path / 'o1'}",
            f"reward.model_path={other_rm}",
            "critic.init_from=reward",
        ],
        "policy_ids_past_rm": [
            *base,
            f"output_dir={tmp_path / 'o2'}",
            f"model.path={policy}",
            f"reward.model_path={toy_rm}",
            "reward.tokenizer=policy",
            "critic.init_from=policy",
        ],
    }
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = run(
        [
            sys.executable,
            str(SCRIPTS / "ppo_errors.py"),
            str(tmp_path / "cases.json"),
            str(tmp_path / "r.json"),
        ],
        300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = json.loads((tmp_path / "r.json").read_text())
    expect = {
        "critic_from_other_rm": "critic.init_from=reward: the reward model's tokenizer differs from the policy's",
        "policy_ids_past_rm": "reward.tokenizer=policy the reward model would read the policy's ids, but the policy's tokenizer has 89 tokens",
    }
    for name, msg in expect.items():
        r = results[name]
        assert r["rc"] != 0 and msg in r["stderr"], (name, r["stderr"][-2000:])
        assert not r["vllm_imported"], name  # refused before the rollout engine (and any weights)


def test_resume_keeps_the_calibration_and_matches_the_uninterrupted_run(calibrated_run) -> None:
    """The mapped value head is in the critic's checkpoint and the flag in the loop state: a run
    resumed from step 1 maps nothing again, and its steps 2-3 equal the uninterrupted run's."""
    assert "calibrated to the normalised reward scale" not in calibrated_run["resumed"]
    assert "resumed from" in calibrated_run["resumed"]
    a = {r["step"]: r for r in calibrated_run["rows"]}
    b = {r["step"]: r for r in calibrated_run["resumed_rows"]}
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in (2, 3):
        for key in ("reward/mean", "values/mean", "returns/mean", "loss/value", "loss/policy"):
            assert abs(a[step][key] - b[step][key]) <= 1e-6, (step, key, a[step][key], b[step][key])
