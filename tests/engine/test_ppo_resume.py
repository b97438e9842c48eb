"""PPO checkpoint/resume through the CLI: a run cut in two must equal the uninterrupted run.

Three ``python -m engine.cli ppo`` runs of the tiny config (1 rank, real vLLM and DeepSpeed on CPU):

* A: 4 steps, uninterrupted.
* B1: 2 steps with ``save_every=1``; B2: the same output folder, ``total_steps=4 resume=auto``.

Steps 3-4 of B (after the resume) must log the same metrics as A's steps 3-4 and B's final actor
must equal A's: the checkpoint carries the DeepSpeed state, the sampler, KL controller, reward
normalizer, the trainer's generator (from which the per-request vLLM seeds are drawn) and the RNGs.
A ``resume`` path that does not exist must fail with exit 2 before any work.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "ppo_tiny.yaml"
SHM_GLOB = "/dev/shm/deepspeed_allreduce_buffer_*"
SMALL = [
    "ppo.rollout_batch_size=8",
    "ppo.mini_batch_size=8",
    "ppo.micro_batch_size=4",
    "rollout.max_new_tokens=8",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
]
COMPARED = ("reward/mean", "kl/mean", "loss/policy", "loss/value")
TOL = 1e-6


def _cli(out_dir: Path, overrides: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "engine.cli", "ppo", "--config", str(TINY_CONFIG), f"output_dir={out_dir}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    shm_before = set(glob.glob(SHM_GLOB))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, *SMALL, *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[test] killed after {timeout_s:.0f}s"
    finally:
        for f in set(glob.glob(SHM_GLOB)) - shm_before:
            Path(f).unlink(missing_ok=True)
    print(f"{out_dir.name} {' '.join(overrides)}: exit {proc.returncode} in {time.perf_counter() - t0:.0f}s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stdout[-6000:]}"


def _metrics(out_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: r for r in rows}


def _weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {hf_dir}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("vllm")
    pytest.importorskip("deepspeed")
    a = tmp_path_factory.mktemp("ppo_uninterrupted")
    b = tmp_path_factory.mktemp("ppo_resumed")
    _ok(_cli(a, ["total_steps=4"]))
    _ok(_cli(b, ["total_steps=2", "save_every=1", "keep_last=1"]))
    _ok(_cli(b, ["total_steps=4", "save_every=1", "keep_last=1", "resume=auto"]))
    return a, b


def test_resumed_run_matches_uninterrupted(runs) -> None:
    a, b = runs
    ma, mb = _metrics(a), _metrics(b)
    assert sorted(ma) == sorted(mb) == [1, 2, 3, 4]
    diffs = {
        (step, k): (ma[step][k], mb[step][k])
        for step in (1, 2, 3, 4)
        for k in COMPARED
        if abs(ma[step][k] - mb[step][k]) > TOL
    }
    assert not diffs, f"resumed run differs from the uninterrupted one (step, key): (A, B): {diffs}"
    assert mb[4]["policy_version"] == 4

    wa, wb = _weights(a / "final"), _weights(b / "final")
    assert sorted(wa) == sorted(wb)
    worst = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    assert worst <= TOL, f"final actor weights differ by up to {worst:.3g}"
    # The run actually learned: the final actor is not the initial policy.
    w0 = _weights(a / "init_policy")
    assert max((wa[k].double() - w0[k].double()).abs().max().item() for k in w0 if k in wa) > 1e-4

    # keep_last=1: only the last checkpoint survives, complete, with its HF export.
    ckpts = sorted(p.name for p in (b / "checkpoints").iterdir())
    assert ckpts == ["step_000004"], ckpts
    assert (b / "checkpoints" / "step_000004" / "COMPLETE").is_file()
    assert _weights(b / "checkpoints" / "step_000004" / "hf").keys() == wb.keys()


def test_resume_from_missing_path_fails_fast(tmp_path) -> None:
    pytest.importorskip("deepspeed")
    missing = tmp_path / "no" / "such" / "checkpoint"
    res = _cli(tmp_path / "out", ["total_steps=4", f"resume={missing}"], timeout_s=180)
    assert res.returncode == 2, res.stdout[-4000:]
    assert f"resume: checkpoint path does not exist: {missing}" in res.stdout
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    assert not (tmp_path / "out" / "init_policy").exists()  # failed before building any role
