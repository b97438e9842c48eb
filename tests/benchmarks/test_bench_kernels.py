"""The kernel benchmark runs end to end at --size tiny and writes well-formed CSV rows."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import torch

from kernels import gae_reference

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_bench_tiny_writes_rows(tmp_path: Path) -> None:
    bench = _load_bench()
    out = tmp_path / "kernels.csv"
    threads = torch.get_num_threads()
    try:
        bench.main(["--size", "tiny", "--providers", "eager", "--out", str(out), "--cpu-threads", "1"])
    finally:
        torch.set_num_threads(threads)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == set(bench.COLUMNS)
    seen = {(r["kernel"], r["mode"]): r for r in rows}
    for kernel in bench.KERNELS:
        for mode in bench.MODES:
            row = seen[(kernel, mode)]
            assert row["device"] and row["torch"] and row["provider"] == "eager"
            if kernel == "gae" and mode != "fwd":
                assert "not differentiable" in row["note"]
                continue
            assert float(row["ms_p20"]) > 0 and float(row["ms_p50"]) > 0, row
            assert float(row["ms_p20"]) <= float(row["ms_p50"]) <= float(row["ms_p80"])
            assert row["gbps"] or row["tflops"], row
            assert row["target_met"] == ""  # targets are only judged on GPU


def test_gae_reference_speed(benchmark) -> None:
    rewards, values = torch.randn(8, 256), torch.randn(8, 256)
    mask = torch.ones(8, 256, dtype=torch.bool)
    adv, _ = benchmark(gae_reference, rewards, values, mask, 0.99, 0.95)
    assert adv.shape == (8, 256)
