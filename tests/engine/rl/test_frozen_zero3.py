"""placement.frozen_zero_stage=3: the reference and reward partitioned over the ranks score as whole copies do."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine._scripts.launch import run_two_rank_script
from tritonrlhf.engine.config import ConfigError, PPOConfig, load_config

SCRIPTS = Path(__file__).resolve().parents[1] / "_scripts"


def test_frozen_zero_stage_is_checked() -> None:
    with pytest.raises(ConfigError, match="placement.frozen_zero_stage must be one of \\[0, 3\\]"):
        load_config(PPOConfig, None, ["placement.frozen_zero_stage=2"]).validate()
    with pytest.raises(ConfigError, match="split placement keeps them whole"):
        load_config(
            PPOConfig,
            None,
            ["placement.frozen_zero_stage=3", "placement.mode=split", "placement.rollout_ranks=1"],
        ).validate(2)
    with pytest.raises(ConfigError, match="algo.dynamic_sampling draws a different number per rank"):
        load_config(
            PPOConfig,
            None,
            [
                "placement.frozen_zero_stage=3",
                "algo.advantage=grpo",
                "ppo.samples_per_prompt=4",
                "algo.dynamic_sampling.enabled=true",
            ],  # fmt: skip
        ).validate()
    load_config(PPOConfig, None, ["placement.frozen_zero_stage=3"]).validate()


@pytest.mark.slow
def test_partitioned_reference_and_reward_score_as_whole_copies(tmp_path: Path) -> None:
    r0, r1 = run_two_rank_script(SCRIPTS / "frozen_zero3.py", tmp_path)
    for r in (r0, r1):
        assert r["ref_max_diff"] < 1e-5 and r["rm_max_diff"] < 1e-5, r
        # Each rank holds about half of each frozen model (ZeRO-3 pads shards to equal sizes).
        for whole, part in (r["ref_elements"], r["rm_elements"]):
            assert 0.45 * whole < part < 0.55 * whole, r
    assert r0["ref_logp_mean"] != r1["ref_logp_mean"]  # the ranks scored different batches
