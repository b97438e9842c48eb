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

import pytest

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
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--only", "kernels", "--out", str(out)],
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


ENGINE_RUNS = [("decode", "", "loop"), ("decode", "", "fixed"), ("ppo", "auto", "loop")]
ENGINE_RUNS += [("grpo", "auto", "loop"), ("ppo", "reference", "loop")]


@pytest.mark.slow
def test_engine_dry_run_writes_every_row(tmp_path: Path) -> None:
    """The engine part (--only engine) on CPU: the model built, the decode loop against the fixed
    step, PPO, GRPO and PPO on the kernels' references through the CLI, one row each."""
    out = tmp_path / "kernels.csv"
    committed = _digest(ROOT / "benchmarks" / "results" / "engine_gpu.csv")
    env = dict(os.environ, PYTHON=sys.executable, GIT_SHA="testsha", GPU_CHECK_CARRY=str(tmp_path / "none"))
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--only", "engine", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "every step passed" in log, log[-4000:]
    assert "deepspeed: 0.19" in log and "== kernel tests" not in log, log[:3000]
    # auto picks the eager step off CUDA and says why, in every engine run
    assert log.count("decode step runs eagerly (the model is on cpu, and CUDA graphs need") == 3, log[-4000:]
    assert _digest(ROOT / "benchmarks" / "results" / "engine_gpu.csv") == committed
    with (tmp_path / "engine_gpu.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["kernels"], r["decode_step"]) for r in rows] == ENGINE_RUNS
    assert {r["git_sha"] for r in rows} == {"testsha"} and all(r["device"] for r in rows)
    for r in rows[:2]:
        assert float(r["decode_tokens_per_s"]) > 0, r
    for r in rows[2:]:
        for key in (
            "samples_per_s",
            "tokens_per_s",
            "generate_s",
            "score_s",
            "train_s",
            "step_s",
            "train_tflops",
        ):
            assert float(r[key]) > 0, (key, r)
        assert 0 <= float(r["logprob_gap_max"]) < 1e-3, r  # fp32 on CPU: the same numbers
        assert r["mfu_train_pct"] == "" and r["train_peak_gib"] == "" and "dry run" in r["note"]
        assert (r["prompts"], r["samples_per_prompt"], r["max_new_tokens"], r["steps"]) == (
            "4",
            "2",
            "8",
            "3",
        )


def test_prepare_carries_what_deepspeed_needs(tmp_path: Path) -> None:
    """--list (no network): DeepSpeed's sdist, and every requirement of the DeepSpeed installed
    here either carried as a wheel or in the GPU image; the carried folder's size against 64 MiB."""
    from importlib import metadata

    from packaging.requirements import Requirement

    carry = tmp_path / "carry"
    carry.mkdir()
    (carry / "a.whl").write_bytes(b"0" * 2**20)
    env = dict(os.environ, GPU_CHECK_CARRY=str(carry), PYTHON=sys.executable)
    script = [str(ROOT / "scripts" / "gpu_check.sh"), "--list"]
    proc = subprocess.run(["bash", *script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert lines["sdist"].startswith(f"deepspeed=={metadata.version('deepspeed')} ")
    wheels = {w.split("==")[0].lower().replace("_", "-"): w.split("==")[1] for w in lines["wheels"].split()}
    covered = set(wheels) | set(lines["image has"].split())
    requires = metadata.requires("deepspeed") or []
    needed = {Requirement(r).name.lower().replace("_", "-") for r in requires if "extra ==" not in r}
    assert needed <= covered, needed - covered
    # the carried wheels' own requirements are carried too (pydantic's)
    for name in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"):
        assert name in wheels, name
    assert "holds 1 files, 1.0 MiB" in lines["carry"], lines["carry"]

    (carry / "big.tar.gz").touch()
    os.truncate(carry / "big.tar.gz", 70 * 2**20)  # sparse: counted at its apparent size
    proc = subprocess.run(["bash", *script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "over the 64 MiB" in proc.stderr, proc.stdout + proc.stderr
