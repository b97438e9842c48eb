"""Benchmark the PPO loop end to end: a fixed config for a fixed number of steps.

Usage::

    python benchmarks/bench_ppo.py                                  # configs/ppo_tiny.yaml, 10 steps, 1 rank
    python benchmarks/bench_ppo.py --ranks 2 --steps 6 actor.zero_stage=3 critic.zero_stage=3
    python benchmarks/bench_ppo.py --config configs/ppo_7b_8gpu.yaml --ranks 8 --steps 20

Runs ``python -m engine.cli ppo`` (``deepspeed --num_gpus N --module engine.cli ppo`` for N > 1) in a
subprocess with the given dotted overrides, then reads the run's ``metrics.jsonl``. Reported
over the steps after ``--warmup`` (the first step pays one-off costs: allocator growth, lazy
kernel builds): samples/s and response tokens/s (means of the per-step values), the mean seconds
of each phase -- generate (rollout), score (old/ref log-probs, values, reward, advantages),
train (actor and critic updates), sync (weights into the rollout engine) -- and sync's share of
step time (the target is under 5%).

A row is appended to ``benchmarks/results/ppo.csv`` with the device, versions and git SHA.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_kernels import _device_name, _git_sha  # noqa: E402

COLUMNS = [
    "timestamp", "git_sha", "device", "torch", "vllm", "deepspeed", "config", "mode", "ranks",
    "zero_stage", "model_params", "rollout_batch", "max_new_tokens", "steps", "warmup",
    "samples_per_s", "tokens_per_s", "generate_s", "score_s", "train_s", "sync_s", "step_s",
    "sync_pct", "logprob_gap_max", "reward_first", "reward_last", "wall_s", "overrides",
]  # fmt: skip
PHASES = {"generate_s": "time/rollout_s", "score_s": "time/score_s", "train_s": "time/train_s"}
PHASES |= {"sync_s": "time/sync_s", "step_s": "time/step_s"}
SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"  # ..._<uid>_<addr>_<port>_<rank>


def _version(dist: str) -> str:
    for name in (dist, f"{dist}-cpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return ""


def _model_params(policy_dir: Path) -> int:
    """Parameter count from the checkpoint's safetensors headers (no weights are read)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(policy_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                total += math.prod(st.get_slice(key).get_shape())
    return total


def run_ppo(
    config: Path, steps: int, ranks: int, overrides: list[str], out_dir: Path, timeout_s: float
) -> float:
    """Run the CLI; returns its wall seconds. Raises with the output tail on failure."""
    port = _free_port()  # names this run's /dev/shm buffers, so cleanup touches no other run's
    if ranks == 1:
        cmd = [sys.executable, "-m", "engine.cli"]
    else:
        launcher = str(Path(sys.executable).parent / "deepspeed")  # its flag is --module, not -m
        cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(port), "--module", "engine.cli"]
    cmd += ["ppo", "--config", str(config), f"output_dir={out_dir}", f"total_steps={steps}"]
    cmd += ["logging.progress_bar=false", "logging.tensorboard=false", *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_PORT=str(port))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    finally:
        for f in glob.glob(SHM_BUFFERS.format(port=port)):
            Path(f).unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ppo run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return time.perf_counter() - t0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(out_dir: Path, warmup: int) -> dict[str, float]:
    """Means over the steps after ``warmup`` from ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    timed = rows[warmup:] or rows
    mean = lambda key: sum(r[key] for r in timed) / len(timed)  # noqa: E731
    stats = {col: mean(key) for col, key in PHASES.items()}
    stats["samples_per_s"] = mean("throughput/samples_per_s")
    stats["tokens_per_s"] = mean("throughput/tokens_per_s")
    stats["sync_pct"] = 100 * sum(r["time/sync_s"] for r in timed) / sum(r["time/step_s"] for r in timed)
    stats["logprob_gap_max"] = max(r["rollout/logprob_gap"] for r in rows)
    stats["reward_first"], stats["reward_last"] = rows[0]["reward/mean"], rows[-1]["reward/mean"]
    return stats


def bench(args: argparse.Namespace) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        out = Path(tmp) / "run"
        wall = run_ppo(Path(args.config), args.steps, args.ranks, args.overrides, out, args.timeout)
        stats = summarize(out, args.warmup)
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        summary = json.loads((out / "summary.json").read_text())
        params = _model_params(Path(summary["policy_dir"]))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    zero = {cfg["actor"]["zero_stage"], cfg["critic"]["zero_stage"]}
    row = {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        "device": _device_name(device),
        "torch": torch.__version__,
        "vllm": _version("vllm"),
        "deepspeed": _version("deepspeed"),
        "config": os.path.relpath(args.config, ROOT),
        "mode": cfg["placement"]["mode"],
        "ranks": args.ranks,
        "zero_stage": "/".join(str(z) for z in sorted(zero)),
        "model_params": params,
        "rollout_batch": cfg["ppo"]["rollout_batch_size"] * cfg["ppo"]["samples_per_prompt"],
        "max_new_tokens": cfg["rollout"]["max_new_tokens"],
        "steps": args.steps,
        "warmup": args.warmup,
        "wall_s": f"{wall:.1f}",
        "overrides": " ".join(args.overrides),
    }
    row |= {k: f"{v:.4g}" for k, v in stats.items()}
    return row


def write_csv(row: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        if new:
            writer.writeheader()
        writer.writerow(row)


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "ppo_tiny.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1, help="leading steps left out of the means")
    parser.add_argument("--ranks", type=int, default=1, help="1: plain python; N > 1: deepspeed --num_gpus N")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ppo.csv"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is killed")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. actor.zero_stage=3")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if args.ranks < 1:
        parser.error("--ranks must be >= 1")
    row = bench(args)
    write_csv(row, Path(args.out))
    print(
        f"{row['device']} | {row['ranks']} rank(s), ZeRO-{row['zero_stage']}, {row['model_params']} params, "
        f"{row['rollout_batch']} samples x {row['max_new_tokens']} new tokens per step\n"
        f"  {row['samples_per_s']} samples/s, {row['tokens_per_s']} tokens/s over {args.steps - args.warmup} steps\n"
        f"  per step: generate {row['generate_s']}s, score {row['score_s']}s, train {row['train_s']}s, "
        f"sync {row['sync_s']}s of {row['step_s']}s (sync {row['sync_pct']}%, target < 5%)\n"
        f"  max logprob gap {row['logprob_gap_max']}; wall {row['wall_s']}s\n"
        f"appended to {args.out}"
    )
    return row


if __name__ == "__main__":
    main()
