"""AI feedback in the demo (``--rlaif``): a teacher judge, its labels, and an RM trained on them.

The teacher is a model of the policy's size trained (by the SFT stage) to answer a judging prompt
with the letter of the better answer, where "better" is the gold scorer's verdict on pairs of
its own (``make_judge_data``): it has seen the task's correct and safe answers, and no label
noise, so its labels mean something, but it has no more capacity than the student. The ``label``
stage asks it about every preference pair of the demo (``tritonrlhf.engine.stages.label``: P("a") against
P("b"), both orders averaged, one principle of ``configs/constitution_demo.yaml`` quoted per
pair), and the ``rm`` stage trains a second RM on those AI labels with the first RM's recipe.
Both RMs are judged by gold on their held-out pairs (``eval/accuracy_vs_gold``), and the AI
labels' agreement with gold sits beside the human-style labels' (1 - their Bradley-Terry flip
rate).
"""

from __future__ import annotations

import random
from typing import Any

from tritonrlhf.engine.demo.task import CHATTY_RATE, DEMO_SAFETY, SafetyMix, make_preference_data

# The judging prompt the teacher learns and the label stage renders: short, because a
# character-level judge pays for every character of it. One principle per pair
# (``principles_per_pair=1``), as Constitutional AI samples one per comparison.
JUDGE_TEMPLATE = "{principles}\n{prompt} a: {response_a} b: {response_b} better:"
CHOICES = ("a", "b")


def render_judging_prompt(principle: str, prompt: str, first: str, second: str) -> str:
    """``JUDGE_TEMPLATE`` as the label stage renders it with one principle quoted."""
    return JUDGE_TEMPLATE.format(
        principles=f"- {principle}", prompt=prompt, response_a=first, response_b=second
    )


def make_judge_data(
    n: int,
    seed: int,
    principles: list[str],
    safety: SafetyMix = DEMO_SAFETY,
    chatty_rate: float = CHATTY_RATE,
) -> list[dict[str, Any]]:
    """``n`` judging demonstrations ``{"prompt", "response"}`` for the teacher's SFT.

    The pairs are the demo's kind of candidate pairs (``make_preference_data`` with ``seed``; use
    one the demo's own pairs do not), labelled by gold rather than by a noisy labeller: the
    response is the letter of the answer with the higher gold score, shown first or second at
    random, under a principle drawn at random.
    """
    if not principles:
        raise ValueError("make_judge_data: need at least one principle")
    rng = random.Random(f"judge-{seed}")
    out = []
    for r in make_preference_data(n, seed, chatty_rate=chatty_rate, safety=safety):
        better, worse = (r["chosen"], r["rejected"])
        if r["gold_chosen"] < r["gold_rejected"]:
            better, worse = worse, better
        first_is_better = rng.random() < 0.5
        first, second = (better, worse) if first_is_better else (worse, better)
        text = render_judging_prompt(rng.choice(principles), r["prompt"], first, second)
        out.append({"prompt": text, "response": CHOICES[0] if first_is_better else CHOICES[1]})
    return out
