"""Experience batches and the pure functions that turn scores into PPO targets.

Data layout (fixed; the trainer relies on it): a batch of B samples is
``sequences[B, P+R]`` = a left-padded prompt (P = longest prompt in the batch)
followed by a right-padded response (R = longest response). The log-prob of
response token j is predicted at position P-1+j. Every per-token RL tensor is
``[B, R]`` and is meaningful only where ``action_mask`` is 1.

Nothing here touches distributed state: merging statistics across ranks is the
trainer's job (see ``RunningMoments.merge_stats``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tritonrlhf import kernels
from tritonrlhf.engine.data import columns_by_name
from tritonrlhf.kernels.kl import LOG_RATIO_CLAMP

_TENSOR_FIELDS = (
    "sequences",
    "attention_mask",
    "action_mask",
    "old_logprobs",
    "rollout_logprobs",
    "ref_logprobs",
    "values",
    "scores",
    "rewards",
    "advantages",
    "returns",
    "kept_logmass",
    "trunc_logmass",
)


# --------------------------------------------------------------------------- container
@dataclass
class Experience:
    """One batch of rollouts with everything PPO needs (B samples, P prompt, R response).

    Shapes (per-token RL tensors are float32 and valid where ``action_mask`` is 1):

    - ``sequences``        [B, P+R] int64   left-padded prompt + right-padded response
    - ``attention_mask``   [B, P+R] int64/bool  1 on real tokens
    - ``action_mask``      [B, R]   bool    1 on real response tokens
    - ``old_logprobs``     [B, R]   the trainer's recomputed log-probs before the update
    - ``rollout_logprobs`` [B, R]   the rollout engine's (vLLM) log-probs
    - ``ref_logprobs``     [B, R]   the frozen reference policy's log-probs; None without a
      reference (``ppo.kl.reference=auto`` at KL coefficient 0)
    - ``values``           [B, R]   critic values of the state before each response token
    - ``scores``           [B]      the reward model / function score per sample
    - ``rewards``          [B, R]   per-token rewards (KL penalty + score on the last token)
    - ``advantages``       [B, R]   GAE advantages (optionally whitened)
    - ``returns``          [B, R]   GAE returns (value targets)
    - ``kept_logmass``     [B, R]   with banned text: log of the mass the ban left per token
      (``rollout_logprobs + kept_logmass`` is the unconstrained log-prob); None without bans
    - ``trunc_logmass``    [B, R]   with top-k/top-p: log of the mass the truncation kept per token
      (``rollout_logprobs + kept_logmass + trunc_logmass`` is the untruncated, unconstrained
      log-prob); None without truncation
    - ``policy_version``   int      actor optimizer steps taken when the rollout was generated

    Fields not yet computed may be ``None``; ``split``/``cat``/``select``/``to``
    carry ``None`` through.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    kept_logmass: torch.Tensor | None = None
    trunc_logmass: torch.Tensor | None = None
    policy_version: int = 0

    @property
    def batch_size(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def response_len(self) -> int:
        """R, the padded response length."""
        return int(self.action_mask.shape[1])

    @property
    def prompt_len(self) -> int:
        """P, the padded prompt length."""
        return int(self.sequences.shape[1] - self.action_mask.shape[1])

    def _map(self, fn) -> Experience:
        updates = {
            name: fn(getattr(self, name)) for name in _TENSOR_FIELDS if getattr(self, name) is not None
        }
        return dataclasses.replace(self, **updates)

    def to(self, device: torch.device | str) -> Experience:
        """A copy with every tensor moved to ``device``."""
        return self._map(lambda t: t.to(device))

    def select(self, indices: torch.Tensor | Sequence[int]) -> Experience:
        """The samples at ``indices`` (a list, a LongTensor, or a bool mask of length B)."""
        idx = torch.as_tensor(indices, device=self.sequences.device)
        if idx.dtype == torch.bool:
            idx = idx.nonzero(as_tuple=True)[0]
        return self._map(lambda t: t.index_select(0, idx.to(t.device)))

    def split(self, micro_batch_size: int) -> list[Experience]:
        """Consecutive chunks of ``micro_batch_size`` samples (the last may be smaller)."""
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        n = self.batch_size
        return [
            self.select(torch.arange(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)
        ]

    @staticmethod
    def cat(items: Sequence[Experience]) -> Experience:
        """Concatenate along the batch dimension, re-padding prompts (left) and responses (right).

        Batches with different P or R are aligned to the largest: prompt-side
        tensors get left padding, response-side tensors right padding (zeros,
        pad token id 0 with attention 0). ``policy_version`` is the minimum.
        """
        if not items:
            raise ValueError("Experience.cat needs at least one batch")
        P = max(e.prompt_len for e in items)
        R = max(e.response_len for e in items)
        out: dict[str, torch.Tensor | None] = {}
        for name in _TENSOR_FIELDS:
            vals = [getattr(e, name) for e in items]
            if all(v is None for v in vals):
                out[name] = None
                continue
            if any(v is None for v in vals):
                raise ValueError(f"Experience.cat: field {name!r} is set in some batches and None in others")
            if name in ("sequences", "attention_mask"):
                vals = [_pad_seq(v, e.prompt_len, P, R) for v, e in zip(vals, items)]
            elif name != "scores":
                vals = [torch.nn.functional.pad(v, (0, R - v.shape[1])) for v in vals]
            out[name] = torch.cat(vals, 0)
        return Experience(**out, policy_version=min(e.policy_version for e in items))


@dataclass
class RolloutBatch:
    """Samples of one rank laid out for the trainer.

    sequences:        [B, P+R] long, left-padded prompt then right-padded response.
    attention_mask:   [B, P+R] long, 1 on real tokens.
    action_mask:      [B, R]   bool, 1 on real response tokens.
    rollout_logprobs: [B, R]   float32, the rollout engine's sampled-token log-probs (0 on padding).
    prompts, responses: B decoded strings, for the reward function.
    versions:         [B] long, the policy version that generated each sample.
    ref_logprobs:     [B, R] float32, present when the rollout ranks scored the samples
                      (``placement.scoring=rollout``), else None.
    scores [B] float32, score_valid [B] bool: present when the samples were scored before
                      collation (on the rollout ranks, or for dynamic sampling), else None until
                      ``make_experience`` scores them (the raw scores, for the samples log).
    finish_reasons:   B of ``"stop"`` (ended with the stop token) or ``"length"`` (cut at
                      ``max_new_tokens``); ``truncated`` is the latter as [B] bool.
    kept_logmass:     [B, R] float32 with banned text (``Sample.kept_logmass``, 0 on padding), else None.
    trunc_logmass:    [B, R] float32 with top-k/top-p (``Sample.trunc_logmass``, 0 on padding), else None.
    columns:          name -> [B] values of the prompt records' other columns (``answer``, ...; None
                      where a record lacks one), passed to reward functions; {} without any.
    reward_parts:     name -> [B] float32 each reward function's score (NaN: none), when scored by
                      several functions; reward_info: [B] per-sample dicts a function returned (or None).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    prompts: list[str]
    responses: list[str]
    versions: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    score_valid: torch.Tensor | None = None
    finish_reasons: list[str] | None = None
    kept_logmass: torch.Tensor | None = None
    trunc_logmass: torch.Tensor | None = None
    columns: dict[str, list[Any]] = field(default_factory=dict)
    reward_parts: dict[str, torch.Tensor] | None = None
    reward_info: list[dict[str, Any] | None] | None = None

    @property
    def truncated(self) -> torch.Tensor:
        """[B] bool: the responses cut at ``max_new_tokens`` without their stop token."""
        reasons = self.finish_reasons or ["stop"] * self.sequences.shape[0]
        return torch.tensor([r != "stop" for r in reasons], dtype=torch.bool)

    @property
    def prompt_len(self) -> int:
        return self.sequences.shape[1] - self.action_mask.shape[1]


def collate_samples(samples: list, tokenizer: Any, pad_id: int) -> RolloutBatch:
    """Pack rollout ``Sample``s into the left-pad-prompt / right-pad-response layout."""
    P = max(len(s.prompt_ids) for s in samples)
    R = max(max(len(s.response_ids) for s in samples), 1)
    B = len(samples)
    seq = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    amask = torch.zeros((B, R), dtype=torch.bool)
    lps = torch.zeros((B, R), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        seq[i, P - p : P] = torch.tensor(s.prompt_ids, dtype=torch.long)
        attn[i, P - p : P] = 1
        if r:
            seq[i, P : P + r] = torch.tensor(s.response_ids, dtype=torch.long)
            attn[i, P : P + r] = 1
            amask[i, :r] = True
            lps[i, :r] = torch.tensor(s.logprobs[:r], dtype=torch.float32)
    prompts = tokenizer.batch_decode([s.prompt_ids for s in samples], skip_special_tokens=True)
    responses = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    versions = torch.tensor([s.policy_version for s in samples], dtype=torch.long)
    rb = RolloutBatch(seq, attn, amask, lps, prompts, responses, versions)
    rb.finish_reasons = [s.finish_reason for s in samples]
    if samples and all(s.ref_logprobs is not None for s in samples):
        rb.ref_logprobs = torch.zeros((B, R), dtype=torch.float32)
        for i, s in enumerate(samples):
            rb.ref_logprobs[i, : len(s.ref_logprobs)] = torch.tensor(s.ref_logprobs, dtype=torch.float32)
    for name in ("kept_logmass", "trunc_logmass"):
        if samples and all(getattr(s, name) is not None for s in samples):
            t = torch.zeros((B, R), dtype=torch.float32)
            for i, s in enumerate(samples):
                t[i, : len(getattr(s, name))] = torch.tensor(getattr(s, name), dtype=torch.float32)
            setattr(rb, name, t)
    rb.columns = columns_by_name([s.columns or {} for s in samples])
    if samples and all(s.score is not None for s in samples):
        rb.scores = torch.tensor([s.score for s in samples], dtype=torch.float32)
        rb.score_valid = torch.tensor([s.score_valid for s in samples], dtype=torch.bool)
        parts = sorted({k for s in samples for k in (s.reward_parts or {})})
        if parts:
            rb.reward_parts = {
                k: torch.tensor(
                    [(s.reward_parts or {}).get(k, math.nan) for s in samples], dtype=torch.float32
                )
                for k in parts
            }
        if any(s.reward_info for s in samples):
            rb.reward_info = [s.reward_info for s in samples]
    return rb


def _pad_seq(x: torch.Tensor, p: int, P: int, R: int) -> torch.Tensor:
    """[B, p+r] -> [B, P+R]: left-pad the prompt part, right-pad the response part."""
    prompt, resp = x[:, :p], x[:, p:]
    prompt = torch.nn.functional.pad(prompt, (P - p, 0))
    resp = torch.nn.functional.pad(resp, (0, R - resp.shape[1]))
    return torch.cat([prompt, resp], 1)


# --------------------------------------------------------------------------- reward normalization
class RunningMoments:
    """Running mean / std of a scalar stream (Welford per batch, Chan et al. to merge).

    Keeps ``count``, ``mean`` and ``m2`` (sum of squared deviations) in float64.
    ``std`` is the population std. To merge ranks, the trainer all-gathers each
    rank's batch ``(count, mean, m2)`` (see ``batch_stats``) and feeds each one
    to ``merge_stats``; every rank then holds identical moments.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = eps
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count > 0 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    @staticmethod
    def batch_stats(x: torch.Tensor) -> tuple[float, float, float]:
        """``(count, mean, m2)`` of a batch of values, in float64."""
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return 0.0, 0.0, 0.0
        mean = float(x.mean())
        return float(n), mean, float(((x - mean) ** 2).sum())

    def merge_stats(self, count: float, mean: float, m2: float) -> tuple[float, float]:
        """Fold in another set of moments (Chan's parallel update); returns ``(mean, std)``."""
        if count <= 0:
            return self.mean, self.std
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total
        return self.mean, self.std

    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Fold in a batch of values; returns the updated ``(mean, std)``."""
        return self.merge_stats(*self.batch_stats(x))

    def normalize(self, x: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """``(x - mean) / std`` (or ``x / std`` without shifting), in x's dtype."""
        y = x - self.mean if shift_mean else x
        return y / (self.std + self.eps)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


# --------------------------------------------------------------------------- rewards & advantages
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is set (masked-out NaNs are ignored)."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is set; 0 where nothing is set."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum().to(x.dtype)
        var = var * n / (n - 1).clamp_min(1)
    return var


def _global_masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, Bessel-corrected variance) of ``x`` over the masked positions of every rank's batch.

    Two float64 sums across ranks (``distributed.all_reduce_sum``: the sum and count, then the
    squared deviations), so the result equals ``masked_mean``/``masked_var`` of all ranks'
    tensors concatenated.
    """
    from tritonrlhf.engine import distributed as D

    m = mask.bool()
    xd = torch.where(m, x.double(), torch.zeros_like(x, dtype=torch.float64))
    s = D.all_reduce_sum({"sum": float(xd.sum()), "n": float(m.sum())})
    mean = s["sum"] / max(s["n"], 1.0)
    sq = D.all_reduce_sum({"sq": float(torch.where(m, (x.double() - mean) ** 2, torch.zeros_like(xd)).sum())})
    var = sq["sq"] / max(s["n"] - 1.0, 1.0)
    return x.new_tensor(mean), x.new_tensor(var)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    across_ranks: bool = False,
) -> torch.Tensor:
    """Normalize ``x`` to masked mean 0 (unless ``shift_mean`` is False) and std 1; masked-out -> 0.

    ``across_ranks``: the mean and std are those of every rank's batch together (all-reduced on
    the default process group, as if one process held the whole rollout), so each rank's
    advantages are on one global scale; every rank must call it. Without a process group (or
    with one rank) it is the local statistics.
    """
    from tritonrlhf.engine import distributed as D

    if across_ranks and D.world_size() > 1:
        mean, var = _global_masked_moments(x, mask)
    else:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def last_token_index(action_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last real response token per row (-1 for an empty response)."""
    R = action_mask.shape[1]
    pos = torch.arange(R, device=action_mask.device).expand_as(action_mask)
    return torch.where(action_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    action_mask: torch.Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * kl`` on every response token plus the score on the last one.

    scores [B], logprobs/ref_logprobs/action_mask [B, R] -> (rewards [B, R], kl [B, R]),
    float32, zero where ``action_mask`` is 0. A row with no response tokens gets no score.
    ``ref_logprobs`` None (no reference model: the KL is off, ``kl_coef`` must be 0): kl is zero.
    ``log_ratio_clamp``: k3's bound on the log-ratio (``ppo.kl.log_ratio_clamp``).
    """
    mask = action_mask.bool()
    if ref_logprobs is None:
        if kl_coef != 0:
            raise ValueError(f"compute_rewards: kl_coef={kl_coef} needs ref_logprobs")
        kl = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    else:
        kl = kernels.kl_penalty(logprobs, ref_logprobs, kl_kind, log_ratio_clamp).float()
        kl = torch.where(mask, kl, torch.zeros_like(kl))
    rewards = -float(kl_coef) * kl
    last = last_token_index(mask)
    has = last >= 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)[has]
    rewards[rows, last[has]] += scores.to(rewards)[has]
    return rewards, kl


def sequence_kl(kl: torch.Tensor, action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL summed over tokens and which rows train.

    kl [B, R] float, action_mask [B, R] -> (seq_kl [B] float32, trains [B] bool). A row trains when
    it has at least one unmasked token: rows dropped for an invalid reward, staleness or
    ``reward.on_truncated=mask`` have an all-zero mask and carry no loss, so a mean of ``seq_kl``
    over ``trains`` is the KL of what is being optimised (``kl/mean`` and the adaptive controller).
    """
    mask = action_mask.bool()
    seq_kl = torch.where(mask, kl.float(), torch.zeros_like(kl, dtype=torch.float32)).sum(1)
    return seq_kl, mask.any(1)


def compute_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten: bool = True,
    across_ranks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the response tokens (``tritonrlhf.kernels.gae``), advantages optionally whitened.

    rewards, values, action_mask [B, R] -> (advantages [B, R], returns [B, R]) float32,
    zero where ``action_mask`` is 0. Returns are computed before whitening, which uses the
    statistics of all ranks' batches with ``across_ranks`` (see ``masked_whiten``).
    """
    mask = action_mask.bool()
    rewards = torch.where(mask, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))
    values = torch.where(mask, values.float(), torch.zeros_like(values, dtype=torch.float32))
    advantages, returns = kernels.gae(rewards, values, mask.float(), gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, mask, across_ranks=across_ranks)
    zero = torch.zeros_like(advantages)
    return torch.where(mask, advantages, zero), torch.where(mask, returns.float(), zero)


def truncated_is_weights(
    old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, action_mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token truncated importance weights ``min(exp(old - behaviour), cap)`` and their stats.

    old_logprobs, behaviour_logprobs: [B, R] float (the trainer's recomputation before the update,
    and the rollout engine's sampled-token log-probs); action_mask: [B, R] bool. Returns
    (w [B, R] float32, 1 where masked; stats as ``rollout_correction_weights``) over valid tokens.
    Truncation bounds the variance that stale or mismatched rollouts add (Espeholt et al. 2018;
    "truncated IS" in verl / AReaL).
    """
    from tritonrlhf.engine.config import RolloutCorrectionConfig

    rc = RolloutCorrectionConfig("truncate", "token", high=cap)
    return rollout_correction_weights(old_logprobs, behaviour_logprobs, action_mask, rc)


def rollout_correction_weights(
    old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, action_mask: torch.Tensor, rc
) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance weights of the trainer's policy against the behaviour policy (what the rollout
    engine sampled from), truncated or masked as ``rc`` (a ``RolloutCorrectionConfig``) says.

    old_logprobs, behaviour_logprobs: [B, R] float; action_mask: [B, R] bool. The raw weight is
    ``exp(old - behaviour)`` per token, or per sequence (``rc.level=sequence``) ``exp(sum)``
    (``product``) or ``exp(mean)`` (``geometric``) of its valid tokens' log-ratios, broadcast to
    them. ``truncate``: ``min(w, rc.high)``; ``mask``: 1 inside ``[rc.low, rc.high]``, 0 outside,
    so a left-out token or sequence adds no loss and no gradient (it still counts in the loss's
    token or sequence count). Returns (w [B, R] float32, 1 where ``action_mask`` is 0; stats over
    the valid units, tokens or sequences: ``is/mean``, ``is/max`` of the raw weights,
    ``is/truncated_frac`` (truncate) and ``is/masked_frac`` (mask), and ``is/ess``, the normalised
    effective sample size ``(sum w)^2 / (n sum w^2)`` of the raw weights, 1 when they are equal).
    """
    mask = action_mask.bool()
    logw = torch.where(mask, old_logprobs.float() - behaviour_logprobs.float(), 0.0)
    if rc.level == "sequence":
        n = mask.sum(-1, keepdim=True)
        seq = logw.sum(-1, keepdim=True)
        if rc.aggregation == "geometric":
            seq = seq / n.clamp(min=1)
        unit_log, units = seq.squeeze(-1), n.squeeze(-1) > 0
        logw = seq.expand_as(logw)
    raw = torch.exp(logw.clamp(min=-30.0, max=30.0))
    if rc.level != "sequence":
        unit_log, units = logw, mask
    if rc.mode == "mask":
        w = ((raw >= rc.low) & (raw <= rc.high)).float()
    else:
        w = raw.clamp(max=rc.high)
    w = torch.where(mask, w, torch.ones_like(w))
    valid = torch.exp(unit_log.clamp(min=-30.0, max=30.0))[units].double()
    if valid.numel():
        out = (valid < rc.low) | (valid > rc.high) if rc.mode == "mask" else valid > rc.high
        stats = {
            "is/mean": float(valid.mean()),
            "is/max": float(valid.max()),
            "is/truncated_frac": float(out.double().mean()) if rc.mode != "mask" else 0.0,
            "is/masked_frac": float(out.double().mean()) if rc.mode == "mask" else 0.0,
            "is/ess": float(valid.sum() ** 2 / (valid.numel() * (valid**2).sum())),
        }
    else:
        stats = {
            "is/mean": 1.0,
            "is/max": 1.0,
            "is/truncated_frac": 0.0,
            "is/masked_frac": 0.0,
            "is/ess": 1.0,
        }
    return w, stats


def truncation_terms(truncated: torch.Tensor, missing_eos_penalty: float, on_truncated: str) -> tuple:
    """``(penalty [B] float32, trained [B] bool)`` for responses cut at ``max_new_tokens``.

    ``penalty`` is ``-missing_eos_penalty`` on each truncated response (added to its score, as
    TRL's ``missing_eos_penalty``), 0 elsewhere; ``trained`` is False on truncated responses when
    ``on_truncated == "mask"`` (no loss; their score still counts in their group's baseline),
    True everywhere with ``"score"``.
    """
    if on_truncated not in ("score", "mask"):
        raise ValueError(f"on_truncated must be 'score' or 'mask', got {on_truncated!r}")
    penalty = -float(missing_eos_penalty) * truncated.float()
    trained = ~truncated if on_truncated == "mask" else torch.ones_like(truncated)
    return penalty, trained.bool()
