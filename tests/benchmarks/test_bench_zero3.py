"""The ZeRO-3 benchmark: its model sizes (fast), and the whole script at the tiny size (slow:
2 ranks under the deepspeed launcher, real vLLM and DeepSpeed, a few minutes on a 2-core VM)."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_zero3", ROOT / "benchmarks" / "bench_zero3.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("size,layers", [("250m", 17), ("100m", 7), ("1m", 1)])
def test_size_picks_the_layer_count_of_qwen2_05b_widths(size: str, layers: int) -> None:
    from transformers import Qwen2ForCausalLM

    config, tok = _load_bench().qwen2_config(size)
    assert config.num_hidden_layers == layers and config.hidden_size == 896
    assert config.vocab_size == 64 >= len(tok) and config.eos_token_id == tok.eos_token_id
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    if size != "1m":  # one layer is the floor
        assert abs(n / (int(size[:-1]) * 1e6) - 1) < 0.05, n


@pytest.mark.slow
def test_tiny_run_writes_memory_per_rank_and_step_time(tmp_path: Path) -> None:
    from tests.engine._scripts.ppo_launch import require

    require("vllm", "deepspeed")
    bench = _load_bench()
    out = tmp_path / "zero3.csv"
    row = bench.main(["--size", "tiny", "--steps", "2", "--out", str(out), "--note", "test"])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and list(rows[0]) == bench.COLUMNS and rows[0]["note"] == "test"
    assert int(row["model_params"]) == 90816 and row["zero_stage"] == 3 and row["ranks"] == 2
    # Each rank's DeepSpeed engine really ran in bf16 with fp32 master weights and Adam state.
    assert row["actor_dtypes"] == "params bfloat16 / master float32 / adam float32"
    # Relations, not windows (the sizes depend on the machine's libraries: ~1.7 GB a rank on AMD
    # EPYC): both ranks run the same engines on an even ZeRO-3 split, so their peaks match within
    # a wide margin; the whole tree holds at least one rank's peak.
    hwm = [float(x) for x in row["rank_hwm_mb"].split(";")]
    assert len(hwm) == 2 and min(hwm) > 0 and max(hwm) < 1.5 * min(hwm), hwm
    assert float(row["rank_hwm_max_mb"]) == pytest.approx(max(hwm), abs=1)
    assert float(row["tree_rss_peak_mb"]) >= max(hwm) * 0.9  # sampled every 0.2 s: may miss a spike
    assert float(row["step_s"]) > 0 and float(row["train_s"]) > 0 and float(row["generate_s"]) > 0
