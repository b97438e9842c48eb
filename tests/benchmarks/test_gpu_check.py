"""scripts/gpu_check.sh --dry-run: the GPU machine's one command, run end to end on CPU.

Everything but the CUDA launches runs: the `cuda` test tier is collected and skipped with its
reason, the benchmark writes every kernel x provider x mode row at micro shapes (Triton through
the interpreter, torch.compile on its eager backend, the roofline columns against given peaks,
the absent peers as skipped rows), and the memory row; all into a temporary CSV, never the
committed one.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "benchmarks" / "results" / "kernels.csv"
KERNELS = [
    "logprobs_from_logits",
    "linear_logprobs",
    "kl_penalty",
    "ppo_policy_loss",
    "ppo_value_loss",
    "gae",
]
PEERS = {"logprobs_from_logits": ["liger", "flash_attn"], "linear_logprobs": ["liger"]}


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def test_dry_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "kernels.csv"
    committed = _digest(COMMITTED)
    env = dict(os.environ, PYTHON=sys.executable, GIT_SHA="testsha")
    env.pop("TRITON_INTERPRET", None)  # the script sets it for the dry run itself
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=tmp_path,  # the script must find the repository on its own
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "dry run" in log and "every step passed" in log
    tier = re.search(r"(\d+) skipped, \d+ deselected", log)  # the GPU tier, skipped with its reason
    assert tier and int(tier.group(1)) >= 10 and "needs a CUDA GPU" in log, log[-4000:]
    assert _digest(COMMITTED) == committed, "the dry run touched benchmarks/results/kernels.csv"

    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["device"] for r in rows} != {""} and {r["git_sha"] for r in rows} == {"testsha"}
    timed = {(r["kernel"], r["provider"], r["mode"]): r for r in rows if r["mode"] != "memory"}
    for kernel in KERNELS:
        modes = ["fwd"] if kernel == "gae" else ["fwd", "bwd", "full"]
        for provider in ["eager", "compile", "triton"]:
            for mode in modes:
                row = timed[(kernel, provider, mode)]
                assert float(row["ms_p50"]) > 0 and row["bound"] in ("hbm", "flop"), row
                pct, want = float(row["pct_roofline"]), 100 * float(row["roofline_ms"]) / float(row["ms_p50"])
                assert abs(pct - want) <= 0.01 * want, row  # the CSV holds 3-4 significant digits
                assert float(row["gb"]) > 0, row
        for provider in PEERS.get(kernel, []):
            for mode in modes:
                assert timed[(kernel, provider, mode)]["note"].startswith(f"skipped: {provider}"), provider
    # linear_logprobs is counted as the vocabulary-split scheme: 2NVH forward, 6NVH backward.
    n, vocab, width = 8, 300, 16
    for mode, factor in (("fwd", 2), ("bwd", 6), ("full", 8)):
        gflop = float(timed[("linear_logprobs", "triton", mode)]["gflop"])
        assert abs(gflop - factor * n * vocab * width / 1e9) < 1e-12, (mode, gflop)
    assert timed[("logprobs_from_logits", "triton", "fwd")]["bound"] == "hbm"

    (memory,) = [r for r in rows if r["mode"] == "memory"]
    assert memory["kernel"] == "linear_logprobs" and memory["provider"] == "triton"  # the interpreter
    assert float(memory["logits_mb"]) == float(f"{n * vocab * 2 / 2**20:.4g}")  # bf16 logits
    assert float(memory["peak_mem_mb"]) >= 0 and memory["mem_vs_logits"], memory
    assert "growth over fwd+bwd with entropy" in memory["note"]
