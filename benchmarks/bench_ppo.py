"""Benchmark the PPO loop end to end: a fixed config for a fixed number of steps.

Usage::

    python benchmarks/bench_ppo.py                                  # configs/ppo_tiny.yaml, 10 steps, 1 rank
    python benchmarks/bench_ppo.py --ranks 2 --steps 6 actor.zero_stage=3 critic.zero_stage=3
    python benchmarks/bench_ppo.py --config configs/ppo_7b_8gpu.yaml --ranks 8 --steps 20
    python benchmarks/bench_ppo.py --compare --steps 12                # the placement comparison below
    python benchmarks/bench_ppo.py --peer trl --model small            # against TRL's PPOTrainer, below

Runs ``python -m tritonrlhf.engine.cli ppo`` (``deepspeed --num_gpus N --module tritonrlhf.engine.cli ppo`` for N > 1) in a
subprocess with the given dotted overrides, then reads the run's ``metrics.jsonl``. Reported
over the steps after ``--warmup`` (the first step pays one-off costs: allocator growth, lazy
kernel builds): samples/s and response tokens/s (means of the per-step values), the mean seconds
of each phase -- generate (rollout), score (old/ref log-probs, values, reward, advantages),
train (actor and critic updates), sync (weights into the rollout engine) -- and sync's share of
step time (the target is under 5%).

A row is appended to ``benchmarks/results/ppo.csv`` with the device, versions and git SHA.

``--compare`` runs the same config and steps in four ways -- ``colocate`` on 1 rank and on 2 ranks
(synchronous), ``split`` with 1 trainer + 1 rollout rank synchronously (``async.max_staleness=0``)
and one-step-off (``max_staleness=1``) -- with one thread per process (``OMP_NUM_THREADS=1``), appends
a row for each, prints the speed-up of async over the best synchronous mode, and draws the
per-phase timeline of a few steps of each mode into ``benchmarks/results/ppo_timeline.png``: for
``split``, ``generate`` is the rollout rank's time; ``hidden_pct`` is the share of it that the
trainer did not wait for (it trained meanwhile).

``--peer trl`` puts ours beside TRL's ``PPOTrainer`` (TRL 1.12, ``--trl-version``) on the same
work, in one command, as ``bench_grpo.py`` does for GRPO: it saves one random Llama (``--model``)
and a ``num_labels=1`` classifier on its backbone (``benchmarks/_peers.py``), installs TRL into its
own environment under ``benchmarks/.peer_venvs/`` (once), and runs, interleaved ``--repeats`` times:
ours colocated on 1 rank for each of ``--backends``; ours split one-step-off (1 trainer + 1 vLLM
rollout rank scoring reference and reward; ``--no-split`` leaves it out); and
``benchmarks/peers/trl_ppo.py`` in TRL's environment. Both load the policy and reference from the
Llama and the reward model and critic from the classifier, and train on ``--prompts`` toy prompts
per step, ``--max-new-tokens`` at temperature 0.7, k1 KL 0.05 in the reward, one epoch of one
mini-batch (one optimizer step per batch), fp32 (``saved_model_overrides``). Each run's median step
after ``--warmup`` is taken, and the median over runs is reported: steps/s, samples/s, the speed
ratio to TRL, and our per-phase breakdown; a row per system goes to
``benchmarks/results/ppo_vs_trl.csv``.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import (  # noqa: E402
    append_rows,
    device_name,
    git_sha,
    package_version,
)
from benchmarks._peers import (  # noqa: E402
    MODELS,
    build_model,
    build_reward_model,
    peer_python,
    run_peer,
)
from tritonrlhf.engine.tasks import toy_prompts  # noqa: E402

COLUMNS = [
    "timestamp", "git_sha", "device", "torch", "vllm", "deepspeed", "config", "mode", "ranks",
    "zero_stage", "model_params", "rollout_batch", "max_new_tokens", "steps", "warmup",
    "samples_per_s", "tokens_per_s", "generate_s", "score_s", "train_s", "sync_s", "step_s",
    "sync_pct", "logprob_gap_max", "reward_first", "reward_last", "wall_s", "overrides",
    "max_staleness", "generate_busy_s", "hidden_pct", "threads",
]  # fmt: skip
PHASES = {"generate_s": "time/rollout_s", "score_s": "time/score_s", "train_s": "time/train_s"}
PHASES |= {"sync_s": "time/sync_s", "step_s": "time/step_s"}
SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"  # ..._<uid>_<addr>_<port>_<rank>


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
    config: Path,
    steps: int,
    ranks: int,
    overrides: list[str],
    out_dir: Path,
    timeout_s: float,
    threads: int | None = None,
) -> float:
    """Run the CLI; returns its wall seconds. Raises with the output tail on failure. ``threads``:
    ``OMP_NUM_THREADS`` of each process (default: the environment's)."""
    port = _free_port()  # names this run's /dev/shm buffers, so cleanup touches no other run's
    if ranks == 1:
        cmd = [sys.executable, "-m", "tritonrlhf.engine.cli"]
    else:
        launcher = str(Path(sys.executable).parent / "deepspeed")  # its flag is --module, not -m
        cmd = [
            launcher,
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(port),
            "--module",
            "tritonrlhf.engine.cli",
        ]
    cmd += ["ppo", "--config", str(config), f"output_dir={out_dir}", f"total_steps={steps}"]
    cmd += ["logging.progress_bar=false", "logging.tensorboard=false", *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_PORT=str(port))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
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
    if "time/generate_s" in timed[0]:
        stats["generate_busy_s"] = mean("time/generate_s")  # the rollout engine's own generate time
        stats["hidden_pct"] = 100 * mean("async/hidden_frac")
    # The passes inside score and train that this (trainer) rank ran: time/score/ref_s -> pass/ref.
    for key in timed[0]:
        if key.startswith(("time/score/", "time/train/")):
            stats["pass/" + key.rsplit("/", 1)[1].removesuffix("_s")] = mean(key)
    return stats


def passes_text(results: list[dict]) -> str:
    """``"old_logprobs 0.12 s, ref 0.10 s, ..."``: each pass's median over ``results`` (summarize's)."""
    names = [k for k in results[0] if k.startswith("pass/")]
    return ", ".join(f"{k[5:]} {statistics.median(r[k] for r in results):.3g} s" for k in names)


def measure(
    config: Path,
    steps: int,
    warmup: int,
    ranks: int,
    overrides: list[str],
    out_dir: Path,
    timeout_s: float,
) -> dict:
    """One run of the CLI (``run_ppo``) summarized: ``summarize``'s means, plus ``step_s_median``
    (the median step seconds after ``warmup``), ``rewards`` (every step's mean reward) and ``wall_s``.
    With ``ranks`` > 1 each process gets one thread (the 2-core machine's cores split between them)."""
    wall = run_ppo(config, steps, ranks, overrides, out_dir, timeout_s, threads=1 if ranks > 1 else None)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    stats = summarize(out_dir, warmup)
    stats["step_s_median"] = statistics.median(r["time/step_s"] for r in rows[warmup:] or rows)
    stats["rewards"] = [r["reward/mean"] for r in rows]
    stats["wall_s"] = wall
    return stats


def env_columns() -> dict[str, str]:
    """A row's first columns: when, which commit, which device, which torch, vLLM and DeepSpeed."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": device_name(device),
        "torch": torch.__version__,
        "vllm": package_version("vllm"),
        "deepspeed": package_version("deepspeed"),
    }


def bench(args: argparse.Namespace, keep: Path | None = None) -> dict[str, str]:
    """One run; ``keep``: copy its timeline.jsonl there."""
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        out = Path(tmp) / "run"
        wall = run_ppo(Path(args.config), args.steps, args.ranks, args.overrides, out, args.timeout)
        stats = summarize(out, args.warmup)
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        summary = json.loads((out / "summary.json").read_text())
        params = _model_params(Path(summary["policy_dir"]))
        if keep is not None and (out / "timeline.jsonl").is_file():
            keep.write_text((out / "timeline.jsonl").read_text())
    zero = {cfg["actor"]["zero_stage"], cfg["critic"]["zero_stage"]}
    row = {
        **env_columns(),
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
        "max_staleness": cfg["async"]["max_staleness"],
        "threads": os.environ.get("OMP_NUM_THREADS", ""),
    }
    row |= {k: f"{v:.4g}" for k, v in stats.items()}
    return row


def write_csv(row: dict, path: Path) -> None:
    append_rows(path, [row], COLUMNS)


COMPARE = [  # (label, ranks, overrides)
    ("colocate, 1 rank", 1, []),
    ("colocate, 2 ranks", 2, []),
    ("split 1+1, sync", 2, ["placement.mode=split", "async.max_staleness=0"]),
    ("split 1+1, async s=1", 2, ["placement.mode=split", "async.max_staleness=1"]),
]
PHASE_COLORS = {
    "generate": "tab:green",
    "weight_load": "tab:purple",
    "score": "tab:orange",
    "train": "tab:blue",
    "sync": "tab:red",
    "rollout_wait": "lightgray",
}


def compare(args: argparse.Namespace) -> list[dict[str, str]]:
    """The four placements on one config; rows appended, timeline PNG written (see module doc)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    rows, timelines = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_cmp_") as tmp:
        for i, (label, ranks, extra) in enumerate(COMPARE):
            if "placement.mode=split" in extra:
                extra = [*extra, f"placement.scoring={args.split_scoring}"]
            run_args = argparse.Namespace(
                **{**vars(args), "ranks": ranks, "overrides": [*args.overrides, *extra]}
            )
            keep = Path(tmp) / f"timeline{i}.jsonl"
            row = bench(run_args, keep)
            row["mode"] = label
            write_csv(row, Path(args.out))
            rows.append(row)
            timelines[label] = (
                [json.loads(line) for line in keep.read_text().splitlines()] if keep.exists() else []
            )
            print(
                f"{label}: {row['samples_per_s']} samples/s, step {row['step_s']}s, sync {row['sync_pct']}%"
            )
    best_sync = max(float(r["samples_per_s"]) for r in rows[:3])
    speedup = float(rows[3]["samples_per_s"]) / best_sync
    print(f"async / best synchronous = {speedup:.2f}x (target >= 1.2x)")
    plot_timelines(timelines, Path(args.out).with_name("ppo_timeline.png"), rows[0]["device"], args.warmup)
    return rows


def plot_timelines(
    timelines: dict[str, list[dict]], path: Path, device: str, warmup: int, steps: int = 4
) -> None:
    """One panel per mode: lanes for the trainer and the rollout engine, ``steps`` steps after warm-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(timelines), 1, figsize=(11, 1.6 * len(timelines) + 0.8), squeeze=False)
    for ax, (label, lines) in zip(axes[:, 0], timelines.items()):
        chosen = [line for line in lines if warmup < line["step"] <= warmup + steps]
        events = [e for line in chosen for e in line["events"]]
        if not events:
            continue
        start = min(e["t0"] for e in events)
        for e in events:
            lane = 0 if e["role"] == "trainer" else 1
            color = PHASE_COLORS.get(e["phase"], "black")
            ax.broken_barh([(e["t0"] - start, e["t1"] - e["t0"])], (lane - 0.4, 0.8), color=color)
        ax.set_yticks([0, 1], ["trainer", "rollout"])
        ax.set_title(label, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("seconds")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLORS.values()]
    fig.suptitle(f"PPO phases, steps {warmup + 1}-{warmup + steps} ({device})", fontsize=10)
    fig.legend(
        handles, list(PHASE_COLORS), loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=6, fontsize=8
    )
    fig.tight_layout(rect=(0, 0, 1, 0.91))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"timeline plot: {path}")


# --peer trl: our PPO and TRL's PPOTrainer on the same saved Llama and the same work (module doc).
SPLIT_ASYNC = ["placement.mode=split", "async.max_staleness=1", "placement.scoring=rollout"]
MODES = {"colocate": (1, []), "split-async": (2, SPLIT_ASYNC)}  # name -> (ranks, overrides)
PEER_LR, PEER_VF_COEF, PEER_TEMPERATURE, PEER_KL_COEF = 5e-3, 0.5, 0.7, 0.05
PEER_COLUMNS = [
    "timestamp", "git_sha", "device", "system", "versions", "model", "model_params", "prompts",
    "max_new_tokens", "steps", "warmup", "step_s_median", "steps_per_s", "samples_per_s",
    "tokens_per_s", "vs_trl", "generate_s", "score_s", "train_s", "sync_s", "passes",
    "reward_first", "reward_last", "threads", "note",
]  # fmt: skip


def saved_model_overrides(
    model_dir: Path, rm_dir: Path, prompts: int, max_new_tokens: int, seed: int
) -> list[str]:
    """Our PPO on saved checkpoints with the work of ``benchmarks/peers/trl_ppo.py``.

    Policy and reference from ``model_dir``; reward model and critic from ``rm_dir`` (a
    ``num_labels=1`` classifier); ``prompts`` per step, one sample each, one PPO epoch of one
    mini-batch (one optimizer step per batch); k1 KL in the reward; raw rewards (TRL's
    ``whiten_rewards=False``), whitened advantages (as TRL); ZeRO stage 0 (one trainer rank has
    nothing to shard).
    """
    return [
        f"model.path={model_dir}",
        "reward.kind=model",
        f"reward.model_path={rm_dir}",
        f"critic.init_from={rm_dir}",
        f"seed={seed}",
        "data.num_prompts=256",
        f"ppo.rollout_batch_size={prompts}",
        "ppo.samples_per_prompt=1",
        f"ppo.mini_batch_size={prompts}",
        f"ppo.micro_batch_size={prompts}",
        "ppo.ppo_epochs=1",
        f"ppo.vf_coef={PEER_VF_COEF}",
        "ppo.reward_norm=false",
        "ppo.whiten_advantages=true",
        "ppo.kl.kind=k1",
        f"ppo.kl.coef={PEER_KL_COEF}",
        "ppo.kl.placement=reward",
        f"rollout.max_new_tokens={max_new_tokens}",
        f"rollout.temperature={PEER_TEMPERATURE}",
        f"actor.lr={PEER_LR}",
        f"critic.lr={PEER_LR}",
        "actor.zero_stage=0",
        "critic.zero_stage=0",
    ]


def save_models(work: Path, seed: int, size: str, vocab: int = 64) -> tuple[Path, Path, int]:
    """The random Llama of ``MODELS[size]`` (``vocab`` embedding rows) and its reward model saved
    under ``work``: (policy dir, reward dir, parameter count)."""
    params = build_model(work / f"policy_{size}", seed, size, vocab)
    build_reward_model(work / f"policy_{size}", work / f"rm_{size}", seed)
    return work / f"policy_{size}", work / f"rm_{size}", params


def peer_compare(args: argparse.Namespace) -> list[dict]:
    """Ours (colocate per backend, split one-step-off) and TRL's PPOTrainer, interleaved ``--repeats``
    times; one row per system with the median of the runs' median steps."""
    peer = peer_python(args.trl_version)  # install before timing anything
    ours = [(f"ours colocate ({b})", *MODES["colocate"], [f"rollout.backend={b}"]) for b in args.backends]
    if args.split:
        ours += [
            (f"ours split async s=1 ({b})", *MODES["split-async"], [f"rollout.backend={b}"])
            for b in args.backends
        ]
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ppo_peer_") as tmp:
        work = Path(tmp)
        model_dir, rm_dir, params = save_models(work, args.seed, args.model, args.vocab)
        common = saved_model_overrides(model_dir, rm_dir, args.prompts, args.max_new_tokens, args.seed)
        spec = {
            "model_dir": str(model_dir),
            "reward_dir": str(rm_dir),
            "prompts": toy_prompts(256, args.seed),  # what data.prompts=toy gives our run
            "prompts_per_step": args.prompts,
            "max_new_tokens": args.max_new_tokens,
            "temperature": PEER_TEMPERATURE,
            "kl_coef": PEER_KL_COEF,
            "vf_coef": PEER_VF_COEF,
            "lr": PEER_LR,
            "steps": args.steps,
            "seed": args.seed,
        }
        # Repeats interleave the systems, so a slow spell of the machine hits each of them alike.
        for rep in range(args.repeats):
            for i, (label, ranks, mode, extra) in enumerate(ours):
                overrides = [*common, *mode, *extra, *args.overrides]
                out = work / f"rep{rep}_ours{i}"
                runs.setdefault(label, []).append(
                    measure(Path(args.config), args.steps, args.warmup, ranks, overrides, out, args.timeout)
                )
            trl = run_peer(peer, "trl_ppo.py", spec, work, args.timeout)
            trl["step_s_median"] = statistics.median(trl["step_s"][args.warmup :])
            trl["rewards"] = trl["reward"]
            runs.setdefault("trl PPOTrainer", []).append(trl)
    rows = peer_rows(args, runs, params, dict((label, extra) for label, _, _, extra in ours))
    append_rows(Path(args.out), rows, PEER_COLUMNS)
    print_peer_rows(args, rows)
    return rows


def peer_rows(args: argparse.Namespace, runs: dict[str, list[dict]], params: int, ours: dict) -> list[dict]:
    """One CSV row per system: medians over the repeats of each run's figures."""
    med = lambda results, key: statistics.median(r[key] for r in results)  # noqa: E731
    base = {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "model": args.model if args.vocab == 64 else f"{args.model} vocab {args.vocab}",
        "model_params": params,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())),
    }
    trl_step = med(runs["trl PPOTrainer"], "step_s_median")
    rows = []
    for system, results in runs.items():
        step = med(results, "step_s_median")
        per_run = "per-run medians " + " ".join(f"{r['step_s_median']:.3f}" for r in results) + " s"
        row = {
            **base,
            "system": system,
            "step_s_median": f"{step:.4g}",
            "steps_per_s": f"{1 / step:.4g}",
            "samples_per_s": f"{args.prompts / step:.4g}",
            "vs_trl": f"{trl_step / step:.3g}",
            "reward_first": f"{statistics.median(r['rewards'][0] for r in results):.4g}",
            "reward_last": f"{statistics.median(r['rewards'][-1] for r in results):.4g}",
        }
        if system in ours:
            gen = "HF generate" if "(hf)" in system else "vLLM"
            where = f"2 processes, 1 thread each: 1 trainer + 1 {gen} rollout rank scoring ref and reward, one-step-off"
            if "colocate" in system:
                where = f"1 rank, colocate, {gen}"
            row |= {
                "versions": f"torch {torch.__version__}, vllm {package_version('vllm')}, "
                f"deepspeed {package_version('deepspeed')}",
                "tokens_per_s": f"{med(results, 'tokens_per_s'):.4g}",
                **{k: f"{med(results, k):.4g}" for k in ("generate_s", "score_s", "train_s", "sync_s")},
                "passes": passes_text(results),
                "note": f"{where}; {' '.join([*ours[system], *args.overrides])}; {per_run}",
            }
            if "split" in system:
                row["threads"] = "1"
        else:
            v = results[0]["versions"]
            row |= {
                "versions": f"trl {v['trl']}, transformers {v['transformers']}, torch {v['torch']}",
                "threads": str(results[0]["threads"]),
                "note": f"HF generate, ref/reward/value models, gradient checkpointing off; {per_run}",
            }
        rows.append(row)
    return rows


