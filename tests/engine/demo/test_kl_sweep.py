"""The KL sweep at a tiny size: two coefficients, two PPO steps each, every step evaluated.

The SFT policy and the reward model are random tiny stand-ins saved where the pipeline would
have put them (the sweep reuses them rather than training its own), and PPO runs with small
batches on the HF backend; the eval is the real one-process vLLM eval. At two steps the KL
penalty has barely acted (at step 1 the actor is the reference, so the penalty is zero for
every coefficient), so which coefficient ends further from the reference is not asserted:
only what any working sweep satisfies.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

pytestmark = pytest.mark.slow

COEFS = (0.0, 0.2)
STEPS = 2


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from tritonrlhf.engine.config import TinyModelConfig
    from tritonrlhf.engine.demo.kl_sweep import run_sweep
    from tritonrlhf.engine.models import build_tiny_model, build_tiny_reward_model, build_tokenizer

    run = tmp_path_factory.mktemp("sweep")
    tok = build_tokenizer()
    for name, build in (("sft", build_tiny_model), ("rm", build_tiny_reward_model)):
        build(tok, TinyModelConfig(), seed=0).save_pretrained(run / name)
        tok.save_pretrained(run / name)
    small = (
        "rollout.backend=hf",
        "ppo.rollout_batch_size=8",
        "ppo.mini_batch_size=8",
        "ppo.micro_batch_size=4",
        "ppo.ppo_epochs=1",
    )
    result = run_sweep(run, COEFS, size="ci", steps=STEPS, eval_every=1, ppo_overrides=small)
    return run, result


def test_every_coefficient_ran_with_its_own_kl_coef(sweep):
    run, _ = sweep
    for coef in COEFS:
        ppo = run / "kl_sweep" / f"kl_{coef:g}"
        cfg = yaml.safe_load((ppo / "config.yaml").read_text())
        assert cfg["ppo"]["kl"]["coef"] == coef and cfg["ppo"]["kl"]["adaptive"] is False
        assert cfg["ppo"]["kl"]["reference"] == "always"  # coefficient 0 logs its KL too
        rows = [json.loads(x) for x in (ppo / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert (ppo / "checkpoints" / "step_000001" / "hf" / "model.safetensors").is_file()
        assert (ppo / "final" / "model.safetensors").is_file()
    assert (run / "sft" / "config.json").is_file() and not (run / "logs" / "sft.log").exists()  # reused


def test_rows_json_and_csv(sweep):
    run, result = sweep
    out = run / "kl_sweep"
    rows = result["rows"]
    # the SFT point, then every (coefficient, step) policy
    assert [(r["coef"], r["step"]) for r in rows] == [(None, 0)] + [(c, s) for c in COEFS for s in (1, 2)]
    for r in rows:
        for key in ("kl", "rm_reward", "gold_reward", "response_len"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["policy"], key)
        assert 0.0 <= r["gold_reward"] <= 1.0
    assert rows[0]["kl"] == 0.0 and rows[0]["win_rate_gold"] == 0.5  # SFT against itself
    for r in rows[1:]:
        if r["step"] == 1:  # the first rollout comes from the SFT weights: no KL yet
            assert r["train_kl"] == pytest.approx(0.0, abs=1e-4)
        assert isinstance(r["train_reward"], float)
    assert json.loads((out / "kl_sweep.json").read_text()) == result
    with (out / "kl_sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [t["policy"] for t in table] == [r["policy"] for r in rows]
    assert float(table[-1]["gold_reward"]) == pytest.approx(rows[-1]["gold_reward"])
    assert set(result["train_curves"]) == {f"kl_{c:g}" for c in COEFS}
    eval_top = json.loads((out / "eval" / "eval.json").read_text())
    assert len(eval_top["policies"]) == len(rows)  # one eval process for every policy
    assert (out / "kl_sweep.png").read_bytes()[:4] == b"\x89PNG"
