"""The PPO benchmark's bookkeeping: warm-up steps left out, phase means, sync share, CSV rows.

The run itself is the slow end-to-end path (covered by tests/engine/rl/test_ppo_e2e.py); here a
synthetic ``metrics.jsonl`` stands in for it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_ppo", ROOT / "benchmarks" / "bench_ppo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _row(step: int, step_s: float, sync_s: float) -> dict:
    return {
        "step": step,
        "time/rollout_s": 0.5 * step_s,
        "time/score_s": 0.1 * step_s,
        "time/train_s": 0.4 * step_s - sync_s,
        "time/sync_s": sync_s,
        "time/step_s": step_s,
        "throughput/samples_per_s": 16 / step_s,
        "throughput/tokens_per_s": 160 / step_s,
        "rollout/logprob_gap": 1e-7 * step,
        "reward/mean": 0.01 * step,
    }


def test_summarize_skips_warmup_and_reports_sync_share(tmp_path: Path) -> None:
    bench = _load_bench()
    rows = [_row(1, 30.0, 3.0), _row(2, 2.0, 0.02), _row(3, 4.0, 0.06)]  # step 1: one-off costs
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = bench.summarize(tmp_path, warmup=1)
    assert s["step_s"] == pytest.approx(3.0) and s["generate_s"] == pytest.approx(1.5)
    assert s["sync_s"] == pytest.approx(0.04)
    assert s["sync_pct"] == pytest.approx(100 * 0.08 / 6.0)
    assert s["samples_per_s"] == pytest.approx((8 + 4) / 2)
    assert s["tokens_per_s"] == pytest.approx((80 + 40) / 2)
    assert s["logprob_gap_max"] == pytest.approx(3e-7)  # over every step, warm-up included
    assert (s["reward_first"], s["reward_last"]) == (0.01, 0.03)

    out = tmp_path / "ppo.csv"
    for _ in range(2):
        bench.write_csv({"ranks": 1, **{k: f"{v:.4g}" for k, v in s.items()}}, out)
    with out.open() as f:
        got = list(csv.DictReader(f))
    assert len(got) == 2 and list(got[0]) == bench.COLUMNS  # one header, rows appended
    assert got[1]["sync_pct"] == f"{s['sync_pct']:.4g}"


def test_plot_timelines_draws_each_mode(tmp_path: Path) -> None:
    from benchmarks.bench_ppo import plot_timelines

    def step(k: int, overlap: bool) -> dict:
        t = 10.0 * k
        gen = (t + 1, t + 4) if overlap else (t, t + 1)
        return {
            "step": k,
            "events": [
                {"role": "rollout0", "phase": "generate", "t0": gen[0], "t1": gen[1], "tag": k},
                {"role": "trainer", "phase": "train", "t0": t + 1, "t1": t + 3, "tag": k},
                {"role": "trainer", "phase": "sync", "t0": t + 3, "t1": t + 3.1, "tag": k},
            ],
        }

    timelines = {"sync": [step(k, False) for k in range(1, 7)], "async": [step(k, True) for k in range(1, 7)]}
    out = tmp_path / "timeline.png"
    plot_timelines(timelines, out, "test device", warmup=1)
    assert out.stat().st_size > 5000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_models_with_a_larger_vocabulary(tmp_path: Path) -> None:
    """``--vocab 512``: policy and reward model with 512 embedding rows and a tokenizer of 512 ids
    (issue #16's 3.4M model at ``--model small``); the default stays the toy tokenizer's 64."""
    from transformers import AutoConfig, AutoTokenizer

    bench = _load_bench()
    policy, rm, params = bench.save_models(tmp_path / "v512", 0, "tiny", vocab=512)
    _, _, params64 = bench.save_models(tmp_path / "v64", 0, "tiny")
    assert AutoConfig.from_pretrained(policy).vocab_size == AutoConfig.from_pretrained(rm).vocab_size == 512
    assert len(AutoTokenizer.from_pretrained(policy)) == 512
    hidden = bench.MODELS["tiny"]["hidden_size"]
    assert params - params64 == 2 * (512 - 64) * hidden  # embedding and untied LM head rows
    with pytest.raises(ValueError, match="multiple of 64"):
        bench.save_models(tmp_path / "bad", 0, "tiny", vocab=100)
