"""``python -m tritonrlhf.engine.cli ppo`` with every actor update non-finite: the PPO policy loss is NaN.

Run: ``tests/engine/_scripts/ppo_poisoned.py ppo --config F k=v ...``. The arguments go to
``tritonrlhf.engine.cli.main`` unchanged, so the run takes the real CLI path (config loading, ``run_ppo``,
exit status). The only change: ``kernels.ppo_policy_loss``, which ``tritonrlhf.engine.rl.actor`` looks up at
call time, returns its loss times NaN, so the actor's non-finite guard skips every update while
the critic trains normally. Used by ``tests/engine/rl/test_ppo_inputs.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tritonrlhf import kernels  # noqa: E402
from tritonrlhf.engine import cli  # noqa: E402

_real_policy_loss = kernels.ppo_policy_loss


def poisoned_policy_loss(*args, **kwargs):
    """``kernels.ppo_policy_loss`` with a NaN loss (still attached to the graph); stats unchanged."""
    loss, stats = _real_policy_loss(*args, **kwargs)
    return loss * float("nan"), stats


def main(argv: list[str]) -> int:
    kernels.ppo_policy_loss = poisoned_policy_loss
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
