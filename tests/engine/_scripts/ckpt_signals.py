"""GracefulShutdown without training: prints "ready", then runs 0.1 s "steps" until stopped.

Run: ``python tests/engine/_scripts/ckpt_signals.py STEP_SECONDS``. On the first signal it
finishes the current step, prints ``stopped after step N`` and exits 0; a second signal
during a long step must end the process at once.
"""

from __future__ import annotations

import sys
import time

from tritonrlhf.engine.checkpoint import GracefulShutdown

step_seconds = float(sys.argv[1])
with GracefulShutdown() as stop:
    print("ready", flush=True)
    step = 0
    while not stop.should_stop:
        step += 1
        time.sleep(step_seconds)
    print(f"stopped after step {step}", flush=True)
sys.exit(0)
