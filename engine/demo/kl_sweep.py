"""KL sweep on the demo task: PPO at several KL coefficients, proxy (RM) reward and gold score against KL.

``python -m tritonrlhf.engine.demo.kl_sweep RUN_DIR [--coefs 0,0.01,0.05,0.2] [--size demo|ci] [--steps N]
[--eval-every K]`` (``scripts/kl_sweep.sh``).

The SFT policy and the reward model come from ``RUN_DIR/sft`` and ``RUN_DIR/rm`` (what
``scripts/demo.sh RUN_DIR`` leaves); when either is missing, the pipeline's own stages build
the data, SFT and RM there first. Then, under ``RUN_DIR/kl_sweep/``:

* ``kl_<coef>/``: one PPO run per coefficient (``configs/ppo_demo.yaml`` with ``ppo.kl.coef``
  set, the adaptive controller off and ``ppo.kl.reference=always``, so coefficient 0 still logs
  its training KL), saving an HF export every ``--eval-every`` steps;
* ``eval/``: one ``eval`` process for the SFT policy and every saved PPO policy, on held-out
  prompts: mean RM score (the proxy the policy was trained on), mean gold score (the hidden
  objective) and the sampled KL to the SFT reference;
* ``kl_sweep.csv`` / ``kl_sweep.json``: one row per (coefficient, step), plus the SFT row;
* ``kl_sweep.png``: proxy reward and gold score against KL (one line per coefficient, from the
  SFT point through its checkpoints), and the proxy reward per PPO step.

Reward over-optimization shows as a proxy reward that keeps rising with KL while the gold score
stalls or falls; the sweep reports whatever it measures.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from tritonrlhf.engine.demo.pipeline import SIZES, Stages
from tritonrlhf.engine.demo.report import read_rows_if_exists

DEFAULT_COEFS = (0.0, 0.01, 0.05, 0.2)
# Columns of kl_sweep.csv: eval metrics of each policy (held-out prompts) and the PPO run's own log.
COLUMNS = (
    "coef",
    "step",
    "policy",
    "kl",
    "rm_reward",
    "gold_reward",
    "win_rate_rm",
    "win_rate_gold",
    "response_len",
    "train_reward",
    "train_kl",
)


def _coef_name(coef: float) -> str:
    return f"kl_{coef:g}"


def _size_steps(size: str) -> int:
    steps = [o for o in SIZES[size]["ppo"] if o.startswith("total_steps=")]
    return int(steps[-1].split("=", 1)[1]) if steps else 30


def _policies(run: Path, steps: int, every: int) -> dict[int, Path]:
    """step -> HF checkpoint of one PPO run: the exports at multiples of ``every``, and ``final/``."""
    saved = range(every, steps, every) if every else range(0)
    out = {s: run / "checkpoints" / f"step_{s:06d}" / "hf" for s in saved}
    out[steps] = run / "final"
    return out


def run_sweep(
    run_dir: str | Path,
    coefs: tuple[float, ...] = DEFAULT_COEFS,
    size: str = "demo",
    steps: int | None = None,
    eval_every: int | None = None,
    world: int = 1,
    seed: int = 0,
    ppo_overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run the sweep into ``run_dir/kl_sweep``; returns what ``kl_sweep.json`` holds.

    ``steps`` defaults to the size's PPO steps, ``eval_every`` to a third of them (0: final
    policies only). ``ppo_overrides`` go to every PPO run after the sweep's own.
    """
    t0 = time.time()
    coefs = tuple(dict.fromkeys(float(c) for c in coefs))  # one run per distinct coefficient
    st = Stages(Path(run_dir), size, world, seed)
    out = st.root / "kl_sweep"
    out.mkdir(parents=True, exist_ok=True)
    if not all(p.is_file() for p in st.data_paths.values()):
        st.data()
    for stage in ("sft", "rm"):
        if (st.root / stage / "config.json").is_file():
            print(f"[kl_sweep] reusing {st.root / stage}", flush=True)
        else:
            getattr(st, stage)()
    steps = steps or _size_steps(size)
    every = max(1, steps // 3) if eval_every is None else eval_every
    if every >= steps:
        every = 0

    runs: dict[float, Path] = {}
    for coef in coefs:
        name = _coef_name(coef)
        # reference=always: the KL is tracked at coefficient 0 too (auto would build no reference).
        ov = [
            f"ppo.kl.coef={coef}",
            "ppo.kl.adaptive=false",
            "ppo.kl.reference=always",
            f"total_steps={steps}",
        ]
        ov += [f"save_every={every}", "keep_last=0"] if every else ["save_every=0"]
        runs[coef] = st.ppo(out / name, [*ov, *ppo_overrides], name=f"ppo_{name}")

    policies: dict[str, Path] = {"sft": st.root / "sft"}
    for coef, run in runs.items():
        for step, path in _policies(run, steps, every).items():
            policies[f"{_coef_name(coef)}_step{step}"] = path
    ev = st.evaluate(policies, out / "eval", rm_pairs=False, name="eval_kl_sweep")
    metrics = ev.get("policies", {})

    logs = {coef: read_rows_if_exists(run / "metrics.jsonl") for coef, run in runs.items()}
    rows = [_row(None, 0, "sft", metrics.get("sft", {}), [])]
    for coef, run in runs.items():
        for step in _policies(run, steps, every):
            name = f"{_coef_name(coef)}_step{step}"
            upto = [r for r in logs[coef] if r["step"] <= step]
            rows.append(_row(coef, step, name, metrics.get(name, {}), upto))
    result = {
        "coefs": list(coefs),
        "steps": steps,
        "eval_every": every,
        "size": size,
        "seed": seed,
        "sft": str(st.root / "sft"),
        "reward_model": str(st.root / "rm"),
        "eval_prompts": metrics.get("sft", {}).get("num_prompts"),
        "rows": rows,
        "train_curves": {
            _coef_name(c): [{k: r.get(k) for k in ("step", "reward/mean", "kl/mean")} for r in log]
            for c, log in logs.items()
        },
        "stage_seconds": st.times,
        "minutes": (time.time() - t0) / 60.0,
    }
    (out / "kl_sweep.json").write_text(json.dumps(result, indent=2))
    with (out / "kl_sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    _plot(out / "kl_sweep.png", rows, result["train_curves"])
    _print_table(rows)
    return result


def _row(
    coef: float | None, step: int, name: str, m: dict[str, Any], log: list[dict[str, Any]]
) -> dict[str, Any]:
    """One CSV row: the policy's eval metrics and its PPO log's last logged reward/KL up to ``step``."""
    last = log[-1] if log else {}
    row = {"coef": coef, "step": step, "policy": name}
    row.update({k: m.get(k) for k in ("kl", "rm_reward", "gold_reward", "win_rate_rm", "win_rate_gold")})
    row["response_len"] = m.get("response_len")
    row["train_reward"], row["train_kl"] = last.get("reward/mean"), last.get("kl/mean")
    return row


def _plot(path: Path, rows: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]]) -> None:
    """Proxy and gold score against eval KL (a line per coefficient from the SFT point), and the
    proxy reward per PPO step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft, kl_label = rows[0], "KL(policy || SFT), nats"
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    panels = (
        (ax[0], "rm_reward", "Proxy (RM) reward vs KL", "mean RM score"),
        (ax[1], "gold_reward", "Gold score vs KL", "mean gold score"),
    )
    for i, coef in enumerate(sorted({r["coef"] for r in rows[1:]})):
        pts = [sft] + [r for r in rows[1:] if r["coef"] == coef]
        style = {"color": plt.cm.tab10(i % 10), "label": f"kl coef {coef:g}"}
        for a, key, _, _ in panels:
            xs, ys = [r["kl"] for r in pts], [r[key] for r in pts]
            if None in xs or None in ys:
                continue
            a.plot(xs, ys, marker="o", **style)
            a.annotate(
                f"step {pts[-1]['step']}",
                (xs[-1], ys[-1]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        curve = curves.get(_coef_name(coef), [])
        ax[2].plot([r["step"] for r in curve], [r["reward/mean"] for r in curve], **style)
    for a, key, title, ylabel in panels:
        if sft["kl"] is not None and sft[key] is not None:
            a.scatter([sft["kl"]], [sft[key]], color="k", zorder=3, label="SFT")
        a.set(title=f"{title}, held-out prompts", xlabel=kl_label, ylabel=ylabel)
    ax[2].set(title="Proxy reward during PPO (training samples)", xlabel="PPO step", ylabel="mean RM score")
    for a in ax:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_table(rows: list[dict[str, Any]]) -> None:
    def f(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)

    print("| kl coef | step | KL | RM reward | gold | win rate (gold) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        coef = "SFT" if r["coef"] is None else f"{r['coef']:g}"
        print(
            f"| {coef} | {r['step']} | {f(r['kl'])} | {f(r['rm_reward'])} | {f(r['gold_reward'])} | {f(r['win_rate_gold'])} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tritonrlhf.engine.demo.kl_sweep", description=__doc__.splitlines()[0]
    )
    ap.add_argument("run_dir", nargs="?", default="runs/demo", help="holds (or gets) sft/ and rm/")
    ap.add_argument("--coefs", default=",".join(f"{c:g}" for c in DEFAULT_COEFS), help="comma-separated")
    ap.add_argument("--size", choices=sorted(SIZES), default="demo", help="data and stage sizes")
    ap.add_argument("--steps", type=int, default=None, help="PPO steps per coefficient (default: the size's)")
    ap.add_argument(
        "--eval-every", type=int, default=None, help="also evaluate every K steps (0: final only)"
    )
    ap.add_argument("--world", type=int, default=1, help="ranks per stage (deepspeed --num_gpus N)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra PPO override")
    a = ap.parse_args(argv)
    coefs = tuple(float(c) for c in a.coefs.split(",") if c.strip())
    if not coefs or any(c < 0 for c in coefs):
        ap.error(f"--coefs must be non-negative numbers, got {a.coefs!r}")
    run_sweep(a.run_dir, coefs, a.size, a.steps, a.eval_every, a.world, a.seed, tuple(a.set))
    return 0


if __name__ == "__main__":
    sys.exit(main())
