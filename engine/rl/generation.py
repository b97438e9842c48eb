"""The generate phase of ``PPOTrainer``: draw prompts, sample groups, deal them out to the ranks.

``colocate``: each rank samples its share of the batch with its own engine. ``split``: trainer 0
keeps ``async.max_staleness + 1`` batches requested from the rollout ranks, collects batch k and
deals it to the trainer ranks in contiguous slices (whole groups: ``rollout_batch_size`` is a
multiple of the trainer world). With ``algo.dynamic_sampling`` the groups whose rewards are all
equal are dropped and more prompt batches drawn (``tritonrlhf.engine.rl.dynamic_sampling``): in colocate
every rank draws each batch together (its own share), so the sampler stays in step; in split
trainer 0 requests the top-up batches at once (ids -1, -2, ...).

A mixin: these methods use the trainer's sampler, rollout engine(s), reward scorer and state.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tritonrlhf.engine import distributed as dist
from tritonrlhf.engine.data import PromptBatch
from tritonrlhf.engine.rl.experience import RolloutBatch, collate_samples


def with_columns(groups: list[list], columns: list[dict[str, Any]]) -> list:
    """The samples of ``groups`` (one list per prompt), prompt-major, each given its prompt's
    record columns (``Sample.columns``): a group's samples share them."""
    out = []
    for group, cols in zip(groups, columns or [{}] * len(groups)):
        for smp in group:
            smp.columns = dict(cols) if cols else None
            out.append(smp)
    return out


def rollout_seed_stream(seed: int) -> torch.Generator:
    """The stream the rollout seeds of successive batches are drawn from (``PPOTrainer._gen``,
    checkpointed): seeded by the run's seed alone, so it is the same on every rank."""
    return torch.Generator().manual_seed(seed)


class GenerateMixin:
    """``generate()`` and its helpers, for ``tritonrlhf.engine.rl.trainer.PPOTrainer``."""

    def _draw_batch(self) -> tuple[PromptBatch, int]:
        """The next batch of prompts (this rank's share, with their records' columns) and the seed of
        its first request.

        Request j of the global batch (prompt-major, ``samples_per_prompt`` per prompt) samples
        with seed ``base + j`` (``share_seed``), ``base`` drawn from the run's seed stream (the
        same on every rank): the same seed samples the same rollout on any number of ranks,
        colocate or split."""
        from tritonrlhf.engine.rl.rollout import share_seed

        prompts = self.dataset.batch(self.sampler.next_batch())
        base = int(torch.randint(0, 2**31 - 1, (1,), generator=self._gen))
        n = self.cfg.ppo.samples_per_prompt
        return prompts, share_seed(base, self.sampler.rank, len(prompts.input_ids), n)

    def _sample(self, prompts: PromptBatch, n: int, seed: int) -> list:
        """Colocate: ``n`` samples of each prompt from this rank's engine, prompt-major, each carrying
        its record's columns (for the reward functions)."""
        groups = self.rollout.generate(prompts.input_ids, n=n, seed=seed)
        return with_columns(groups, prompts.columns)

    def _scored(self, samples: list) -> list:
        """The samples with rewards set (those scored beside the rollout engine already are)."""
        if any(smp.score is None for smp in samples):
            self.reward.score_samples(samples, self.tokenizer)
        return samples

    def _filled(self, samples: list, groups: int, more) -> tuple[list, dict[str, float]]:
        """Dynamic sampling (``tritonrlhf.engine.rl.dynamic_sampling``): keep informative groups of ``samples``
        and call ``more()`` for another draw's samples while short, up to ``max_draws`` draws."""
        from tritonrlhf.engine.rl.dynamic_sampling import GroupFilter

        filt = GroupFilter(groups, self.cfg.ppo.samples_per_prompt)
        filt.add(self._scored(samples))
        while filt.draws < self.cfg.algo.dynamic_sampling.max_draws and self._still_short(filt.short):
            filt.add(more(filt.short))
        return filt.take()

    def _more_local(self, short: bool) -> list:
        """Colocate: the next prompt batch's samples, scored (drawn but not generated when not ``short``)."""
        prompts, seed = self._draw_batch()
        return self._scored(self._sample(prompts, self.cfg.ppo.samples_per_prompt, seed)) if short else []

    def _more_remote(self, events: list[dict[str, Any]]) -> list:
        """Split, trainer 0: one more prompt batch from the rollout ranks, now (negative batch ids)."""
        self.extra_requests -= 1
        prompts, seed = self._draw_batch()
        self.rollout.request(self.extra_requests, prompts, self.cfg.ppo.samples_per_prompt, seed)
        samples, more = self.rollout.collect(self.extra_requests)
        events += more
        return self._scored(samples)

    def _still_short(self, short: bool) -> bool:
        """Colocate: another draw while any rank is short (all ranks draw together); split: trainer 0's."""
        return short if self.split else dist.all_reduce_max(float(short)) > 0

    def generate(self) -> tuple[RolloutBatch, list[dict[str, Any]], dict[str, float]]:
        """This rank's share of batch ``step_idx``, collated, the rollout timeline events, and the
        dynamic-sampling counts (``algo.dynamic_sampling``; empty when it is off)."""
        n = self.cfg.ppo.samples_per_prompt
        dynamic = self.cfg.algo.dynamic_sampling.enabled
        ds: dict[str, float] = {}
        if not self.split:
            t0 = time.time()
            prompts, seed = self._draw_batch()
            samples = self._sample(prompts, n, seed)
            if dynamic:  # a full rank keeps drawing its share of each batch (the sampler stays in step)
                samples, ds = self._filled(samples, self.samples_per_rank // n, self._more_local)
            events = [
                {"role": "rollout0", "phase": "generate", "t0": t0, "t1": time.time(), "tag": self.step_idx}
            ]
            self.rollout.sleep()
            return collate_samples(samples, self.tokenizer, self.pad_id), events, ds
        k, samples, events = self.step_idx, None, []
        if self.placement.is_coordinator:
            # Keep batches k .. k+s requested: the rollout ranks generate them while we train.
            while self.requested <= k + self.cfg.async_.max_staleness:
                j = self.requested
                prompts, seed = self.pending[j] = self.pending.get(j) or self._draw_batch()
                self.rollout.request(j, prompts, n, seed)
                self.requested += 1
            samples, events = self.rollout.collect(k)
            del self.pending[k]
            if dynamic:
                samples, ds = self._filled(
                    samples, self.cfg.ppo.rollout_batch_size, lambda _: self._more_remote(events)
                )
        if self.world > 1:
            samples, ds = dist.broadcast_object((samples, ds))
            samples = samples[self.rank * self.samples_per_rank : (self.rank + 1) * self.samples_per_rank]
            if self.rank and ds:  # the counts are trainer 0's for the whole batch: count them once
                ds = {key: v if key == "dynamic/draws_max" else 0.0 for key, v in ds.items()}
        return collate_samples(samples, self.tokenizer, self.pad_id), events, ds
