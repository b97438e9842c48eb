"""Launch ``ppo_run.py`` (the CLI plus parameter fingerprints) on 1 or 2 ranks and read back what it wrote.

Shared by the end-to-end PPO tests in ``tests/engine/rl/`` (and its ``conftest.py``). One rank is a
plain ``python`` process; two ranks go through ``deepspeed --num_gpus 2``. ``launch.run`` starts it
in its own session with a free master port, and removes only this launch's ``/dev/shm`` buffers.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.engine._scripts.launch import REPO, deepspeed_cmd, free_port, run

SCRIPTS = Path(__file__).resolve().parent
TINY_CONFIG = REPO / "configs" / "ppo_tiny.yaml"

# The overrides of the two runs that tests/engine/rl/conftest.py launches once per session, each
# read by tests in two files: ``ppo_two_ranks_zero2`` (2 ranks, ZeRO-2, the tiny config as it is)
# and ``ppo_one_update_zero3`` (1 rank, ZeRO-3, one update of one micro-batch per step, so the
# values and old log-probs come from the update: ``PPOTrainer.fused_update``). A test that compares
# a variant against one of them launches the variant with the same overrides plus its own.
TWO_RANKS_ZERO2 = ["total_steps=3", "actor.zero_stage=2", "critic.zero_stage=2", "logging.tensorboard=false"]
ONE_UPDATE_ZERO3 = [
    "total_steps=3",
    "actor.zero_stage=3",
    "critic.zero_stage=3",
    "ppo.rollout_batch_size=8",
    "ppo.mini_batch_size=8",
    "ppo.micro_batch_size=8",
    "logging.tensorboard=false",
]

# Every run's metrics.jsonl row must carry these (the list).
REQUIRED_KEYS = (
    "step",
    "reward/mean",
    "kl/mean",
    "loss/policy",
    "loss/value",
    "clipfrac",
    "entropy/mean",
    "response_len/mean",
    "kl_coef",
    "time/rollout_s",
    "time/score_s",
    "time/train_s",
    "time/sync_s",
    "time/step_s",
    "throughput/samples_per_s",
    "throughput/tokens_per_s",
    "rollout/logprob_gap",
    "policy_version",
)


@dataclass
class PPORun:
    """What one launch left behind: exit status, output, and the files it wrote."""

    returncode: int
    output: str
    out_dir: Path
    wall_s: float
    ranks: list[dict[str, Any]] = field(default_factory=list)  # ppo_run.py's fingerprints, by rank

    @property
    def metrics(self) -> list[dict[str, Any]]:
        with (self.out_dir / "metrics.jsonl").open() as f:
            return [json.loads(line) for line in f if line.strip()]

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.out_dir / "summary.json").read_text())

    def series(self, key: str) -> list[float]:
        return [row[key] for row in self.metrics]

    def check(self) -> None:
        assert self.returncode == 0, (
            f"exit {self.returncode} after {self.wall_s:.0f}s:\n{self.output[-6000:]}"
        )


def require(*modules: str) -> None:
    """Skip the calling test unless ``modules`` are installed; looks them up without importing
    (importing vLLM costs about 20 s here, and the run happens in a subprocess anyway)."""
    import importlib.util

    import pytest

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def launch(
    out_dir: Path, overrides: list[str], ranks: int = 1, timeout_s: float = 420, config: Path = TINY_CONFIG
) -> PPORun:
    """Run ``ppo_run.py ppo --config CONFIG output_dir=OUT <overrides>`` on ``ranks`` (default config:
    ``configs/ppo_tiny.yaml``)."""
    fp_dir = out_dir / "fingerprints"
    script = [str(SCRIPTS / "ppo_run.py"), "--fingerprints", str(fp_dir), "ppo", "--config", str(config)]
    args = [f"output_dir={out_dir}", "logging.progress_bar=false", *overrides]
    port = free_port()
    cmd = [sys.executable, *script, *args] if ranks == 1 else deepspeed_cmd(ranks, port, *script, *args)
    t0 = time.perf_counter()
    proc = run(cmd, timeout_s, port=port, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    result = PPORun(proc.returncode, proc.stdout, out_dir, time.perf_counter() - t0)
    result.ranks = (
        [json.loads(p.read_text()) for p in sorted(fp_dir.glob("rank*.json"))] if fp_dir.is_dir() else []
    )
    return result


_free_port = free_port  # the name tests/engine/rl/test_split.py imports
