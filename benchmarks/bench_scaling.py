"""Our PPO's throughput against batch size, response length and model size, colocated and split.

Usage::

    python benchmarks/bench_scaling.py                               # every point, both modes, 6 steps
    python benchmarks/bench_scaling.py --dims prompts,model --modes colocate --steps 4
    python benchmarks/bench_scaling.py --dims tokens --max-new-tokens 32,64 --steps 3 --warmup 1

Around a base point -- 16 prompts per step, 64 new tokens, the ``small`` random Llama (3.2M
parameters) -- one dimension varies at a time (``--dims``):

- ``prompts``: prompts per step (``--prompts``, default 8, 16, 32);
- ``tokens``: ``rollout.max_new_tokens`` (``--max-new-tokens``, default 32, 64, 128);
- ``model``: ``tiny`` / ``small`` / ``medium`` (0.41M / 3.2M / 10.7M parameters, ``--models``).

Each point runs in each mode of ``--modes``: ``colocate`` (1 rank, vLLM in-process) and
``split-async`` (2 processes: 1 trainer + 1 vLLM rollout rank scoring the reference and reward,
one-step-off, ``async.max_staleness=1``). The work is ``bench_ppo.py --peer``'s
(``saved_model_overrides``): policy and reference from a saved random Llama, reward model and critic
from a ``num_labels=1`` classifier on its backbone, one sample per prompt, one optimizer step per
batch. Figures are means over the steps after ``--warmup`` (``bench_ppo.summarize``): samples/s,
response tokens/s and the per-phase seconds. A row per (point, mode) is appended to
``benchmarks/results/scaling.csv`` with the device, versions and git SHA, and this run's rows are
drawn into ``benchmarks/results/scaling.png`` (one column per dimension; samples/s above,
tokens/s below; one line per mode).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import append_rows  # noqa: E402
from benchmarks._peers import MODELS  # noqa: E402
from benchmarks.bench_ppo import (  # noqa: E402
    MODES,
    env_columns,
    measure,
    save_models,
    saved_model_overrides,
)

COLUMNS = [
    "timestamp", "git_sha", "device", "torch", "vllm", "deepspeed", "mode", "ranks", "model",
    "model_params", "prompts", "max_new_tokens", "steps", "warmup", "samples_per_s", "tokens_per_s",
    "step_s", "generate_s", "score_s", "train_s", "sync_s", "threads", "overrides",
]  # fmt: skip
BASE = {"prompts": 16, "max_new_tokens": 64, "model": "small"}
DIMS = {"prompts": "prompts", "tokens": "max_new_tokens", "model": "model"}  # --dims name -> column
LABELS = {"prompts": "prompts per step", "tokens": "max new tokens", "model": "model"}


def points(args: argparse.Namespace) -> list[dict]:
    """The distinct points of ``--dims``, each one dimension away from ``BASE`` (the base point once)."""
    values = {"prompts": args.prompts, "tokens": args.max_new_tokens, "model": args.models}
    out: list[dict] = []
    for dim in args.dims:
        for v in values[dim]:
            point = {**BASE, DIMS[dim]: v}
            if point not in out:
                out.append(point)
    return out


def run_point(args: argparse.Namespace, work: Path, point: dict, mode: str, models: dict) -> dict:
    model_dir, rm_dir, params = models[point["model"]]
    ranks, mode_overrides = MODES[mode]
    overrides = saved_model_overrides(model_dir, rm_dir, point["prompts"], point["max_new_tokens"], args.seed)
    overrides += [*mode_overrides, "rollout.backend=vllm", *args.overrides]
    out = work / f"{mode}_{point['model']}_{point['prompts']}_{point['max_new_tokens']}"
    stats = measure(Path(args.config), args.steps, args.warmup, ranks, overrides, out, args.timeout)
    return {
        **env_columns(),
        "mode": mode,
        "ranks": ranks,
        **point,
        "model_params": params,
        "steps": args.steps,
        "warmup": args.warmup,
        **{
            k: f"{stats[k]:.4g}"
            for k in ("samples_per_s", "tokens_per_s", "step_s", "generate_s", "score_s", "train_s", "sync_s")
        },
        "threads": "1" if ranks > 1 else os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())),
        "overrides": " ".join(args.overrides),
    }


def plot(rows: list[dict], dims: list[str], path: Path) -> None:
    """One column per dimension (the rows one step away from ``BASE`` along it), samples/s above and
    tokens/s below, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(dims), figsize=(max(6, 4 * len(dims)), 6.5), squeeze=False)
    for col, dim in enumerate(dims):
        key = DIMS[dim]
        others = [k for k in BASE if k != key]
        along = [r for r in rows if all(str(r[k]) == str(BASE[k]) for k in others)]
        order = list(MODELS) if key == "model" else None
        for mode in dict.fromkeys(r["mode"] for r in along):
            mine = [r for r in along if r["mode"] == mode]
            mine.sort(key=lambda r: order.index(r[key]) if order else int(r[key]))
            xs = [f"{r[key]} ({int(r['model_params']) / 1e6:.1f}M)" if order else int(r[key]) for r in mine]
            for row, metric in enumerate(("samples_per_s", "tokens_per_s")):
                axes[row, col].plot(xs, [float(r[metric]) for r in mine], marker="o", label=mode)
        axes[0, col].set_title(f"{LABELS[dim]} (others at base)", fontsize=9)
        axes[1, col].set_xlabel(LABELS[dim])
        if order is None:
            for row in range(2):
                axes[row, col].set_xscale("log", base=2)
    axes[0, 0].set_ylabel("samples/s")
    axes[1, 0].set_ylabel("response tokens/s")
    axes[0, 0].legend(fontsize=8)
    base = f"base: {BASE['prompts']} prompts, {BASE['max_new_tokens']} new tokens, {BASE['model']} model"
    fig.suptitle(f"PPO throughput, {rows[0]['device']}\n{base}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> list[dict]:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    names = lambda s: s.split(",")  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "ppo_tiny.yaml"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1, help="leading steps left out of the means")
    parser.add_argument("--dims", type=names, default="prompts,tokens,model", help=f"of {','.join(DIMS)}")
    parser.add_argument("--modes", type=names, default="colocate,split-async", help=f"of {','.join(MODES)}")
    parser.add_argument(
        "--prompts", type=ints, default="8,16,32", help="prompts per step, dimension 'prompts'"
    )
    parser.add_argument("--max-new-tokens", type=ints, default="32,64,128", help="dimension 'tokens'")
    parser.add_argument("--models", type=names, default="tiny,small,medium", help="dimension 'model'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is killed")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.csv"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    for flag, given, known in (("--dims", args.dims, DIMS), ("--modes", args.modes, MODES), ("--models", args.models, MODELS)):  # fmt: skip
        if unknown := [x for x in given if x not in known]:
            parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
    todo = points(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        work = Path(tmp)
        models = {
            size: save_models(work, args.seed, size) for size in dict.fromkeys(p["model"] for p in todo)
        }
        for point in todo:
            for mode in args.modes:
                row = run_point(args, work, point, mode, models)
                append_rows(Path(args.out), [row], COLUMNS)
                rows.append(row)
                print(
                    f"{mode:12s} {point['model']:6s} {point['prompts']:3d} prompts x {point['max_new_tokens']:3d} "
                    f"tokens: {row['samples_per_s']} samples/s, {row['tokens_per_s']} tokens/s "
                    f"(generate {row['generate_s']} s, score {row['score_s']} s, train {row['train_s']} s, "
                    f"sync {row['sync_s']} s)",
                    flush=True,
                )
    plot(rows, args.dims, Path(args.out).with_suffix(".png"))
    print(f"appended to {args.out}")
    return rows


if __name__ == "__main__":
    main()
