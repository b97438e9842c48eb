"""Two nodes simulated on this machine: two ``torchrun --nnodes 2`` invocations (node ranks 0 and 1,
one rank each) meeting on the loopback address, without ssh. On node 1 the local rank (0) differs
from the global rank (1), so code that confuses the two (device choice, which ranks run rollout
engines, per-node DeepSpeed shared-memory buffers, checkpoint writers, the TCP store's host) shows
here, not only on a real second machine.

Colocate: 2 steps with a checkpoint each, then a resume to step 3 (the node-1 rank loads its own
shard). Split: the trainer on node 0, the rollout engine on node 1 (weights over the gloo group,
control messages through the store node 0 hosts).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine._scripts.launch import REPO, cleanup_shm, free_port, subprocess_env

pytestmark = pytest.mark.slow

CONFIG = REPO / "configs" / "ppo_tiny.yaml"
COMMON = [
    "rollout.backend=hf",
    "data.num_prompts=32",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
]


def _two_nodes(out: Path, *overrides: str, timeout_s: float = 600) -> list[str]:
    """Launch node ranks 0 and 1 of one job (``torchrun --nnodes 2 --nproc-per-node 1``); both must exit 0."""
    port = free_port()
    torchrun = str(Path(sys.executable).parent / "torchrun")
    args = [
        "-m",
        "tritonrlhf.engine.cli",
        "ppo",
        "--config",
        str(CONFIG),
        f"output_dir={out}",
        *COMMON,
        *overrides,
    ]
    env = subprocess_env(port, OMP_NUM_THREADS="1")
    procs, logs = [], []
    try:
        for node in (0, 1):
            log = out.parent / f"{out.name}_node{node}.log"
            logs.append(log)
            cmd = [torchrun, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1"]
            cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port), *args]
            with open(log, "w") as f:
                procs.append(
                    subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
                )
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        cleanup_shm(port)
    texts = [log.read_text() for log in logs]
    for node, (p, text) in enumerate(zip(procs, texts)):
        assert p.returncode == 0, f"node {node} exited {p.returncode}:\n{text[-4000:]}"
    return texts


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_colocate_checkpoint_and_resume(tmp_path):
    out = tmp_path / "colocate"
    _two_nodes(out, "total_steps=2", "save_every=1")
    assert _steps(out) == [1, 2]
    ckpt = out / "checkpoints" / "step_000002"
    assert (ckpt / "COMPLETE").is_file()
    # Each global rank wrote its own state, whatever its node-local rank.
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]
    _, node1 = _two_nodes(out, "total_steps=3", "save_every=1", "resume=auto")
    assert _steps(out) == [1, 2, 3]
    assert "resum" in node1.lower() or (out / "checkpoints" / "step_000003" / "COMPLETE").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2


def test_two_nodes_split_trainer_on_one_rollout_on_the_other(tmp_path):
    out = tmp_path / "split"
    node0, node1 = _two_nodes(out, "total_steps=2", "placement.mode=split", "placement.timeout_s=120")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/logprob_gap"] < 1e-3 for r in rows)  # node 1's engine followed every sync
    assert json.loads((out / "summary.json").read_text())["world_size"] == 1  # one trainer
    assert "rollout" in node1.lower()
