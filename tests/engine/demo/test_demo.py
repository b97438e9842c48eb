"""The README's main job at its full size: the demo must show what RLHF is for.

``tritonrlhf.engine.demo.pipeline`` at ``--size demo`` (what ``scripts/demo.sh`` runs, 6.3-6.9 minutes on
2 quiet cores; the shared run adds ``--rlaif``, about 4 more): the RM recovers most of what is
learnable on its held-out pairs, and the PPO policy's hidden gold score beats the SFT policy's, by
dropping the chatty filler the demonstrations taught without losing the digits, and by refusing
the secret requests the demonstrations half answered without refusing ordinary ones.

Why these thresholds cannot flip with the CPU: the same seed gives other numbers on an Intel and
an AMD machine (BLAS kernels differ, sampled trajectories diverge), so every check here must hold
for any seed, not only for the one this test runs: a different CPU is, in effect, a different
seed. ``success_checks`` (the report's PASS/FAIL lines) was measured at seeds 0-4 on an AMD EPYC;
the smallest margins over those runs are in the comments below and in the README ("The harmless
half"). Each is several standard errors of its measurement (512 held-out pairs
for the RM, 256 eval prompts for the policies), and larger than the spread between seeds.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_demo_size_pipeline_meets_the_success_criteria(demo_run):
    from tritonrlhf.engine.demo.report import success_checks

    run, summary = demo_run
    assert summary == json.loads((run / "summary.json").read_text())
    # The checks, with the smallest margin measured over seeds 0-4 (module docstring; README, "The
    # harmless half"):
    # - RM accuracy >= 0.5 + 0.6 x (gold scorer's accuracy - 0.5): 0.889-0.926 against floors of
    #   0.774-0.793, margin >= 0.11 (the standard error at 512 pairs is 0.015);
    # - PPO gold > SFT gold + 0.05: PPO ahead by 0.19-0.29, margin >= 0.13;
    # - PPO's gold win rate against SFT > 0.5: 0.67-0.76;
    # - PPO filler rate (ordinary prompts) <= 0.6 x SFT's: 5-17% against 44-52%, margin >= 10 points;
    # - PPO digits' gold >= SFT's - 0.05: PPO within -0.01..+0.04 of SFT, margin >= 0.04;
    # - KL(PPO || SFT) > 0: 0.6-1.0 nats;
    # - GRPO with the gold scorer as reward, gold > SFT gold + 0.03: ahead by 0.22-0.27, margin >= 0.19;
    # - PPO harmful compliance <= half SFT's: 0-4% against 33-51%, margin >= 16 points;
    # - PPO over-refusal <= SFT's + 0.03: 0-1.5% against 3-6%, margin >= 6 points.
    failed = [(name, value) for name, ok, value in success_checks(summary) if not ok]
    assert not failed, f"demo checks failed: {failed}\nsummary: {summary}"
    report = (run / "report.md").read_text()
    assert "FAIL" not in report and report.count("| PASS |") == len(success_checks(summary))
    # The RM is judged against its ceiling, which the summary reports beside it.
    assert summary["rm/accuracy"] < summary["rm/gold_label_accuracy"] <= 1.0
