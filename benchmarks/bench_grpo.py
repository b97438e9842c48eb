"""Our GRPO against TRL's ``GRPOTrainer``, side by side on the same tiny model and the same work.

Usage::

    python benchmarks/bench_grpo.py                    # 3 interleaved runs of 12 steps each, 2 warm-up
    python benchmarks/bench_grpo.py --model small      # hidden 256, 4 layers (3.2M parameters)
    python benchmarks/bench_grpo.py --steps 20 --estimator rloo   # another of our estimators
    python benchmarks/bench_grpo.py --skip-peer        # ours only (no TRL install)

One command runs both on this machine:

1. builds a random Llama (``--model``: ``tiny`` hidden 128 x 2 layers, 0.41M parameters, or
   ``small`` hidden 256 x 4 layers; the toy tokenizer) and saves it to a directory both load, so
   both start from the same weights;
2. ours: ``python -m tritonrlhf.engine.cli ppo --config configs/grpo_tiny.yaml`` with ``model.path`` set to
   it, 16 prompts x 4 samples per step (group size 4), 32 new tokens, the k3 KL to the reference
   in the loss (beta 0.04), one optimizer step per batch (``ppo.mini_batch_size=64``), once per
   rollout backend in ``--backends`` (``hf``: transformers ``generate`` on a copy of the policy,
   weights synced each step; ``vllm``: vLLM) and placement in ``--modes`` (``colocate``: 1 rank;
   ``async``: ``split``, 1 trainer + 1 rollout rank with one thread each, one-step-off, the
   reference scored on the rollout rank, so generating batch k+1 overlaps training on batch k),
   DeepSpeed with ZeRO stage 0 by default (one rank has nothing to shard; pass other overrides to
   change it);
3. TRL: installs ``trl`` (``--trl-version``) with torch 2.13.0 from the local CPU wheel into its own
   virtual environment, ``benchmarks/.peer_venvs/trl-<version>`` (git-ignored, made once), and runs
   ``benchmarks/peers/trl_grpo.py`` there: ``GRPOTrainer`` with the same prompts, group size, new
   tokens, beta, clip range, learning rate and one optimizer step per batch, reference model
   included, HF ``generate`` (TRL's default without vLLM), gradient checkpointing off.

Both use the same reward (``tritonrlhf.engine.tasks:toy_reward``) and fp32. Each system runs ``--repeats``
times, interleaved (ours, TRL, ours, TRL, ...), because step times on a shared 2-core VM drift by
a third between runs minutes apart; each run's median step after ``--warmup`` is taken, and the
median over runs is reported: samples per second (prompts x group size / step seconds) for
all, and our per-phase breakdown. Rows are appended to ``benchmarks/results/grpo.csv`` with the
device, versions, git SHA and every run's median.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import (  # noqa: E402
    append_rows,
    device_name,
    git_sha,
    package_version,
)
from benchmarks._peers import MODELS, build_model, peer_python, run_peer  # noqa: E402
from benchmarks.bench_ppo import measure, passes_text  # noqa: E402
from tritonrlhf.engine.tasks import toy_prompts  # noqa: E402

COLUMNS = [
    "timestamp", "git_sha", "device", "system", "versions", "estimator", "prompts", "group_size",
    "max_new_tokens", "model_params", "steps", "warmup", "step_s_median", "samples_per_s",
    "generate_s", "score_s", "train_s", "sync_s", "passes", "reward_first", "reward_last", "threads",
    "note",
]  # fmt: skip


# --modes: our placements. "async" is split placement, 1 trainer rank + 1 rollout rank (2
# processes, one thread each), one-step-off (async.max_staleness=1), the reference scored beside
# the rollout engine: the same work per step, with generation overlapped with training.
MODES = {
    "colocate": ([], 1),
    "async": (["placement.mode=split", "async.max_staleness=1", "placement.scoring=rollout"], 2),
}


def ours(args: argparse.Namespace, model_dir: Path, work: Path, backend: str, mode: str = "colocate") -> dict:
    n, prompts = args.group_size, args.prompts
    overrides = [
        f"model.path={model_dir}",
        f"seed={args.seed}",
        f"algo.advantage={args.estimator}",
        f"ppo.rollout_batch_size={prompts}",
        f"ppo.samples_per_prompt={n}",
        f"ppo.mini_batch_size={prompts * n}",  # one optimizer step per batch
        f"ppo.micro_batch_size={prompts * n}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        "ppo.kl.placement=loss",
        "ppo.kl.kind=k3",
        f"ppo.kl.coef={args.beta}",
        f"actor.lr={args.lr}",
        "data.num_prompts=256",
        f"rollout.backend={backend}",
        *MODES[mode][0],
        *args.overrides,
    ]
    out = work / f"ours_{backend}_{mode}"
    config = ROOT / "configs" / "grpo_tiny.yaml"
    return measure(config, args.steps, args.warmup, MODES[mode][1], overrides, out, args.timeout)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="leading steps left out")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (reference model in both)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--estimator", default="grpo")
    parser.add_argument("--model", default="tiny", choices=sorted(MODELS), help="the random Llama both train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-version", default="1.16.0")
    parser.add_argument(
        "--backends", default="hf,vllm", help="our rollout backends to run, comma-separated (hf, vllm)"
    )
    parser.add_argument(
        "--modes", default="colocate,async", help=f"our placements, comma-separated ({', '.join(MODES)})"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system, interleaved")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grpo.csv"))
    parser.add_argument(
        "overrides",
        nargs="*",
        default=["actor.zero_stage=0"],
        help="dotted overrides for our runs (default: actor.zero_stage=0 -- one rank has nothing to shard)",
    )
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    peer = None if args.skip_peer else peer_python(args.trl_version)  # install before timing anything
    device = device_name(torch.device("cpu"))
    samples = args.prompts * args.group_size
    base = {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": device,
        "prompts": args.prompts,
        "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())),
    }
    runs: dict[str, list[dict]] = {}  # system -> one result per repeat
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        work = Path(tmp)
        params = build_model(work / "model", args.seed, args.model)
        base["model_params"] = params
        spec = {
            "model_dir": str(work / "model"),
            "prompts": toy_prompts(256, args.seed),  # what data.prompts=toy gives our run
            "group_size": args.group_size,
            "prompts_per_step": args.prompts,
            "max_new_tokens": args.max_new_tokens,
            "beta": args.beta,
            "lr": args.lr,
            "steps": args.steps,
            "seed": args.seed,
        }
        # Repeats interleave the systems, so a slow spell of the machine hits each of them alike.
        for rep in range(args.repeats):
            for mode in args.modes.split(","):
                for backend in args.backends.split(","):
                    mine = ours(args, work / "model", work / f"rep{rep}", backend, mode)
                    label = backend if mode == "colocate" else f"{backend}, split async"
                    runs.setdefault(f"tritonrlhf ({label})", []).append(mine)
            if peer is not None:
                trl = run_peer(peer, "trl_grpo.py", spec, work, args.timeout)
                trl["step_s_median"] = statistics.median(trl["step_s"][args.warmup :])
                trl["rewards"] = trl["reward"]
                runs.setdefault("trl GRPOTrainer", []).append(trl)
    rows = []
    for system, results in runs.items():
        meds = [r["step_s_median"] for r in results]
        med = statistics.median(meds)
        row = {
            **base,
            "system": system,
            "step_s_median": f"{med:.4g}",
            "samples_per_s": f"{samples / med:.4g}",
            "reward_first": f"{statistics.median(r['rewards'][0] for r in results):.4g}",
            "reward_last": f"{statistics.median(r['rewards'][-1] for r in results):.4g}",
        }
        per_run = "per-run medians " + " ".join(f"{m:.3f}" for m in meds) + " s"
        if system.startswith("tritonrlhf"):
            backend, _, split = system.split("(")[1].rstrip(")").partition(", ")
            gen = "vLLM" if backend == "vllm" else "HF generate (a copy, weights synced each step)"
            where = (
                "1 trainer + 1 rollout rank, one-step-off async, reference scored on the rollout rank, "
                "1 thread each"
                if split
                else "1 rank, colocate"
            )
            row.update(
                {
                    "versions": f"torch {torch.__version__}, vllm {package_version('vllm')}, deepspeed {package_version('deepspeed')}",
                    "estimator": args.estimator,
                    **{
                        k: f"{statistics.median(r[k] for r in results):.4g}"
                        for k in ("generate_s", "score_s", "train_s", "sync_s")
                    },
                    "passes": passes_text(results),
                    "note": f"{where}, {gen}; {' '.join(args.overrides)}; {per_run}",
                }
            )
        else:
            v = results[0]["versions"]
            row.update(
                {
                    "versions": f"trl {v['trl']}, transformers {v['transformers']}, torch {v['torch']}",
                    "estimator": "grpo (loss_type=grpo)",
                    "threads": str(results[0]["threads"]),
                    "note": f"HF generate, reference model, gradient checkpointing off; {per_run}",
                }
            )
        rows.append(row)
    append_rows(Path(args.out), rows, COLUMNS)
    print(f"{device}: {args.prompts} prompts x {args.group_size} samples, {args.max_new_tokens} new tokens, "
          f"{params} params; median over {args.repeats} run(s) of each run's median of steps "
          f"{args.warmup + 1}-{args.steps}")  # fmt: skip
    for r in rows:
        print(
            f"  {r['system']:18s} {r['samples_per_s']:>8s} samples/s  ({r['step_s_median']} s/step)  {r['versions']}"
        )
        print(f"  {'':18s} {r['note'].split('; ')[-1]}")
    trl = [r for r in rows if r["system"].startswith("trl")]
    for r in rows:
        if not r["system"].startswith("tritonrlhf"):
            continue
        if trl:
            ratio = float(r["samples_per_s"]) / float(trl[0]["samples_per_s"])
            print(f"  {r['system']} / TRL = {ratio:.2f}x")
        print(
            f"  {r['system']} step: generate {r['generate_s']} s, score {r['score_s']} s, "
            f"train {r['train_s']} s, sync {r['sync_s']} s (medians of the runs' means)"
        )
        print(f"  {r['system']} inside score and train (trainer rank): {r['passes']}")
    print(f"appended to {args.out}")
    return rows


if __name__ == "__main__":
    main()
