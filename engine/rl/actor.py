"""The actor: response log-probs without [tokens, vocab] logits, and the PPO policy update.

``PolicyLogprobs`` runs a causal LM's base model to the final (normed) hidden
states and feeds them, with the LM head's weight, to ``tritonrlhf.kernels.linear_logprobs``.
The reference model (``tritonrlhf.engine.rl.scoring``) uses the same module.

``ActorWorker`` wraps it in a DeepSpeed engine (ZeRO stage from ``OptimConfig``)
and does one optimizer step per mini-batch with the clipped PPO loss. A step
whose loss or gradients are non-finite on any rank is skipped on every rank;
``stop_on_consecutive_skips`` ends a run after too many skips in a row.
``TrainEngine`` (the DeepSpeed setup and the guarded step) is shared with the
critic (``tritonrlhf.engine.rl.critic``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tritonrlhf import kernels
from tritonrlhf.engine import distributed as D
from tritonrlhf.engine.config import OptimConfig, PPOAlgoConfig, PPOConfig, RolloutCorrectionConfig
from tritonrlhf.engine.rl.experience import Experience, masked_mean, rollout_correction_weights
from tritonrlhf.engine.rl.packing import Batching, check_packable, response_hidden, unflatten
from tritonrlhf.engine.rl.train_engine import TrainEngine
from tritonrlhf.kernels.kl import LOG_RATIO_CLAMP


# --------------------------------------------------------------------------- log-probs
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] positions counting real tokens only, so a left-padded prompt starts at 0 (as in vLLM)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def base_model_of(lm: nn.Module) -> nn.Module:
    """The transformer body of an HF model (``LlamaForCausalLM.model``): returns normed hidden states."""
    if hasattr(lm, "get_decoder") and lm.get_decoder() is not None and lm.get_decoder() is not lm:
        return lm.get_decoder()
    prefix = getattr(lm, "base_model_prefix", "model")
    base = getattr(lm, prefix, None)
    if base is None:
        raise ValueError(
            f"cannot find the base model of {type(lm).__name__} (tried get_decoder() and .{prefix})"
        )
    return base


class PolicyLogprobs(nn.Module):
    """Response-token log-probs (and entropies) of a causal LM, through ``tritonrlhf.kernels.linear_logprobs``.

    ``forward(sequences[B, P+R], attention_mask[B, P+R], response_len=R, temperature, packed)``
    -> ``(logp[B, R], entropy[B, R])`` float32, for the layout in ``tritonrlhf.engine.rl.experience``:
    hidden states at positions P-1 .. P+R-2 predict tokens P .. P+R-1. ``packed``: one forward
    over the real tokens only (``tritonrlhf.engine.rl.packing``), the LM head only on the response's
    predicting positions; zeros where the padded forward computes padding.

    ZeRO-3: the LM head's weight is used here, not in ``lm_head.forward``, so it
    is registered as an *external parameter* of this module; DeepSpeed then
    gathers it in this module's forward and again for its backward.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        head = lm.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"{type(lm).__name__}: output embeddings must be an nn.Linear, got {type(head)}")
        if head.bias is not None:
            raise ValueError(
                f"{type(lm).__name__}: an LM head with a bias is not supported by linear_logprobs"
            )
        from tritonrlhf.engine.models import logit_multiplier

        # Cohere's logit_scale, Granite's logits_scaling: a factor on the logits, i.e. a temperature.
        self.logit_mult = logit_multiplier(lm.config) if hasattr(lm, "config") else 1.0
        import deepspeed

        deepspeed.zero.register_external_parameter(self, head.weight)

    def forward(
        self,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        response_len: int,
        temperature: float = 1.0,
        packed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        P = sequences.shape[1] - response_len
        if P < 1 or response_len < 1:
            raise ValueError(f"need a prompt and a response; got P={P}, R={response_len}")
        weight = self.lm.get_output_embeddings().weight
        T = temperature / self.logit_mult
        if packed:
            hidden, valid = response_hidden(base_model_of(self.lm), sequences, attention_mask, response_len)
            targets = sequences[:, P:][valid]
            logp, ent = kernels.linear_logprobs(hidden, weight, targets, temperature=T, return_entropy=True)
            return unflatten(logp, valid), unflatten(ent, valid)
        out = base_model_of(self.lm)(
            input_ids=sequences,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        hidden = hidden[:, P - 1 : P - 1 + response_len]
        targets = sequences[:, P:]
        return kernels.linear_logprobs(hidden, weight, targets, temperature=T, return_entropy=True)


def check_micro_batches(micro_batches: Sequence[Experience], grad_accum: int | None, *fields: str) -> None:
    """Each micro-batch has ``fields``; their count is ``grad_accum`` unless None (token budgets)."""
    if grad_accum is not None and len(micro_batches) != grad_accum:
        raise ValueError(
            f"train_minibatch got {len(micro_batches)} micro-batches; the engine accumulates {grad_accum}"
        )
    for mb in micro_batches:
        missing = [f for f in fields if getattr(mb, f) is None]
        if missing:
            raise ValueError(f"micro-batch is missing {missing}")


def loss_counts(micro_batches: Sequence[Experience]) -> tuple[list[float], list[float]]:
    """Per micro-batch: (response tokens, sequences with at least one response token)."""
    tokens = [float(mb.action_mask.sum()) for mb in micro_batches]
    seqs = [float(mb.action_mask.any(1).sum()) for mb in micro_batches]
    return tokens, seqs


def mean_weights(counts: Sequence[float], total: float, scale: float) -> list[float]:
    """``count * scale / total`` per micro-batch (0 where ``total`` is 0): the weights that turn
    micro-batch means into one mean over ``total`` items.

    Pure. For the loss, ``total`` is the mini-batch's count over every rank and ``scale`` is
    ``n_micro * world`` (``TrainEngine.micro_step`` divides each micro-batch loss by this rank's
    ``n_micro`` and DeepSpeed averages gradients over the ``world`` data-parallel ranks), so the
    gradient is that of the mean over the whole mini-batch whatever the rank layout, micro-batch
    count or token budget. With this rank's own ``total`` and ``scale = n_micro`` they give the
    rank's mean (the returned stats).
    """
    return [c * scale / total if total > 0 else 0.0 for c in counts]


def global_counts(tokens: Sequence[float], seqs: Sequence[float]) -> tuple[float, float]:
    """The mini-batch's response-token and valid-sequence counts summed over the data-parallel
    ranks (one small all-reduce; collective: every rank calls it once per mini-batch)."""
    tot = D.all_reduce_sum({"tokens": sum(tokens), "seqs": sum(seqs)})
    return tot["tokens"], tot["seqs"]


# --------------------------------------------------------------------------- actor
@dataclass(frozen=True)
class PolicyLossSpec:
    """How the actor's loss is reduced and whether it carries a KL term against the reference.

    ``reduction``: a ``kernels.ppo_policy_loss`` reduction; ``scale`` multiplies the loss (Dr.
    GRPO's ``1 / constant`` on ``seq_mean_token_sum``); ``kl_kind``: the KL term's estimator when
    ``ppo.kl.placement=loss`` (fused into the loss kernel) with a reference, else None;
    ``loss_type``: ``ppo`` | ``gspo`` | ``cispo`` (``algo.policy_loss``) and ``clip``: its
    ``(clip_low, clip_high)``, None for the actor's ``ppo.clip_low`` / ``clip_high``.
    ``kl_clamp``: k3's log-ratio bound (``ppo.kl.log_ratio_clamp``).
    """

    reduction: str = "token_mean"
    scale: float = 1.0
    kl_kind: str | None = None
    loss_type: str = "ppo"
    clip: tuple[float, float | None] | None = None
    kl_clamp: float = LOG_RATIO_CLAMP

    @classmethod
    def from_config(cls, cfg: PPOConfig) -> PolicyLossSpec:
        agg = cfg.resolved()[0]
        kl = cfg.ppo.kl
        kl_kind = kl.kind if kl.placement == "loss" and kl.needs_reference else None
        objective = (cfg.algo.policy_loss, cfg.algo.policy_clip(cfg.ppo))
        if agg == "seq_mean_token_sum_norm":
            const = cfg.algo.loss_agg_constant or cfg.rollout.max_new_tokens
            return cls("seq_mean_token_sum", 1.0 / const, kl_kind, *objective, kl.log_ratio_clamp)
        return cls(agg, 1.0, kl_kind, *objective, kl.log_ratio_clamp)


class ActorWorker:
    """The policy being trained: log-probs for experience, and PPO mini-batch updates.

    Args:
        model: an HF causal LM (``LlamaForCausalLM``-like), fp32 weights.
        optim: learning rate, AdamW betas/eps/weight decay, grad clip, warmup, ZeRO stage.
        algo: clip_low / clip_high / dual_clip and entropy_coef.
        train_micro_batch_size: samples per forward/backward on this rank, or a ``Batching``
            (token-budget micro-batches, packing; ``tritonrlhf.engine.rl.packing``).
        gradient_accumulation_steps: micro-batches per optimizer step (any count with a token budget).
        dtype: training dtype; default bf16 on GPU, fp32 on CPU.
        temperature: the rollout sampling temperature (log-probs use logits / T).
        total_updates: optimizer steps in the whole run (for ``lr_schedule=cosine``).
        loss: the reduction and the KL term (``PolicyLossSpec``); default: token mean, no KL term.
    """

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        algo: PPOAlgoConfig,
        train_micro_batch_size: int | Batching,
        gradient_accumulation_steps: int,
        dtype: torch.dtype | None = None,
        temperature: float = 1.0,
        total_updates: int | None = None,
        loss: PolicyLossSpec | None = None,
    ) -> None:
        from tritonrlhf.engine.models import disable_dropout

        disable_dropout(model)  # training forward == scoring forward: the first ratio is exactly 1
        self.algo = algo
        self.loss = loss or PolicyLossSpec()
        self.temperature = float(temperature)
        self.batching = Batching.of(train_micro_batch_size)
        if self.batching.packing:
            check_packable(model, "actor")
        self.micro_batch_size = self.batching.micro_batch_size
        self.train = TrainEngine(
            PolicyLogprobs(model),
            optim,
            self.micro_batch_size,
            gradient_accumulation_steps,
            dtype,
            total_updates,
        )

    @property
    def engine(self):
        """The DeepSpeed engine (wrapping ``PolicyLogprobs``)."""
        return self.train.engine

    @property
    def module(self) -> nn.Module:
        """The underlying HF causal LM (partitioned under ZeRO-3: gather before reading weights)."""
        return self.train.engine.module.lm

    @property
    def device(self) -> torch.device:
        return self.train.device

    @torch.no_grad()
    def logprobs(
        self, batch: Experience, micro_batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp [B, R], entropy [B, R]) float32 under the current weights, eval mode, on the batch's device.

        Micro-batches of ``micro_batch_size`` samples if given, else as ``self.batching`` says.
        """
        self.engine.eval()
        micro = batch.split(micro_batch_size) if micro_batch_size else self.batching.split(batch)
        outs = [
            self.engine(
                mb.sequences.to(self.device),
                mb.attention_mask.to(self.device),
                mb.response_len,
                self.temperature,
                self.batching.packing,
            )
            for mb in micro
        ]
        logp = torch.cat([o[0] for o in outs]).to(batch.sequences.device)
        ent = torch.cat([o[1] for o in outs]).to(batch.sequences.device)
        return logp, ent

    def train_minibatch(
        self,
        micro_batches: Sequence[Experience],
        kl_coef: float = 0.0,
        keep: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        tis_cap: float = 0.0,
        advantages_from: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        correction: RolloutCorrectionConfig | None = None,
    ) -> dict[str, float]:
        """One optimizer step over ``micro_batches`` (as many as gradient_accumulation_steps; any
        number with a token budget).

        ``advantages_from`` (one micro-batch, with ``keep``): called with this forward's detached
        ``(logp, entropy)`` before the loss, it returns the advantages (the trainer forms the
        rewards, with a KL that reads these old log-probs, between the forward and the backward).

        Each micro-batch needs ``advantages`` (and ``ref_logprobs`` with a KL term), and
        ``old_logprobs`` unless ``keep`` is given: then this forward's own log-probs are the old
        ones (ratio 1, as when the first update follows a scoring pass under the same weights)
        and each micro-batch's ``(logp, entropy)``, detached, is appended to ``keep``; with
        ``tis_cap`` > 0 the advantages are then scaled here by the truncated importance weights
        ``min(pi_old / pi_rollout, tis_cap)`` (which the trainer applies itself when it scored the
        old log-probs beforehand); ``correction`` (with ``keep``) replaces that truncation with
        ``rollout_correction_weights``. Loss = clipped PPO (or GSPO / CISPO) policy loss (with ``kl_coef`` x the KL term when ``loss.kl_kind``
        is set; reduced as ``loss`` says over the mini-batch) - entropy_coef x mean entropy.
        The loss is a mean over the whole mini-batch on every rank (``mean_weights``; one small
        all-reduce of its counts, so every rank calls this once per mini-batch). Returns this
        rank's means of policy_loss (the kernel's loss, KL term included), entropy,
        clipfrac, approx_kl, loss (and kl_loss with a KL term), plus grad_norm, lr and skipped
        (0/1, agreed on all ranks).
        """
        spec = self.loss
        if advantages_from is not None and (keep is None or len(micro_batches) != 1):
            raise ValueError("advantages_from needs keep and exactly one micro-batch")
        need = (
            (("advantages",) if advantages_from is None else ())
            + (("old_logprobs",) if keep is None else ())
            + (("ref_logprobs",) if spec.kl_kind else ())
        )
        tokens = self.batching.micro_batch_tokens > 0
        check_micro_batches(micro_batches, None if tokens else self.train.grad_accum, *need)
        if tokens:
            self.train.begin(len(micro_batches))
        a = self.algo
        clip_low, clip_high = spec.clip or (a.clip_low, a.clip_high)
        if correction is None and tis_cap > 0:
            correction = RolloutCorrectionConfig("truncate", "token", high=tis_cap)
        self.engine.train()
        sums: dict[str, float] = {}
        per_seq = spec.reduction != "token_mean"
        # w: the loss reduction's weights (tokens or sequences); wt: tokens, for the entropy bonus.
        # Both are shares of the mini-batch's counts over every rank, so the gradient is the mean
        # over the whole mini-batch however it is cut into ranks and micro-batches; sw, swt: this
        # rank's shares, for the stats (this rank's means).
        n = len(micro_batches)
        tok, seq = loss_counts(micro_batches)
        g_tok, g_seq = global_counts(tok, seq)
        scale = n * self.engine.dp_world_size
        counts, g_counts = (seq, g_seq) if per_seq else (tok, g_tok)
        weights = zip(
            mean_weights(counts, g_counts, scale),
            mean_weights(tok, g_tok, scale),
            mean_weights(counts, sum(counts), n),
            mean_weights(tok, sum(tok), n),
        )
        for mb, (w, wt, sw, swt) in zip(micro_batches, weights):
            mb = mb.to(self.device)
            logp, entropy = self.engine(
                mb.sequences, mb.attention_mask, mb.response_len, self.temperature, self.batching.packing
            )
            if keep is not None:
                keep.append((logp.detach(), entropy.detach()))
            old = mb.old_logprobs if keep is None else logp.detach()
            adv = mb.advantages if advantages_from is None else advantages_from(old, entropy.detach())
            adv = adv.to(self.device)
            if keep is not None and correction is not None:
                is_w = rollout_correction_weights(old, mb.rollout_logprobs, mb.action_mask.bool(), correction)
                adv = adv * is_w[0]
            kl = (
                kernels.KLLossTerm(mb.ref_logprobs, kl_coef, spec.kl_kind, spec.kl_clamp)
                if spec.kl_kind
                else None
            )
            pg_loss, st = kernels.ppo_policy_loss(
                logp,
                old,
                adv,
                mb.action_mask,
                clip_low=clip_low,
                clip_high=clip_high,
                dual_clip=a.dual_clip,
                reduction=spec.reduction,
                kl=kl,
                loss_type=spec.loss_type,
            )
            if spec.scale != 1.0:
                pg_loss = pg_loss * spec.scale
            ent = masked_mean(entropy, mb.action_mask)
            loss = pg_loss * w - a.entropy_coef * ent * wt if a.entropy_coef else pg_loss * w
            self.train.micro_step(loss, bool(torch.isfinite(loss)))
            for k, v, weight in (
                ("policy_loss", pg_loss, sw),
                ("entropy", ent, swt),
                ("clipfrac", st["clipfrac"], swt),
                ("approx_kl", st["approx_kl"], swt),
                *([("kl_loss", st["kl_loss"], swt)] if kl is not None else []),
            ):
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * weight
        stats = {k: v / n for k, v in sums.items()}
        stats["loss"] = stats["policy_loss"] - a.entropy_coef * stats["entropy"]
        stats.update(self.train.finish())
        return stats
