"""The GRPO benchmark end to end on our side (``--skip-peer``: TRL's environment is the benchmark's
own, installed from the network, so the suite leaves it out): a real run of each repeat through
the CLI, one CSV row per system with the median over the repeats and every run's median."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_bench_grpo_runs_ours_and_writes_one_row_per_system(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    spec = importlib.util.spec_from_file_location("bench_grpo", ROOT / "benchmarks" / "bench_grpo.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "grpo.csv"
    argv = ["--skip-peer", "--steps", "3", "--warmup", "1", "--repeats", "2", "--backends", "hf"]
    argv += ["--modes", "colocate"]  # async (2 processes) is the split test's in tests/engine/rl
    rows = bench.main([*argv, "--prompts", "4", "--max-new-tokens", "8", "--out", str(out)])
    assert [r["system"] for r in rows] == ["tritonrlhf (hf)"]
    with out.open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["model_params"] == "412288" and row["group_size"] == "4" and row["steps"] == "3"
    meds = [float(x) for x in row["note"].split("per-run medians ")[1].removesuffix(" s").split()]
    # The note rounds each run to 3 decimals: the median of two is their mean within 1e-3.
    assert len(meds) == 2 and float(row["step_s_median"]) == pytest.approx(sum(meds) / 2, abs=1e-3)
    assert float(row["samples_per_s"]) == pytest.approx(16 / float(row["step_s_median"]), rel=1e-3)
    assert "actor.zero_stage=0" in row["note"] and "HF generate" in row["note"]
    assert all(float(row[k]) > 0 for k in ("generate_s", "score_s", "train_s"))
    assert row["passes"].startswith("ref ") and "actor " in row["passes"]  # the reference pass, the update
