"""The kernel benchmark runs end to end at --size tiny and writes well-formed CSV rows."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import torch

from tritonrlhf.kernels import gae_reference

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


def test_linear_logprobs_cost_counts_the_vocabulary_split_scheme() -> None:
    """At the README's shape the roofline counts 2NVH / 6NVH / 8NVH FLOPs (the backward
    recomputes the logits), the step is FLOP-bound on an H200, and the backward moves the
    logits five times, the weight three times and the hidden states and the fp32 accumulator
    once per vocabulary block: about 44 GB, where the row-chunk scheme it replaced moved about
    150 GB through its fp32 weight-gradient accumulator alone."""
    bench = _load_bench()
    N, V, H, e = 16384, 151936, 4096, 2
    cost = bench.linear_logprobs_cost(N, V, H, e)
    for mode, factor in (("fwd", 2), ("bwd", 6), ("full", 8)):
        assert cost[mode][1] == factor * N * V * H
    blocks = -(-V // 8192)  # vocab_block_cols(16384, 151936, 2) == 8192
    logits, hid, wgt = N * V * e, N * H * e, V * H * e
    want_bwd = 5 * logits + 3 * wgt + blocks * (2 * hid + 2 * N * H * 4 + N * 20) + N * H * (4 + e)
    assert cost["bwd"][0] == want_bwd and 40e9 < want_bwd < 50e9
    assert cost["full"][0] == cost["fwd"][0] + cost["bwd"][0]
    hbm_gbps, tflops = bench.PEAKS["H200"]
    for mode in ("fwd", "bwd", "full"):
        nbytes, flops = cost[mode]
        assert flops / (tflops * 1e12) > nbytes / (hbm_gbps * 1e9), mode  # FLOP-bound


def test_gae_reference_speed(benchmark) -> None:
    rewards, values = torch.randn(8, 256), torch.randn(8, 256)
    mask = torch.ones(8, 256, dtype=torch.bool)
    adv, _ = benchmark(gae_reference, rewards, values, mask, 0.99, 0.95)
    assert adv.shape == (8, 256)
