"""SFT, RM, DPO or best-of-n run uninterrupted, and again cut by SIGKILL and SIGTERM, for the resume tests.

``kill_and_resume`` launches, through ``stage_run.py`` (the real CLI plus a pause hook):

* A: ``total_steps`` steps, uninterrupted;
* B1: the same, checkpointing every step, SIGKILLed (the whole process group) inside update ``kill_in``
  (``stage_run.py``'s pause: step ``kill_in`` except in best-of-n, where it counts SFT updates);
* B2: ``resume=auto`` in B1's folder; with ``term_in``, SIGTERM inside that update (it must save and exit 0);
* B3 (with ``term_in`` only): ``resume=auto`` again, to the end.

A runs beside B1 to save wall time. The tests compare A's and B's ``metrics.jsonl`` and final weights.
Used by ``tests/engine/stages/test_sft.py``, ``test_rm.py``, ``test_dpo.py`` and ``test_bon.py``.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tests.engine._scripts.launch import Launch

STAGE_RUN = Path(__file__).resolve().parent / "stage_run.py"


@dataclass
class KillResume:
    a: Path  # the uninterrupted run's output_dir
    b: Path  # the interrupted run's
    logged_when_killed: list[int] = field(default_factory=list)  # steps in B's metrics.jsonl after the kill
    checkpoints_when_killed: list[str] = field(default_factory=list)
    state_when_killed: dict[str, Any] = field(default_factory=dict)  # the newest checkpoint's loop state
    rc: dict[str, int] = field(default_factory=dict)  # launch name -> exit status
    output: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _launch(
    stage: str, out: Path, args: list[str], name: str, pause_at: int = 0, pause_s: float = 600
) -> Launch:
    cmd = [sys.executable, str(STAGE_RUN)]
    if pause_at:
        cmd += ["--pause-at", str(pause_at), "--marker", str(_marker(out, name)), "--pause-s", str(pause_s)]
    cmd += [stage, f"output_dir={out}", *args]
    return Launch(cmd, out.parent / f"{name}.log", OMP_NUM_THREADS="1")


def _marker(out: Path, name: str) -> Path:
    return out.parent / f"{name}.paused"


def _finish(runs: KillResume, name: str, launch: Launch, timeout_s: float) -> None:
    runs.rc[name] = launch.wait(timeout_s)
    runs.output[name] = launch.output
    runs.seconds[name] = launch.seconds
    print(f"{name}: exit {runs.rc[name]} after {runs.seconds[name]:.0f}s")


def kill_and_resume(
    stage: str,
    root: Path,
    args: list[str],
    total_steps: int,
    kill_in: int,
    term_in: int = 0,
    timeout_s: float = 240,
) -> KillResume:
    """Run A and B1-B3 under ``root`` (see the module docstring); ``args`` are the dotted overrides."""
    runs = KillResume(root / "a", root / "b")
    common = [*args, f"total_steps={total_steps}"]
    every = ["save_every=1", "keep_last=2"]
    started: list[Launch] = []

    def launch(name: str, extra: list[str], pause_at: int = 0, pause_s: float = 600) -> Launch:
        out = runs.a if name == "a" else runs.b
        started.append(_launch(stage, out, [*common, *extra], name, pause_at, pause_s))
        return started[-1]

    try:
        a = launch("a", [])
        b1 = launch("b1", every, pause_at=kill_in)
        b1.wait_for(_marker(runs.b, "b1"), timeout_s)
        b1.kill_group()
        _finish(runs, "b1", b1, 10)
        runs.logged_when_killed = sorted(metrics(runs.b))
        ckpts = sorted((runs.b / "checkpoints").iterdir())
        runs.checkpoints_when_killed = [p.name for p in ckpts]
        runs.state_when_killed = torch.load(ckpts[-1] / "rank_0.pt", weights_only=False)["state"]

        b2 = launch("b2", [*every, "resume=auto"], pause_at=term_in, pause_s=3)
        if term_in:
            b2.wait_for(_marker(runs.b, "b2"), timeout_s)
            b2.send(signal.SIGTERM)
        _finish(runs, "b2", b2, timeout_s)
        if term_in:
            _finish(runs, "b3", launch("b3", [*every, "resume=auto"]), timeout_s)
        _finish(runs, "a", a, timeout_s)
    finally:
        for run in started:
            if run.proc.poll() is None:
                run.kill_group()
    return runs


def metrics(out: Path) -> dict[int, dict[str, Any]]:
    """``metrics.jsonl`` by step; a step logged twice is an error."""
    path = out / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice in {path}: {steps}"
    return {r["step"]: r for r in rows}


def metric_diffs(
    a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], keys: tuple[str, ...], tol: float = 1e-6
) -> dict[tuple[int, str], tuple[Any, Any]]:
    """``{(step, key): (a's value, b's value)}`` where the two runs' logged values differ by more than ``tol``."""
    return {
        (step, k): (a[step].get(k), b[step].get(k))
        for step in sorted(set(a) | set(b))
        for k in keys
        if (k in a.get(step, {})) != (k in b.get(step, {}))
        or abs(a.get(step, {}).get(k, 0.0) - b.get(step, {}).get(k, 0.0)) > tol
    }


def hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {hf_dir}"
    return out


def max_weight_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between two HF exports with the same tensors."""
    wa, wb = hf_weights(a), hf_weights(b)
    assert sorted(wa) == sorted(wb)
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
