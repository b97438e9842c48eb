"""Scoring one rollout into an ``Experience`` and updating on it: ``PPOTrainer.make_experience``
and ``PPOTrainer.train``.

Old and reference log-probs, values (GAE only), rewards with the truncation and overlong terms,
reward normalisation, the KL to the reference in the reward (``ppo.kl.placement=reward``), the
advantages of the chosen estimator, staleness refusal and truncated importance weights; then the
actor (and critic) updates over mini-batches, or the one fused update (``train_fused``) whose
forwards supply the old log-probs and values. A mixin of ``PPOTrainer``
(``engine/rl/trainer.py``), which owns the roles it reads.
"""

from __future__ import annotations

import time

import torch

from tritonrlhf import kernels
from tritonrlhf.engine import distributed as dist
from tritonrlhf.engine.metrics import PhaseTimes
from tritonrlhf.engine.rl.experience import RolloutBatch
from tritonrlhf.engine.rl.scoring import part_means


class ExperienceMixin:
    """``make_experience``, ``advantages_for``, ``train`` / ``train_fused``, ``logprob_stats`` and
    ``sample_rows`` for ``PPOTrainer``."""

    @torch.no_grad()
    def make_experience(self, rb: RolloutBatch):
        """Score a rollout: old/ref log-probs, values (GAE only), rewards, advantages. Returns (exp, stats).

        Samples more than ``async.max_staleness`` versions old are refused (they carry no loss).
        ``old_logprobs`` are the trainer's recomputation; with ``async.tis_cap`` the advantages are
        scaled by the truncated importance weights ``min(pi_old / pi_rollout, C)`` toward the
        behaviour policy (the rollout engine's processed log-probs, which include temperature,
        top-k/top-p truncation and banned text, so those are corrected rather than ignored).
        """
        from tritonrlhf.engine.rl.advantages import overlong_penalty
        from tritonrlhf.engine.rl.experience import Experience, truncation_terms

        p, algo = self.cfg.ppo, self.cfg.algo
        exp = Experience(
            rb.sequences,
            rb.attention_mask,
            rb.action_mask,
            rollout_logprobs=rb.rollout_logprobs,
            kept_logmass=rb.kept_logmass,
            trunc_logmass=rb.trunc_logmass,
        )
        exp.policy_version = int(rb.versions.min())
        entropy = None
        timed = PhaseTimes()  # each pass this rank runs (time/score/*_s)
        score_args = (
            rb.prompts,
            rb.responses,
            rb.sequences,
            rb.attention_mask,
            rb.finish_reasons,
            rb.columns,
        )
        # Reward functions in a worker pool (or behind HTTP) score while the forwards below run.
        pending = self.reward.submit(*score_args) if rb.scores is None and self.reward.in_background else None
        if not self.old_from_update:  # else train() takes them from the update's forward
            with timed("time/score/old_logprobs_s"):
                exp.old_logprobs, entropy = self.actor.logprobs(exp)
        if not p.kl.needs_reference:  # KL off and not logged: no reference, no reference forward
            exp.ref_logprobs = None
        elif rb.ref_logprobs is not None:  # scored beside the rollout engine
            exp.ref_logprobs = rb.ref_logprobs.to(exp.sequences.device, torch.float32)
        else:
            with timed("time/score/ref_s"):
                exp.ref_logprobs = self.ref.logprobs(exp, self.cfg.rollout.temperature).float()
        if rb.scores is not None:  # scored beside the rollout engine, or for dynamic sampling
            raw, valid = rb.scores, rb.score_valid
            reward_stats = part_means(rb.reward_parts)
        else:
            with timed("time/score/reward_s"):  # with a pool: only the wait left after the forwards
                scored = (pending or self.reward.submit(*score_args)).result()
            raw, valid = scored.scores, scored.valid
            rb.reward_parts, rb.reward_info = scored.parts, scored.info
            reward_stats = scored.stats()
        raw = raw.float()
        rb.scores, rb.score_valid = raw, valid  # the raw scores, for the samples log (sample_rows)
        self.invalid_rewards += int((~valid).sum())
        # Invalid (non-finite / missing) rewards and over-stale samples stay in the batch shape but
        # carry no loss.
        staleness = self.version - rb.versions
        fresh = staleness <= self.cfg.async_.max_staleness
        truncated = rb.truncated
        eos_penalty, trained = truncation_terms(
            truncated, self.cfg.reward.missing_eos_penalty, self.cfg.reward.on_truncated
        )
        exp.action_mask = exp.action_mask & (valid & fresh & trained).view(-1, 1)
        lengths = rb.action_mask.sum(1)
        penalty = overlong_penalty(
            lengths, self.cfg.rollout.max_new_tokens, algo.overlong.buffer, algo.overlong.penalty
        )
        scores = raw + penalty + eos_penalty
        if self.norm_rewards:
            self.reward_norm.update(dist.all_gather_cat(scores[valid]))
            scores = self.reward_norm.normalize(scores)
            self.calibrate_critic_once()  # critic.init_from=reward: onto this scale, once
        if self.critic is not None and not self.fused_update:  # else from the critic update's forward
            with timed("time/score/values_s"):
                exp.values = self.critic.values(exp)
        exp.scores = torch.where(valid, scores, torch.zeros_like(scores))
        # fused_update: the advantages wait for the update's forwards (train_fused).
        self.kept_rows = valid & fresh
        adv_stats = {} if self.fused_update else self.advantages_for(exp, tis=exp.old_logprobs is not None)
        stats = {
            "reward/mean": float(raw[valid].mean()) if valid.any() else float("nan"),
            "reward/normalized_mean": float(exp.scores[valid].mean()) if valid.any() else float("nan"),
            **(self.logprob_stats(exp, entropy) if entropy is not None else {}),
            "response_len/mean": float(lengths.float().mean()),
            "rollout/invalid_rewards": float((~valid).sum()),
            # Cut at max_new_tokens without a stop token (scored with reward.missing_eos_penalty).
            "rollout/truncated_frac": float(truncated.float().mean()),
            "rollout/tokens": float(rb.attention_mask.sum()),
            "rollout/response_tokens": float(rb.action_mask.sum()),
            "async/staleness_max": float(staleness.max()),
            "async/staleness_mean": float(staleness.float().mean()),
            "async/refused": float((~fresh).sum()),
            **reward_stats,
            **adv_stats,
            **timed,
        }
        if algo.overlong.buffer:
            stats["reward/overlong_penalty"] = float(penalty[valid].mean()) if valid.any() else 0.0
        if self.cfg.reward.missing_eos_penalty:
            stats["reward/missing_eos_penalty"] = float(eos_penalty[valid].mean()) if valid.any() else 0.0
        return exp, stats

    @torch.no_grad()
    def advantages_for(self, exp, tis: bool) -> dict[str, float]:
        """Rewards (with the KL to the reference when ``ppo.kl.placement=reward``), advantages (and
        returns, GAE) from ``exp``'s scores, log-probs and values; with ``tis`` (old log-probs scored
        beforehand) and ``async.tis_cap`` the advantages are scaled by the truncated IS weights
        here, else the update applies them. Returns their stats."""
        from tritonrlhf.engine.rl.advantages import group_ids_for, sequence_advantages, token_advantages
        from tritonrlhf.engine.rl.experience import (
            compute_advantages,
            compute_rewards,
            masked_mean,
            rollout_correction_weights,
        )

        p, algo = self.cfg.ppo, self.cfg.algo
        # The KL to the reference goes into the reward here, or into the loss (ppo.kl.placement).
        kl_in_reward = self.kl_ctl.value if p.kl.placement == "reward" else 0.0
        # Deferred old log-probs (old_from_update without a KL in the reward): the KL here is 0 x kl,
        # logged after train(). No reference: the KL is zero here and absent from the stats.
        old = exp.old_logprobs if exp.old_logprobs is not None else exp.ref_logprobs
        exp.rewards, kl = compute_rewards(
            exp.scores, old, exp.ref_logprobs, exp.action_mask, kl_in_reward, p.kl.kind, p.kl.log_ratio_clamp
        )
        if self.critic is not None:
            exp.advantages, exp.returns = compute_advantages(
                exp.rewards, exp.values, exp.action_mask, p.gamma, p.lam, self.whiten, across_ranks=True
            )
        else:  # group baselines over whole groups, wherever their samples are (across ranks)
            groups = group_ids_for(self.rank * self.samples_per_rank, exp.batch_size, p.samples_per_prompt)
            seq = sequence_advantages(algo.advantage, exp.scores, groups, self.kept_rows, algo.std_eps, True)
            exp.advantages, exp.rewards = token_advantages(
                seq, kl, exp.action_mask, kl_in_reward, p.gamma, self.whiten, across_ranks=True
            )
        stats = {}
        rc = self.cfg.rollout_correction()
        if rc is not None and tis:
            w, stats = rollout_correction_weights(exp.old_logprobs, exp.rollout_logprobs, exp.action_mask, rc)
            exp.advantages = exp.advantages * w  # w >= 0, so clip-loss(w * A) = w * clip-loss(A)
        m = exp.action_mask
        stats["advantages/mean"] = float(masked_mean(exp.advantages, m))
        stats["advantages/abs_mean"] = float(masked_mean(exp.advantages.abs(), m))
        if self.critic is not None:
            stats["values/mean"] = float(masked_mean(exp.values, m))
            stats["returns/mean"] = float(masked_mean(exp.returns, m))
        return stats

    def train(self, exp) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled mini-batches; one actor (and critic, GAE) step each.

        With deferred old log-probs (``old_from_update``) the one update's forward supplies them:
        they are written into ``exp`` and their stats (KL, entropy, log-prob gap) returned here.
        """
        if self.fused_update:
            return self.train_fused(exp)
        p = self.cfg.ppo
        kl_in_loss = self.kl_ctl.value if p.kl.placement == "loss" else 0.0
        sums: dict[str, float] = {}
        n = 0
        deferred = exp.old_logprobs is None
        timed = PhaseTimes()
        for _ in range(p.ppo_epochs):
            perm = torch.randperm(exp.batch_size, generator=self._gen)
            for i in range(0, exp.batch_size, self.mini_per_rank):
                mb = exp.select(perm[i : i + self.mini_per_rank])
                micro = self.batching.split(mb)  # consecutive: `kept` below stays in perm's order
                kept: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if deferred else None
                rc = self.cfg.rollout_correction() if deferred else None
                with timed("time/train/actor_s"):
                    a = self.actor.train_minibatch(micro, kl_in_loss, keep=kept, correction=rc)
                if kept is not None:  # one mini-batch: perm covers the batch
                    idx = perm[i : i + self.mini_per_rank]
                    shape, dev = exp.action_mask.shape, exp.action_mask.device
                    exp.old_logprobs = torch.empty(shape, dtype=torch.float32, device=dev)
                    entropy = torch.empty(shape, dtype=torch.float32, device=dev)
                    exp.old_logprobs[idx] = torch.cat([lp for lp, _ in kept]).to(exp.old_logprobs)
                    entropy[idx] = torch.cat([e for _, e in kept]).to(entropy)
                c = {}
                if self.critic is not None:
                    with timed("time/train/critic_s"):
                        c = self.critic.train_minibatch(micro)
                for k, v in [(f"actor/{k}", v) for k, v in a.items()] + [
                    (f"critic/{k}", v) for k, v in c.items()
                ]:
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
        stats = {k: v / max(n, 1) for k, v in sums.items()}
        stats.update(timed)  # time/train/actor_s, time/train/critic_s
        if deferred:
            stats.update(self.logprob_stats(exp, entropy))
            rc = self.cfg.rollout_correction()
            if rc is not None:
                from tritonrlhf.engine.rl.experience import rollout_correction_weights

                stats.update(
                    rollout_correction_weights(exp.old_logprobs, exp.rollout_logprobs, exp.action_mask, rc)[1]
                )
        return stats

    def train_fused(self, exp) -> dict[str, float]:
        """The one update of a step whose passes come from its own forwards (``fused_update``: one
        epoch, one mini-batch, one micro-batch per rank).

        The critic's forward gives the values and the actor's the old log-probs (ratio exactly 1,
        as after a scoring pass under the same weights); between the actor's forward and its
        backward the rewards (with a KL that reads those old log-probs) and advantages are formed,
        then the actor steps, then the critic with the returns. The same update as scoring passes
        followed by ``train`` (tested), with the actor and critic forwards of the scoring passes
        saved. Samples are taken in the order of the same ``randperm`` ``train`` draws.
        """
        p = self.cfg.ppo
        kl_in_loss = self.kl_ctl.value if p.kl.placement == "loss" else 0.0
        rc = self.cfg.rollout_correction()
        perm = torch.randperm(exp.batch_size, generator=self._gen)
        mb = exp.select(perm)
        shape, dev = exp.action_mask.shape, exp.action_mask.device
        stats: dict[str, float] = {}
        timed = PhaseTimes()
        out: dict[str, dict[str, float]] = {}

        def in_order(rows: torch.Tensor) -> torch.Tensor:  # mb's rows back into exp's order
            full = torch.zeros(shape, dtype=torch.float32, device=dev)
            full[perm] = rows.to(full)
            return full

        def advantages_from(logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
            exp.old_logprobs = in_order(logp)
            stats.update(self.advantages_for(exp, tis=False))  # the actor applies the IS weights
            stats.update(self.logprob_stats(exp, in_order(entropy)))
            if rc is not None:
                from tritonrlhf.engine.rl.experience import rollout_correction_weights

                stats.update(
                    rollout_correction_weights(exp.old_logprobs, exp.rollout_logprobs, exp.action_mask, rc)[1]
                )
            return exp.advantages[perm]

        def actor_update() -> None:
            with timed("time/train/actor_s"):
                out["actor"] = self.actor.train_minibatch(
                    [mb], kl_in_loss, keep=[], advantages_from=advantages_from, correction=rc
                )

        def returns_from(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            exp.values = torch.where(exp.action_mask.bool(), in_order(values), 0.0)
            actor_update()
            return exp.values[perm], exp.returns[perm]

        if self.critic is None:
            actor_update()
        else:
            t0 = time.perf_counter()
            out["critic"] = self.critic.train_minibatch([mb], returns_from=returns_from)
            timed["time/train/critic_s"] = time.perf_counter() - t0 - timed["time/train/actor_s"]
        for role, st in out.items():
            stats.update({f"{role}/{k}": float(v) for k, v in st.items()})
        stats.update(timed)
        return stats

    def logprob_stats(self, exp, entropy: torch.Tensor) -> dict[str, float]:
        """KL to the reference, entropy and the rollout/trainer log-prob gap, from ``exp.old_logprobs``.

        Without a reference (``exp.ref_logprobs`` None) there are no ``kl/`` stats (absent, not 0).

        ``rollout/logprob_gap`` compares the trainer with the rollout engine's log-probs *without*
        the banned-text and top-k/top-p renormalisations (``rollout_logprobs + kept_logmass +
        trunc_logmass``): the engine mismatch alone. ``rollout/constraint_kl`` (with bans) is the mean
        per-token KL(constrained || unconstrained) = ``-kept_logmass``, what the ban moved the
        behaviour policy; ``rollout/truncation_kl`` (with top-k/top-p) is the mean ``-trunc_logmass``,
        KL(truncated || untruncated), what the truncation moved it.

        Collective (every trainer rank calls it): ``kl/mean`` is over the training rows of all ranks.
        """
        from tritonrlhf.engine.rl.experience import masked_mean, sequence_kl

        m = exp.action_mask
        out = {}
        if exp.ref_logprobs is not None:
            kl_cfg = self.cfg.ppo.kl
            kl = kernels.kl_penalty(
                exp.old_logprobs, exp.ref_logprobs, kl_cfg.kind, kl_cfg.log_ratio_clamp
            ).float()
            kl = torch.where(m.bool(), kl, torch.zeros_like(kl))
            # Per-sequence KL summed over tokens, averaged over the rows that train on every rank
            # (rows dropped by an invalid reward, staleness or on_truncated=mask have no unmasked token).
            seq_kl, trains = sequence_kl(kl, m)
            tot = dist.all_reduce_sum({"kl": float(seq_kl[trains].sum()), "rows": float(trains.sum())})
            out["kl/mean"] = tot["kl"] / tot["rows"] if tot["rows"] else float("nan")
            out["kl/token_mean"] = float(masked_mean(kl, m))
        out["entropy/mean"] = float(masked_mean(entropy, m))
        rollout = exp.rollout_logprobs
        if exp.kept_logmass is not None:
            rollout = rollout + exp.kept_logmass
            out["rollout/constraint_kl"] = float(masked_mean(-exp.kept_logmass, m))
        if exp.trunc_logmass is not None:
            rollout = rollout + exp.trunc_logmass
            out["rollout/truncation_kl"] = float(masked_mean(-exp.trunc_logmass, m))
        out["rollout/logprob_gap"] = float(masked_mean((rollout - exp.old_logprobs).abs(), m))
        return out

    def sample_rows(self, rb: RolloutBatch, exp) -> list[dict]:
        """The first ``logging.samples_per_step`` samples of this rank's batch as ``samples.jsonl`` rows.

        Called after ``train()`` (the old log-probs may come from the update). ``reward`` is the raw
        score (after ``reward.clip``; before normalisation, penalties and KL; None when invalid),
        ``kl`` the sample's per-token KL to the reference (``ppo.kl.kind``) summed over its response,
        dropped samples included (None without a reference). Samples are prompt-major: a group's
        samples come together.
        """
        from tritonrlhf.engine.rl.experience import sequence_kl

        n = min(self.cfg.logging.samples_per_step, exp.batch_size)
        seq_kl = None
        if exp.ref_logprobs is not None:
            kl_cfg = self.cfg.ppo.kl
            kl = kernels.kl_penalty(
                exp.old_logprobs[:n], exp.ref_logprobs[:n], kl_cfg.kind, kl_cfg.log_ratio_clamp
            )
            seq_kl, _ = sequence_kl(kl, rb.action_mask[:n])
        lengths = rb.action_mask[:n].sum(1)
        reasons = rb.finish_reasons or ["stop"] * n
        return [
            {
                "prompt": rb.prompts[i],
                "response": rb.responses[i],
                "reward": float(rb.scores[i]) if bool(rb.score_valid[i]) else None,
                "kl": None if seq_kl is None else float(seq_kl[i]),
                "response_len": int(lengths[i]),
                "finish_reason": reasons[i],
                **({"reward_info": rb.reward_info[i]} if rb.reward_info and rb.reward_info[i] else {}),
            }
            for i in range(n)
        ]
