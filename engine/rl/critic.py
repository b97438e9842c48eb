"""The critic: a transformer with a scalar value head, trained with the clipped value loss.

``ValueModel`` gives a value per position; ``CriticWorker`` takes the values at
positions P-1 .. P+R-2 (the state before each response token, the same
positions whose hidden states predict the response) and trains them toward the
GAE returns with ``kernels.ppo_value_loss``. The DeepSpeed setup and the
non-finite step guard are shared with the actor (``tritonrlhf.engine.rl.train_engine.TrainEngine``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from tritonrlhf import kernels
from tritonrlhf.engine.config import OptimConfig, PPOAlgoConfig
from tritonrlhf.engine.rl.actor import (
    base_model_of,
    check_micro_batches,
    global_counts,
    loss_counts,
    mean_weights,
    position_ids_from_mask,
)
from tritonrlhf.engine.rl.experience import Experience, masked_mean
from tritonrlhf.engine.rl.packing import Batching, check_packable, response_hidden, unflatten
from tritonrlhf.engine.rl.train_engine import TrainEngine


class ValueModel(nn.Module):
    """A transformer backbone plus ``value_head = Linear(H, 1)``.

    ``forward(input_ids[B, T], attention_mask[B, T])`` -> values [B, T] float32.
    Positions count real tokens only (``position_ids_from_mask``), as in the actor.
    ``forward(..., response_len=R)`` -> values [B, R] at positions P-1 .. P+R-2 only, computed on
    the packed real tokens (``tritonrlhf.engine.rl.packing``), zeros where the padded forward reads padding.
    """

    def __init__(self, backbone: nn.Module, hidden_size: int, head_init_std: float | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = getattr(backbone, "config", None)
        self.value_head = nn.Linear(hidden_size, 1)
        std = 1.0 / (hidden_size + 1) if head_init_std is None else head_init_std
        nn.init.normal_(self.value_head.weight, std=std)
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int | None = None
    ) -> torch.Tensor:
        if response_len is not None:
            hidden, valid = response_hidden(self.backbone, input_ids, attention_mask, response_len)
            return unflatten(self.value_head(hidden).squeeze(-1).float(), valid)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()

    @classmethod
    def from_policy(cls, path_or_model: str | nn.Module, head_init_std: float | None = None) -> ValueModel:
        """Backbone from a causal LM (a checkpoint path, or a model that is deep-copied) and a fresh head."""
        if isinstance(path_or_model, str):
            from transformers import AutoModelForCausalLM

            lm = AutoModelForCausalLM.from_pretrained(path_or_model, torch_dtype=torch.float32)
        else:
            lm = copy.deepcopy(path_or_model)
        return cls(base_model_of(lm), lm.config.hidden_size, head_init_std)

    @classmethod
    def from_reward_model(cls, path_or_model: str | nn.Module) -> ValueModel:
        """Backbone and the ``score`` head of an ``AutoModelForSequenceClassification`` with one label."""
        if isinstance(path_or_model, str):
            from transformers import AutoModelForSequenceClassification

            rm = AutoModelForSequenceClassification.from_pretrained(path_or_model, torch_dtype=torch.float32)
        else:
            rm = copy.deepcopy(path_or_model)
        score = reward_head_of(rm)
        model = cls(getattr(rm, rm.base_model_prefix), rm.config.hidden_size)
        with torch.no_grad():
            model.value_head.weight.copy_(score.weight)
            if score.bias is not None:
                model.value_head.bias.copy_(score.bias)
            else:
                model.value_head.bias.zero_()
        return model


def check_critic_init(init_from: str, reward_kind: str, policy_tokenizer: object, route: object) -> None:
    """Refuse, before any weights load, a critic that would not read the policy's token ids.

    ``critic.init_from=reward`` needs a reward model whose tokenizer is the policy's
    (``route.differences`` empty, ``tritonrlhf.engine.rl.reward_route``); a checkpoint path needs an embedding
    with a row for every id the policy can emit.
    """
    from tritonrlhf.engine.config import ConfigError

    if init_from == "reward":
        if reward_kind != "model":
            raise ConfigError("critic.init_from=reward needs reward.kind=model")
        diffs = getattr(route, "differences", None)
        if diffs:
            raise ConfigError(
                "critic.init_from=reward: the reward model's tokenizer differs from the policy's "
                f"({', '.join(diffs)}), but the critic reads the policy's token ids; use "
                "critic.init_from=policy, or critic.init_from=<path> of a value/reward checkpoint "
                "trained on the policy's tokenizer"
            )
    elif init_from != "policy":
        from tritonrlhf.engine.models import check_tokenizer_matches, require_checkpoint_kind

        config = require_checkpoint_kind(init_from, "critic.init_from", "seq_cls")
        try:
            check_tokenizer_matches(policy_tokenizer, config)
        except ConfigError as e:
            raise ConfigError(
                f"critic.init_from={init_from}: the critic reads the policy's token ids, but {e}; "
                "use critic.init_from=policy or a checkpoint trained on the policy's tokenizer"
            ) from e


def reward_head_of(rm: nn.Module) -> nn.Linear:
    """The scalar head of an HF sequence-classification model (``score`` or ``classifier``)."""
    head = getattr(rm, "score", None) or getattr(rm, "classifier", None)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise ValueError(f"{type(rm).__name__}: expected a Linear(H, 1) `score` head, got {head}")
    return head


class CriticWorker:
    """The value function being trained: values for experience, and value-loss mini-batch updates.

    Args mirror ``ActorWorker``; ``algo.value_clip`` (None disables) and
    ``algo.vf_coef`` shape the loss.
    """

    def __init__(
        self,
        model: ValueModel,
        optim: OptimConfig,
        algo: PPOAlgoConfig,
        train_micro_batch_size: int | Batching,
        gradient_accumulation_steps: int,
        dtype: torch.dtype | None = None,
        total_updates: int | None = None,
    ) -> None:
        from tritonrlhf.engine.models import disable_dropout

        disable_dropout(model)  # values under training equal values under scoring
        self.algo = algo
        self.batching = Batching.of(train_micro_batch_size)
        if self.batching.packing:
            check_packable(model.backbone, "critic")
        self.micro_batch_size = self.batching.micro_batch_size
        self.train = TrainEngine(
            model, optim, self.micro_batch_size, gradient_accumulation_steps, dtype, total_updates
        )

    @property
    def engine(self):
        return self.train.engine

    @property
    def module(self) -> ValueModel:
        return self.train.engine.module

    @property
    def device(self) -> torch.device:
        return self.train.device

    @torch.no_grad()
    def calibrate(self, shift: float, scale: float) -> None:
        """Map the value head affinely so every value ``v`` becomes ``(v - shift) / scale``.

        weight <- weight / scale, bias <- (bias - shift) / scale: on the module's parameters
        (gathered and re-partitioned under ZeRO-3) and on the optimizer's fp32 master copies
        (ZeRO 1-3 and bf16 keep their own), so the next update starts from the mapped head.
        Identical on every rank given identical arguments. Part of the engine's checkpoint.
        """
        import deepspeed

        if not (scale > 0 and math.isfinite(scale) and math.isfinite(shift)):
            raise ValueError(f"calibrate: need a finite shift and a finite scale > 0, got {shift}, {scale}")
        head = self.module.value_head
        params = [head.weight, head.bias]
        zero3 = any(hasattr(p, "ds_id") for p in params)
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if zero3 else nullcontext()
        with gather:
            new = [head.weight.float() / scale, (head.bias.float() - shift) / scale]
            for p, v in zip(params, new):
                p.data.copy_(v.to(p.dtype))
        for p, v in zip(params, new):
            deepspeed.utils.safe_set_full_fp32_param(p, v)

    def _response_values(self, mb: Experience) -> torch.Tensor:
        P, R = mb.prompt_len, mb.response_len
        seq, am = mb.sequences.to(self.device), mb.attention_mask.to(self.device)
        if self.batching.packing:
            return self.engine(seq, am, R)
        return self.engine(seq, am)[:, P - 1 : P - 1 + R]

    @torch.no_grad()
    def values(self, batch: Experience, micro_batch_size: int | None = None) -> torch.Tensor:
        """[B, R] float32 values of the state before each response token (eval mode), on the batch's device."""
        self.engine.eval()
        micro = batch.split(micro_batch_size) if micro_batch_size else self.batching.split(batch)
        outs = [self._response_values(mb) for mb in micro]
        values = torch.cat(outs).to(batch.sequences.device)
        return torch.where(batch.action_mask.bool(), values, torch.zeros_like(values))

    def train_minibatch(
        self,
        micro_batches: Sequence[Experience],
        returns_from: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> dict[str, float]:
        """One optimizer step on ``vf_coef * ppo_value_loss`` (needs ``values`` and ``returns``).

        ``returns_from`` (one micro-batch): called with this forward's detached values before the
        loss, it returns ``(old values, returns)`` (the trainer forms the advantages from them,
        and may run the actor's update meanwhile).

        Returns this rank's means of value_loss, values, the kernel's stats (``vf_``-prefixed), plus
        grad_norm, lr, skipped.
        """
        tokens = self.batching.micro_batch_tokens > 0
        if returns_from is not None and len(micro_batches) != 1:
            raise ValueError("returns_from needs exactly one micro-batch")
        need = ("values", "returns") if returns_from is None else ()
        check_micro_batches(micro_batches, None if tokens else self.train.grad_accum, *need)
        if tokens:
            self.train.begin(len(micro_batches))
        self.engine.train()
        sums: dict[str, float] = {}
        # The value loss is a token mean over the whole mini-batch (on every rank); stats per rank.
        n = len(micro_batches)
        tok, seq = loss_counts(micro_batches)
        g_tok, _ = global_counts(tok, seq)
        weights = zip(mean_weights(tok, g_tok, n * self.engine.dp_world_size), mean_weights(tok, sum(tok), n))
        for mb, (w, sw) in zip(micro_batches, weights):
            mb = mb.to(self.device)
            values = self._response_values(mb)
            old, returns = (mb.values, mb.returns) if returns_from is None else returns_from(values.detach())
            vloss, st = kernels.ppo_value_loss(
                values,
                old.to(self.device),
                returns.to(self.device),
                mb.action_mask,
                clip=self.algo.value_clip,
                reduction="token_mean",
            )
            loss = self.algo.vf_coef * vloss
            self.train.micro_step(loss * w, bool(torch.isfinite(loss)))
            parts = {"value_loss": vloss, "values": masked_mean(values, mb.action_mask)}
            parts.update({k if k.startswith("vf_") else f"vf_{k}": v for k, v in st.items()})
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * sw
        stats = {k: v / n for k, v in sums.items()}
        stats.update(self.train.finish())
        return stats
