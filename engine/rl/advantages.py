"""Critic-free advantage estimators: GRPO, Dr. GRPO, RLOO, REINFORCE++ (and its baseline variant).

Each prompt is sampled ``n`` times (``ppo.samples_per_prompt``); the ``n`` samples form a *group*
and ``group_ids[B]`` says which group each sample belongs to. A sequence-level advantage comes from
the sample's score and its group (``sequence_advantages``):

- ``grpo``:                  ``(r - mean_g) / (std_g + eps)`` (std with Bessel's correction, as
  TRL, OpenRLHF and verl compute it);
- ``dr_grpo``:               ``r - mean_g`` (no std division; its loss is normalised by a constant);
- ``rloo``:                  ``r - mean of the other samples of the group`` = ``n/(n-1) (r - mean_g)``;
- ``reinforce_pp``:          ``r`` (REINFORCE++: no baseline, global whitening below);
- ``reinforce_pp_baseline``: ``r - mean_g``, then global whitening.

``token_advantages`` then puts the sequence advantage on the last response token, adds the
per-token KL penalty when the KL sits in the reward (``-coef * kl_t`` on every token), and takes
the discounted reward-to-go (``gamma``); with the KL in the loss instead, that is the sequence
advantage broadcast to every token. REINFORCE++ whitens the result over every token of the batch.

Group statistics are over the whole group even when its samples sit on several ranks: with
``across_ranks`` every rank gathers all ranks' ``(group id, score, valid)`` (a few floats per
sample; ``tritonrlhf.engine.distributed.all_gather_cat``), the same way ``masked_whiten`` shares its moments.
Invalid samples (a non-finite reward, or refused as too stale) are left out of their group's
statistics and get advantage 0.

Also here: DAPO's soft overlong penalty and the test its dynamic sampling applies to a group.
"""

from __future__ import annotations

import torch

from tritonrlhf import kernels
from tritonrlhf.engine.rl.experience import last_token_index, masked_whiten


def group_ids_for(offset: int, count: int, n: int) -> torch.Tensor:
    """[count] group ids of samples ``offset .. offset+count-1`` of a prompt-major batch, ``n`` per prompt."""
    return torch.div(torch.arange(offset, offset + count), n, rounding_mode="floor")


def _pool(
    scores: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor, across_ranks: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's ``(scores, group_ids, valid)`` concatenated (this rank's alone without a group)."""
    from tritonrlhf.engine import distributed as D

    if not across_ranks or D.world_size() == 1:
        return scores.double(), group_ids.long(), valid.bool()
    packed = torch.stack([scores.double(), group_ids.double(), valid.double()], 1).flatten()
    allv = D.all_gather_cat(packed, dtype=torch.float64).view(-1, 3)
    return allv[:, 0], allv[:, 1].long(), allv[:, 2] > 0


def group_stats(
    scores: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor, across_ranks: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, std, count)`` [B] float64: each sample's group statistics over its valid members.

    ``std`` has Bessel's correction (0 for a group of one); ``count`` is the number of valid
    members. With ``across_ranks`` the group may span ranks (every rank must call).
    """
    s, g, v = _pool(scores, group_ids, valid, across_ranks)
    uniq, inv = torch.unique(g, return_inverse=True)
    k = len(uniq)
    vf = v.double()
    x = torch.where(v, s, torch.zeros_like(s))
    cnt = torch.zeros(k, dtype=torch.float64).index_add_(0, inv, vf)
    mean = torch.zeros(k, dtype=torch.float64).index_add_(0, inv, x) / cnt.clamp_min(1)
    sq = torch.where(v, (s - mean[inv]) ** 2, torch.zeros_like(s))
    var = torch.zeros(k, dtype=torch.float64).index_add_(0, inv, sq) / (cnt - 1).clamp_min(1)
    pos = torch.searchsorted(uniq, group_ids.long().to(uniq.device))
    return mean[pos], var[pos].sqrt(), cnt[pos]


