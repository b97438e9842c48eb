"""Reward functions the HTTP tests serve (``--function tests/engine/_scripts/reward_fns.py:echo_reward``)."""

from __future__ import annotations

import time

from tritonrlhf.engine.rewards import RewardBatch


def echo_reward(prompts, responses, answer, finish_reasons=None):
    """len(response), +100 where it equals its answer; None for "invalid"; "slow" sleeps 30 s (killed mid-request)."""
    reasons = finish_reasons or [None] * len(prompts)
    if "slow" in responses:
        print("[echo_reward] slow sample: sleeping", flush=True)  # the test kills the server now
        time.sleep(30)
    scores = [None if r == "invalid" else len(r) + (100 if r == a else 0) for r, a in zip(responses, answer)]
    info = [{"prompt": p, "answer": a, "finish": f} for p, a, f in zip(prompts, answer, reasons)]
    return RewardBatch(scores, info)
