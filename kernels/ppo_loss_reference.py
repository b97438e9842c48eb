"""PyTorch references of the PPO losses (``tritonrlhf.kernels.ppo_loss``), and the KL loss term's spec.

``ppo_policy_loss_reference`` and ``ppo_value_loss_reference`` compute in the inputs' dtype
(the tests pass float64) what the Triton kernels compute: the same reductions, statistics and
masking rules, documented in ``kernels/ppo_loss.py``. ``KLLossTerm`` names the reference
log-probs, weight and estimator of the KL term both add to the policy loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tritonrlhf.kernels.kl import LOG_RATIO_CLAMP, kl_penalty_reference

REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
# The policy objectives (``loss_type``): PPO's clipped token ratio, GSPO's clipped sequence ratio,
# CISPO's REINFORCE weighted by the clipped, stop-gradient token ratio.
LOSS_TYPES = ("ppo", "gspo", "cispo")


@dataclass(frozen=True)
class KLLossTerm:
    """A KL penalty against a frozen reference, added to the policy loss per token.

    ``ref_logp``: ``[..., T]`` reference log-probs, the shape of ``logp`` (not differentiated);
    ``coef``: its weight (GRPO's beta); ``kind``: ``k1`` | ``k2`` | ``k3`` (``tritonrlhf.kernels.kl``; GRPO
    uses k3, the low-variance unbiased estimator of KL(policy || reference)); ``log_ratio_clamp``:
    k3's bound on ``|ref_logp - logp|`` (``tritonrlhf.kernels.kl``).
    """

    ref_logp: torch.Tensor
    coef: float
    kind: str = "k3"
    log_ratio_clamp: float = LOG_RATIO_CLAMP


# --------------------------------------------------------------------------- reference
def _masked_reduce(loss: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-token ``loss[..., T]`` with ``mask`` as documented in the module docstring."""
    m = mask.float()
    lm = torch.where(mask != 0, loss * m, torch.zeros_like(loss))
    if reduction == "token_mean":
        count = m.sum()
        return lm.sum() / torch.where(count > 0, count, torch.ones_like(count))
    rows_sum, rows_cnt = lm.sum(-1), m.sum(-1)
    valid = rows_cnt > 0
    if reduction == "seq_mean_token_mean":
        per = torch.where(valid, rows_sum / torch.where(valid, rows_cnt, torch.ones_like(rows_cnt)), 0.0)
    else:
        per = torch.where(valid, rows_sum, 0.0)
    return per.sum() / valid.sum().clamp(min=1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    count = m.sum()
    return torch.where(mask != 0, x * m, 0.0).sum() / torch.where(count > 0, count, torch.ones_like(count))


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    on = mask != 0
    x = torch.where(on, x, float("-inf")).amax()
    return torch.where(on.any(), x, 0.0)


def gspo_seq_logratio(d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's log sequence ratio: the masked mean of the token log-ratios ``d[..., T]`` per
    sequence, ``[..., 1]`` (0 for a sequence with no unmasked token; a float mask weights tokens)."""
    m = mask.float()
    num = torch.where(mask != 0, d * m, 0.0).sum(-1, keepdim=True)
    cnt = m.sum(-1, keepdim=True)
    return torch.where(cnt > 0, num / torch.where(cnt > 0, cnt, torch.ones_like(cnt)), 0.0)


def ppo_policy_loss_reference(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    reduction: str = "token_mean",
    kl: KLLossTerm | None = None,
    loss_type: str = "ppo",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (or GSPO's, or CISPO's), PyTorch reference (CPU path and
    benchmarks' baseline).

    ``loss_type`` (the per-token term before the reduction; ``clip_low``/``clip_high`` are each
    objective's own clip range):

    - ``ppo``: ``max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high))``, ``r = exp(logp - old_logp)``.
    - ``gspo``: the same with the sequence ratio ``s = exp(mean_t (logp - old_logp))`` (the
      geometric mean of the token ratios, over the sequence's unmasked tokens) in place of ``r``,
      in the token-level form of the GSPO paper and verl: ``s_t = sg(s) * pi_t / sg(pi_t)``, so
      ``d loss_t / d logp_t = -A s`` where unclipped; with ``seq_mean_token_mean`` and one
      advantage per sequence that is exactly the gradient of the sequence-level objective.
    - ``cispo``: ``-sg(clamp(r, 1 - clip_low, 1 + clip_high)) * A * logp``: REINFORCE weighted
      by the clipped, stop-gradient ratio, so clipped tokens keep their gradient (MiniMax-M1).
      The loss *value* is that surrogate (it includes ``logp``); only its gradient is meaningful.

    ``clipfrac`` counts the tokens whose term was clipped (``cispo``: whose weight was clamped;
    ``gspo``: every token of a clipped sequence); ``ratio_mean``/``ratio_max`` are of ``s`` for
    ``gspo``. ``dual_clip`` is PPO's only.

    Shapes: all inputs ``[..., T]``; returns a 0-d float32 loss and a dict of 0-d float32
    stats: ``clipfrac`` (clipped term strictly larger), ``approx_kl`` (masked mean of the k3
    estimator ``expm1(d) - d``, ``d = logp - old_logp``, i.e. KL(old || new)), ``ratio_mean``,
    ``ratio_max`` (over unmasked tokens, 0 if none) and ``dual_clipfrac``; with ``kl`` the loss
    gains ``kl.coef * kl_t`` per token and the stats ``kl_loss`` (masked mean of ``kl_t``).
    Memory traffic: reads logp, old_logp, advantages and mask once (and ref_logp with ``kl``;
    eager PyTorch adds several N-sized fp32 temporaries); backward writes N gradients.
    """
    clip_high = clip_low if clip_high is None else clip_high
    on = mask != 0  # zero masked positions first so inf/NaN padding can't reach the gradient
    adv = torch.where(on, advantages.float(), 0.0)
    x = torch.where(on, logp.float(), 0.0)
    d = torch.where(on, logp.float() - old_logp.float(), 0.0)
    if loss_type == "gspo":  # sg(s) * pi / sg(pi): the value of s, the gradient of each token's log-prob
        ratio = torch.exp(x - x.detach() + gspo_seq_logratio(d, mask).detach())
    else:
        ratio = torch.exp(d)
    if loss_type == "cispo":
        weight = ratio.detach().clamp(1.0 - clip_low, 1.0 + clip_high)
        loss = -adv * weight * x
        clipped = (ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)
    else:
        l1 = -adv * ratio
        l2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
        loss = torch.maximum(l1, l2)
        clipped = l2 > l1
    if dual_clip is not None:
        l3 = -adv * dual_clip
        dual = (adv < 0) & (loss > l3)
        loss = torch.where(dual, l3, loss)
    else:
        dual = torch.zeros_like(clipped)
    if kl is not None:
        kl_t = kl_penalty_reference(
            torch.where(on, logp.float(), 0.0),
            torch.where(on, kl.ref_logp.float(), 0.0),
            kl.kind,
            kl.log_ratio_clamp,
        )
        loss = loss + float(kl.coef) * kl_t
    out = _masked_reduce(loss, mask, reduction)
    with torch.no_grad():
        d, ratio = d.detach(), ratio.detach()
        stats = {
            "clipfrac": _masked_mean(clipped.float(), mask),
            "approx_kl": _masked_mean(torch.expm1(d) - d, mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "ratio_max": _masked_max(ratio, mask),
            "dual_clipfrac": _masked_mean(dual.float(), mask),
        }
        if kl is not None:
            stats["kl_loss"] = _masked_mean(kl_t.detach(), mask)
    return out, stats


def ppo_value_loss_reference(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    reduction: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * max((v - R)^2, (v_clip - R)^2)``, PyTorch reference.

    ``v_clip = old + clamp(v - old, -clip, clip)``; ``clip=None`` gives ``0.5 * (v - R)^2``.
    Shapes: all inputs ``[..., T]``; returns a 0-d float32 loss and 0-d float32 stats
    ``vf_clipfrac``, ``values_mean``, ``returns_mean``, ``values_max``.
    Memory traffic: reads values, old_values, returns and mask once; backward writes N.
    """
    on = mask != 0  # zero masked positions first so inf/NaN padding can't reach the gradient
    v, r = torch.where(on, values.float(), 0.0), torch.where(on, returns.float(), 0.0)
    l1 = (v - r) ** 2
    if clip is not None:
        old = torch.where(on, old_values.float(), 0.0)
        v_clip = old + (v - old).clamp(-clip, clip)
        l2 = (v_clip - r) ** 2
        loss = 0.5 * torch.maximum(l1, l2)
        clipped = l2 > l1
    else:
        loss = 0.5 * l1
        clipped = torch.zeros_like(l1, dtype=torch.bool)
    out = _masked_reduce(loss, mask, reduction)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": _masked_mean(clipped.float(), mask),
            "values_mean": _masked_mean(v.detach(), mask),
            "returns_mean": _masked_mean(r, mask),
            "values_max": _masked_max(v.detach(), mask),
        }
    return out, stats
