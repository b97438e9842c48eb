"""A small training loop with checkpoints, for the kill -9 and SIGTERM tests.

Run: ``python tests/engine/_scripts/ckpt_worker.py --out DIR [--engine torch|deepspeed] [--resume auto]
[--hang-export-at N]``. ``--engine torch`` (default) trains a small MLP through
``ckpt_common.TorchEngine`` and starts in seconds; ``deepspeed`` trains the tiny Llama under ZeRO-2.
Each finished step appends ``{"step", "digest", "loss"}`` to ``DIR/progress.jsonl``
(the digest is taken after the step's update). With ``--hang-export-at N`` the HF export
of step N's checkpoint touches ``DIR/exporting`` and then sleeps, so the test can
kill -9 the process in the middle of a save. SIGTERM makes the loop finish its step,
save, print the stop message and exit 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tests.engine._scripts.ckpt_common import (
    build_engine,
    build_torch_engine,
    param_digest,
    torch_train_step,
    train_step,
)
from tritonrlhf.engine.checkpoint import CheckpointManager, GracefulShutdown, hf_exporter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", default="never")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--step-seconds", type=float, default=0.2)
    ap.add_argument("--hang-export-at", type=int, default=-1)
    ap.add_argument("--engine", choices=("torch", "deepspeed"), default="torch")
    args = ap.parse_args()
    out = Path(args.out)
    if args.engine == "deepspeed":
        engine, tok = build_engine(zero_stage=2)
        export = hf_exporter(engine.module, tok)
        step_fn = train_step
    else:
        engine, step_fn = build_torch_engine(), torch_train_step

        def export(p: Path) -> None:
            p.mkdir()
            torch.save(engine.module.state_dict(), p / "model.pt")

    mgr = CheckpointManager(out, keep_last=3)
    start = 0
    path = mgr.resolve(args.resume)
    if path is not None:
        start = mgr.load(path, {"actor": engine})["step"]
        print(f"resumed from {path} at step {start}", flush=True)

    def hanging_export(p: Path) -> None:
        export(p)
        (out / "exporting").touch()
        time.sleep(120)

    with GracefulShutdown() as stop:
        for step in range(start + 1, args.steps + 1):
            loss = step_fn(engine)
            time.sleep(args.step_seconds)  # the "rest of the step" a signal may land in
            with open(out / "progress.jsonl", "a") as f:
                f.write(
                    json.dumps({"step": step, "digest": param_digest(engine.module), "loss": loss}) + "\n"
                )
            stopping = stop.should_stop_all()
            if stopping or (args.save_every and step % args.save_every == 0):
                fn = hanging_export if step == args.hang_export_at else export
                saved = mgr.save(step, {"actor": engine}, {"step": step}, fn, policy_version=step)
                if stopping:
                    print(stop.stop_message(step, saved), flush=True)
                    sys.exit(0)


if __name__ == "__main__":
    main()
