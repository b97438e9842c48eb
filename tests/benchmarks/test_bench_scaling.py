"""The scaling benchmark's bookkeeping: one dimension at a time around the base point, and the plot.

The runs themselves go through ``bench_ppo.measure`` (the slow path, covered by the PPO tests);
here synthetic rows stand in for them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.bench_scaling import BASE, plot, points


def test_points_vary_one_dimension_and_run_the_base_once() -> None:
    args = argparse.Namespace(
        dims=["prompts", "tokens", "model"],
        prompts=[8, 16, 32],
        max_new_tokens=[32, 64, 128],
        models=["tiny", "small", "medium"],
    )
    got = points(args)
    assert len(got) == 7 and got.count(BASE) == 1
    for p in got:
        assert sum(p[k] != BASE[k] for k in BASE) <= 1
    assert {"prompts": 16, "max_new_tokens": 128, "model": "small"} in got


def test_plot_draws_each_dimension(tmp_path: Path) -> None:
    params = {"tiny": 412288, "small": 3_200_000, "medium": 10_700_000}
    rows = []
    for mode in ("colocate", "split-async"):
        for p in points(
            argparse.Namespace(
                dims=["prompts", "model"], prompts=[8, 16], max_new_tokens=[], models=["tiny", "small"]
            )
        ):
            rate = p["prompts"] / (1 + (p["model"] == "small"))
            rows.append(
                {**p, "mode": mode, "device": "test", "model_params": params[p["model"]]}
                | {"samples_per_s": f"{rate}", "tokens_per_s": f"{40 * rate}"}
            )
    out = tmp_path / "scaling.png"
    plot(rows, ["prompts", "model"], out)
    assert out.stat().st_size > 5000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
