"""Run several ``tritonrlhf.engine.cli ppo`` command lines that must fail, in one process, and report each.

Run: ``python tests/engine/_scripts/ppo_errors.py CASES.json RESULT.json`` where CASES.json maps a
case name to its argv (``["ppo", "--config", F, "k=v", ...]``). For each case, in order, this calls
``tritonrlhf.engine.cli.main`` -- the function ``python -m tritonrlhf.engine.cli`` exits with -- and records its return
code, what it printed on stderr, how long it took, and whether vLLM had been imported by then (it
is imported only to build the rollout engine, so an error raised before that is an error raised
before any rollout). One process serves every case: torch.distributed and the heavy imports are
paid once. Used by ``tests/engine/rl/test_ppo_inputs.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tritonrlhf.engine import cli  # noqa: E402


def main(cases_file: str, result_file: str) -> None:
    cases = json.loads(Path(cases_file).read_text())
    results = {}
    for name, argv in cases.items():
        err = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(err):
            try:
                rc = cli.main(argv)
            except BaseException:  # noqa: BLE001 - an uncaught error is a test failure, not a crash here
                traceback.print_exc()
                rc = -1
        results[name] = {
            "rc": rc,
            "stderr": err.getvalue(),
            "seconds": time.perf_counter() - t0,
            "vllm_imported": "vllm" in sys.modules,
        }
    Path(result_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
