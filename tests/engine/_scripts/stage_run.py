"""``python -m tritonrlhf.engine.cli`` with a pause inside one optimizer step, for the kill and signal tests.

Run: ``python tests/engine/_scripts/stage_run.py [--pause-at N --marker PATH --pause-s S] STAGE k=v ...``.
Everything from STAGE on goes to ``tritonrlhf.engine.cli.main`` unchanged, so the run takes the real CLI path.
With ``--pause-at N``, the N-th update of a ``TrainEngine`` touches ``PATH`` right after the update
-- before the step is logged or checkpointed -- then sleeps ``S`` seconds. SFT, RM and DPO have
one engine (DPO's frozen reference is none) and restore its counters on resume, so N is the run's
step N. PPO has two (the actor's update comes first) and one update each per step when a step's
samples make one mini-batch, so N is again step N of that process. Best-of-n has one engine and
``bon.steps_per_round`` updates a round, so N falls in round ceil(N / steps_per_round). A test SIGKILLs the process
group there (the step is lost), or sends SIGTERM (the step finishes, is saved, and the run exits
0). The pause changes timing only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tritonrlhf.engine import cli  # noqa: E402
from tritonrlhf.engine.rl.train_engine import TrainEngine  # noqa: E402


def pause_in_step(step: int, marker: Path, seconds: float) -> None:
    finish = TrainEngine.finish

    def finish_then_pause(self: TrainEngine) -> dict[str, float]:
        stats = finish(self)
        if self.steps == step:
            marker.touch()
            time.sleep(seconds)
        return stats

    TrainEngine.finish = finish_then_pause


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pause-at", type=int, default=0)
    ap.add_argument("--marker", type=Path)
    ap.add_argument("--pause-s", type=float, default=600.0)
    args, rest = ap.parse_known_args(argv)
    if args.pause_at:
        pause_in_step(args.pause_at, args.marker, args.pause_s)
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
