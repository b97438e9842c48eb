"""Reward functions the reward tests name as ``module:function`` (a worker pool imports them)."""

from __future__ import annotations

import math
import time


def answer_match(prompts, responses, answer):
    """1 where the response equals the record's answer, 0 otherwise."""
    return [float(r.strip() == str(a)) for r, a in zip(responses, answer)]


def length(prompts, responses, **kwargs):
    """The response's length; None for an empty one (this function does not apply there)."""
    return [len(r) if r else None for r in responses]


def sees_everything(prompts, responses, **kwargs):
    """Records which keywords arrived (as the score: how many)."""
    return [float(len(kwargs))] * len(prompts)


def sleepy(prompts, responses, **kwargs):
    time.sleep(30)
    return [1.0] * len(prompts)


def broken(prompts, responses):
    raise RuntimeError("reward service exploded")


def too_few(prompts, responses):
    return [1.0]


def with_info(prompts, responses, answer):
    from tritonrlhf.engine.rewards import RewardBatch

    scores = [float(r == a) for r, a in zip(responses, answer)]
    return RewardBatch(
        scores, [None if s else {"expected": a, "got": r} for s, r, a in zip(scores, responses, answer)]
    )


def nan_for_all(prompts, responses):
    return [math.nan] * len(prompts)


def char_mean(prompts, responses):
    """The mean character code of each response / 128 (0 when empty): a gold that tells any two
    different answers apart, where the toy reward scores most random answers 0 alike."""
    return [sum(map(ord, r)) / (128 * len(r)) if r else 0.0 for r in responses]
