"""Two end-to-end PPO runs (real vLLM and DeepSpeed), each launched once per session and read by
tests in two files, instead of a near-identical launch in each: a launch is mostly start-up (about
25-40 s for one rank, 50 s for two on a 2-core machine; a tiny step takes 0.2-4 s).

* ``ppo_two_ranks_zero2``: ``test_ppo_e2e``'s 2-rank ZeRO-2 case, and the padded run that
  ``test_packing`` compares its packed one against;
* ``ppo_one_update_zero3``: ``test_ppo_e2e``'s 1-rank ZeRO-3 case, and the fused run (values and
  old log-probs from the update's own forwards) that ``test_fused_update`` compares its separate
  scoring passes against.

Their overrides are ``ppo_launch.TWO_RANKS_ZERO2`` and ``ppo_launch.ONE_UPDATE_ZERO3``.
"""

from __future__ import annotations

import pytest

from tests.engine._scripts.ppo_launch import (
    ONE_UPDATE_ZERO3,
    TWO_RANKS_ZERO2,
    PPORun,
    launch,
    require,
)


@pytest.fixture(scope="session")
def ppo_two_ranks_zero2(tmp_path_factory) -> PPORun:
    require("vllm", "deepspeed")
    run = launch(tmp_path_factory.mktemp("ppo_2rank_zero2"), TWO_RANKS_ZERO2, ranks=2, timeout_s=480)
    print(f"2-rank ZeRO-2 run: {run.wall_s:.0f}s")
    run.check()
    return run


@pytest.fixture(scope="session")
def ppo_one_update_zero3(tmp_path_factory) -> PPORun:
    require("vllm", "deepspeed")
    run = launch(tmp_path_factory.mktemp("ppo_1rank_zero3"), ONE_UPDATE_ZERO3, ranks=1, timeout_s=480)
    print(f"1-rank ZeRO-3 one-update run: {run.wall_s:.0f}s")
    run.check()
    return run