def print_peer_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    print(
        f"{rows[0]['device']}: {args.prompts} prompts x {args.max_new_tokens} new tokens, {rows[0]['model']} "
        f"({rows[0]['model_params']} params); median over {args.repeats} run(s) of each run's median "
        f"step {args.warmup + 1}-{args.steps}"
    )
    for r in rows:
        print(
            f"  {r['system']:30s} {r['steps_per_s']:>7s} steps/s {r['samples_per_s']:>8s} samples/s "
            f"({r['step_s_median']} s/step)  speed vs TRL {r['vs_trl']}x  {r['versions']}"
        )
        if r["system"].startswith("ours"):
            print(
                f"  {'':30s} generate {r['generate_s']} s, score {r['score_s']} s, train {r['train_s']} s, "
                f"sync {r['sync_s']} s per step (medians of the runs' means); {r['tokens_per_s']} tokens/s"
            )
            print(f"  {'':30s} inside score and train (trainer rank): {r['passes']}")
    print(f"appended to {args.out}")


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "ppo_tiny.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1, help="leading steps left out of the means")
    parser.add_argument("--ranks", type=int, default=1, help="1: plain python; N > 1: deepspeed --num_gpus N")
    parser.add_argument("--out", default=None, help="CSV (default results/ppo.csv; --peer: ppo_vs_trl.csv)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is killed")
    parser.add_argument("--compare", action="store_true", help="colocate vs split sync vs split async")
    parser.add_argument(
        "--split-scoring",
        default="trainer",
        choices=("trainer", "rollout"),
        help="placement.scoring of split runs",
    )
    peer = parser.add_argument_group("--peer trl: side by side with TRL's PPOTrainer")
    peer.add_argument("--peer", choices=("trl",), help="run the peer comparison")
    peer.add_argument("--trl-version", default="1.12.0", help="TRL's last release with PPOTrainer")
    peer.add_argument("--model", default="small", choices=list(MODELS), help="the random Llama both train")
    peer.add_argument(
        "--vocab",
        type=int,
        default=64,
        help="the model's vocabulary: 64 (the toy tokenizer) or a larger multiple of 64 (the toy "
        "tokenizer plus two-letter merges; 512 gives issue #16's 3.4M model)",
    )
    peer.add_argument("--prompts", type=int, default=16, help="prompts per step")
    peer.add_argument("--max-new-tokens", type=int, default=64)
    peer.add_argument("--repeats", type=int, default=3, help="runs of each system, interleaved")
    peer.add_argument(
        "--backends", default="hf,vllm", type=lambda s: s.split(","), help="our colocate rollout backends"
    )
    peer.add_argument(
        "--split", action=argparse.BooleanOptionalAction, default=True, help="also ours split one-step-off"
    )
    peer.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. actor.zero_stage=3")
    args = parser.parse_args(argv)
    results = ROOT / "benchmarks" / "results"
    args.out = args.out or str(results / ("ppo_vs_trl.csv" if args.peer else "ppo.csv"))
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if args.ranks < 1:
        parser.error("--ranks must be >= 1")
    if args.peer:
        return peer_compare(args)[-1]
    if args.compare:
        return compare(args)[-1]
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
