"""The ``algo`` section of the PPO config: the advantage estimator, loss aggregation, the policy
objective (PPO, GSPO, CISPO), rollout correction, DAPO's dynamic sampling and overlong penalty.
Re-exported by ``engine/config.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tritonrlhf.engine.config import PPOAlgoConfig


@dataclass
class DynamicSamplingConfig:
    """DAPO's dynamic sampling: groups whose valid rewards are all equal carry no group-relative
    signal; they are dropped and more prompts are drawn until the batch is full, at most
    ``max_draws`` prompt batches per step (the first included). A batch still short after that is
    filled with dropped groups (``dynamic/padded_groups`` counts them)."""

    enabled: bool = False
    max_draws: int = 4


@dataclass
class OverlongConfig:
    """DAPO's soft overlong punishment, added to the score: 0 up to ``max_new_tokens - buffer``
    response tokens, then falling linearly to ``-penalty`` at ``max_new_tokens``. ``buffer`` 0: off."""

    buffer: int = 0
    penalty: float = 1.0


@dataclass
class RolloutCorrectionConfig:
    """Rollout correction against the behaviour policy (the rollout engine's log-probs), verl's
    ``rollout_corr``: the weight ``pi_old / pi_rollout`` per token (``level=token``) or per
    sequence (``level=sequence``: the ``product`` of its token weights or their ``geometric`` mean),
    then ``truncate`` (TIS: ``min(w, high)``) or ``mask`` (leave out tokens or sequences whose
    weight is outside ``[low, high]``). ``mode`` null: ``async.tis_cap``'s token truncation."""

    mode: str | None = None  # null | truncate | mask
    level: str = "token"  # token | sequence
    aggregation: str = "geometric"  # level=sequence: product | geometric
    low: float = 0.5  # mask: lower bound
    high: float = 2.0  # truncate: the cap; mask: upper bound


POLICY_LOSSES = ("ppo", "gspo", "cispo")


@dataclass
class AlgoConfig:
    """Which RL algorithm the PPO loop runs: the advantage estimator and how the loss is reduced.

    ``advantage``: ``gae`` (PPO with a critic) or a critic-free estimator over the
    ``ppo.samples_per_prompt`` samples of each prompt (``tritonrlhf.engine.rl.advantages``).
    ``loss_agg``: ``token_mean`` (over the mini-batch's tokens), ``seq_mean_token_mean`` (mean of
    each sequence's token mean), ``seq_mean_token_sum_norm`` (each sequence's token sum over
    ``loss_agg_constant``, averaged over sequences: Dr. GRPO); null: the estimator's default.
    """

    advantage: str = "gae"
    loss_agg: str | None = None
    loss_agg_constant: int = 0  # seq_mean_token_sum_norm's constant; 0: rollout.max_new_tokens
    std_eps: float = 1e-6  # grpo: (r - mean) / (std + std_eps)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    # The policy objective (kernels.ppo_policy_loss's loss_type): ppo (ppo.clip_low/high), gspo
    # (the sequence ratio, clipped per sequence in its own, much smaller range), cispo (REINFORCE
    # weighted by the clipped, stop-gradient ratio; cispo_clip_low 1: no lower bound, as MiniMax-M1).
    policy_loss: str = "ppo"
    gspo_clip_low: float = 3.0e-4
    gspo_clip_high: float = 4.0e-4
    cispo_clip_low: float = 1.0
    cispo_clip_high: float = 0.28
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)

    def policy_clip(self, ppo: PPOAlgoConfig) -> tuple[float, float | None]:
        """``(clip_low, clip_high)`` of the chosen objective."""
        if self.policy_loss == "gspo":
            return self.gspo_clip_low, self.gspo_clip_high
        if self.policy_loss == "cispo":
            return self.cispo_clip_low, self.cispo_clip_high
        return ppo.clip_low, ppo.clip_high

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"
