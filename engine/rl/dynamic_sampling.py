"""DAPO's dynamic sampling: keep only the groups whose rewards differ, and draw more prompts to fill.

A group (the ``n`` samples of one prompt) whose valid rewards are all equal has zero
group-relative advantage under GRPO, Dr. GRPO and RLOO: it adds nothing to the policy gradient
but dilutes the batch. ``GroupFilter`` sorts scored groups into kept and dropped; the trainer
draws further prompt batches while it is short, at most ``algo.dynamic_sampling.max_draws``
batches per step, and a batch still short after that is filled with dropped groups (counted in
``dynamic/padded_groups``), so the batch shape and the optimizer steps per batch never change.
The filter looks at the reward before DAPO's overlong penalty, as DAPO's recipe filters on
accuracy.
"""

from __future__ import annotations

import torch

from tritonrlhf.engine.rl.advantages import group_ids_for, informative_groups
from tritonrlhf.engine.rl.rollout import Sample


class GroupFilter:
    """Collects ``groups_needed`` groups of ``n`` scored samples for one step (module docstring)."""

    def __init__(self, groups_needed: int, n: int) -> None:
        if groups_needed < 1 or n < 2:
            raise ValueError(f"GroupFilter needs groups_needed >= 1 and n >= 2, got {groups_needed}, {n}")
        self.needed, self.n = groups_needed, n
        self.kept: list[list[Sample]] = []
        self.dropped: list[list[Sample]] = []
        self.draws = 0

    @property
    def short(self) -> bool:
        return len(self.kept) < self.needed

    def add(self, samples: list[Sample]) -> None:
        """One draw's samples, prompt-major, each with ``score`` and ``score_valid`` set (may be empty)."""
        self.draws += 1
        if not samples:
            return
        if len(samples) % self.n or any(s.score is None for s in samples):
            raise ValueError(f"GroupFilter.add needs scored samples in whole groups of {self.n}")
        scores = torch.tensor([float(s.score) for s in samples], dtype=torch.float64)
        valid = torch.tensor([bool(s.score_valid) for s in samples])
        keep = informative_groups(scores, group_ids_for(0, len(samples), self.n), valid)
        for g in range(len(samples) // self.n):
            group = samples[g * self.n : (g + 1) * self.n]
            (self.kept if bool(keep[g * self.n]) else self.dropped).append(group)

    def take(self) -> tuple[list[Sample], dict[str, float]]:
        """The step's ``groups_needed * n`` samples (kept groups first, then padding) and the counts."""
        kept = self.kept[: self.needed]
        pad = self.dropped[: self.needed - len(kept)]
        if len(kept) + len(pad) < self.needed:
            raise RuntimeError(
                f"dynamic sampling: {len(kept) + len(pad)} groups after {self.draws} draws, need {self.needed}"
            )
        stats = {
            "dynamic/draws_max": float(self.draws),
            "dynamic/kept_groups": float(len(self.kept)),
            "dynamic/dropped_groups": float(len(self.dropped)),
            "dynamic/padded_groups": float(len(pad)),
        }
        return [s for g in kept + pad for s in g], stats