def sequence_advantages(
    kind: str,
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    valid: torch.Tensor,
    eps: float = 1e-6,
    across_ranks: bool = False,
) -> torch.Tensor:
    """[B] float32 sequence-level advantages of estimator ``kind`` (module docstring); 0 where invalid.

    scores [B] float, group_ids [B] long, valid [B] bool. ``across_ranks``: groups may span ranks.
    """
    r = scores.double()
    if kind == "reinforce_pp":
        adv = r
    else:
        mean, std, cnt = group_stats(scores, group_ids, valid, across_ranks)
        if kind == "grpo":
            adv = (r - mean) / (std + eps)
        elif kind in ("dr_grpo", "reinforce_pp_baseline"):
            adv = r - mean
        elif kind == "rloo":
            adv = torch.where(cnt > 1, (r - mean) * cnt / (cnt - 1).clamp_min(1), torch.zeros_like(r))
        else:
            raise ValueError(f"unknown critic-free estimator {kind!r}")
    return torch.where(valid.bool(), adv, torch.zeros_like(adv)).float()


def token_advantages(
    seq_adv: torch.Tensor,
    kl: torch.Tensor,
    action_mask: torch.Tensor,
    kl_coef: float,
    gamma: float = 1.0,
    whiten: bool = False,
    across_ranks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, rewards)`` [B, R] float32 from sequence advantages and the per-token KL.

    rewards = ``-kl_coef * kl`` on every response token plus ``seq_adv`` on the last one
    (``kl_coef`` 0: the KL is in the loss, or off); advantages = the discounted reward-to-go
    (GAE with zero values and lambda 1, one ``tritonrlhf.kernels.gae`` launch), whitened over every valid
    token of the batch (all ranks with ``across_ranks``) when ``whiten``. Zero where masked.
    """
    mask = action_mask.bool()
    rewards = torch.where(mask, -float(kl_coef) * kl.float(), torch.zeros_like(kl, dtype=torch.float32))
    last = last_token_index(mask)
    rows = (last >= 0).nonzero(as_tuple=True)[0]
    rewards[rows, last[rows]] += seq_adv.to(rewards)[rows]
    _, togo = kernels.gae(rewards, torch.zeros_like(rewards), mask.float(), gamma, 1.0)
    adv = masked_whiten(togo, mask, across_ranks=across_ranks) if whiten else togo.float()
    return torch.where(mask, adv, torch.zeros_like(adv)), rewards


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """[B] float32 DAPO soft overlong punishment of responses of ``lengths`` tokens.

    0 up to ``max_new_tokens - buffer`` tokens, then ``-penalty * (len - (max - buffer)) / buffer``,
    reaching ``-penalty`` at ``max_new_tokens`` (and beyond); all zeros when ``buffer`` is 0.
    """
    lengths = lengths.float()
    if buffer <= 0:
        return torch.zeros_like(lengths)
    over = (lengths - (max_new_tokens - buffer)).clamp(min=0.0, max=float(buffer))
    return -float(penalty) * over / buffer


def informative_groups(scores: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B] bool: whether each sample's group has valid rewards that are not all equal (DAPO's filter).

    A group with fewer than two valid rewards carries no group-relative signal either.
    """
    s = scores.double()
    uniq, inv = torch.unique(group_ids.long(), return_inverse=True)
    k = len(uniq)
    inf = torch.full((k,), float("inf"), dtype=torch.float64)
    lo = inf.scatter_reduce(0, inv, torch.where(valid, s, torch.full_like(s, float("inf"))), "amin")
    hi = (-inf).scatter_reduce(0, inv, torch.where(valid, s, torch.full_like(s, float("-inf"))), "amax")
    cnt = torch.zeros(k, dtype=torch.float64).index_add_(0, inv, valid.double())
    return ((hi > lo) & (cnt >= 2))[inv]
