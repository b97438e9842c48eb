"""Frozen scorers: the reference policy's log-probs and the reward.

``ReferenceModel`` shares ``PolicyLogprobs`` with the actor, so reference and
policy log-probs come from the same code path (``tritonrlhf.kernels.linear_logprobs``).
``RewardScorer`` wraps either a Python function of texts or a sequence-
classification reward model scored at each sample's last real token, and
reports which scores are unusable instead of raising. A reward model with its
own tokenizer reads re-tokenized text (``tritonrlhf.engine.rl.reward_route``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tritonrlhf.engine import distributed as dist
from tritonrlhf.engine.rl.actor import PolicyLogprobs, base_model_of, position_ids_from_mask
from tritonrlhf.engine.rl.critic import reward_head_of
from tritonrlhf.engine.rl.experience import Experience
from tritonrlhf.engine.rl.packing import (
    Batching,
    check_packable,
    pack,
    packed_hidden,
    row_capacity,
)
from tritonrlhf.engine.rl.reward_route import RewardRoute, TextRoute

RewardFn = Callable[[list[str], list[str]], Sequence[float | None]]


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def partition_frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """ZeRO-3 inference: ``module``'s parameters partitioned over the data-parallel ranks.

    DeepSpeed hooks every submodule to gather its parameters for its forward and release them
    after, so a rank holds 1/world of the frozen weights plus one layer at a time. Every rank must
    then run the same number of forwards (the gathers are collectives), as the trainer ranks do
    on their equal shares. Returns the module itself (hooked).
    """
    import deepspeed

    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(model=module, config=cfg)
    return engine.module


class ReferenceModel:
    """The frozen reference policy: ``logprobs(batch, temperature) -> [B, R]`` float32.

    Holds full weights on one device, or with ``partition=True`` its 1/world share
    (``partition_frozen``, ZeRO-3 inference; ``placement.frozen_zero_stage=3``).
    ``micro_batch_size``: samples per forward, or a ``Batching`` (token budget, packing).
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str | None = None,
        micro_batch_size: int | Batching = 8,
        partition: bool = False,
    ) -> None:
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        from tritonrlhf.engine.models import disable_dropout

        self.batching = Batching.of(micro_batch_size)
        if self.batching.packing:
            check_packable(model, "reference")
        self.partition = partition
        disable_dropout(model)
        self.net = _freeze(PolicyLogprobs(model.to(self.device)))
        if partition:
            self.net = partition_frozen(self.net, next(model.parameters()).dtype)
        self.micro_batch_size = self.batching.micro_batch_size

    @property
    def module(self) -> nn.Module:
        return self.net.lm

    @torch.no_grad()
    def logprobs(self, batch: Experience, temperature: float = 1.0) -> torch.Tensor:
        """[B, R] log-probs of the response tokens under the reference policy, on the batch's device."""
        b = self.batching
        outs = [
            self.net(
                mb.sequences.to(self.device),
                mb.attention_mask.to(self.device),
                mb.response_len,
                temperature,
                b.packing,
            )[0]
            for mb in b.split(batch, agree=self.partition)  # ZeRO-3 gathers: as many forwards on every rank
        ]
        logp = torch.cat(outs).to(batch.sequences.device)
        return torch.where(batch.action_mask.bool().to(logp.device), logp, torch.zeros_like(logp))


class RewardScorer:
    """Scores finished samples from a function of texts or from a frozen reward model.

    ``score(prompts, responses, sequences, attention_mask) -> (scores[B] float32, valid[B] bool)``.
    A score that is None, non-finite or fails to parse is invalid: it is set to 0,
    ``valid`` is False there (the trainer drops the sample) and ``num_invalid``
    counts it. Valid scores are clipped to ``[-clip, clip]`` when ``clip > 0``.
    """

    def __init__(
        self,
        fn: RewardFn | None = None,
        model: nn.Module | None = None,
        clip: float = 0.0,
        device: torch.device | str | None = None,
        micro_batch_size: int | Batching = 8,
        text_route: TextRoute | None = None,
        partition: bool = False,
    ) -> None:
        if (fn is None) == (model is None):
            raise ValueError("RewardScorer needs exactly one of fn or model")
        self.fn = fn
        self.clip = float(clip)
        self.batching = Batching.of(micro_batch_size)
        self.micro_batch_size = self.batching.micro_batch_size
        self.partition = partition
        self.model = None
        self.text_route = text_route  # None: the model reads the policy's token ids
        if model is not None:
            self.device = torch.device(device) if device is not None else next(model.parameters()).device
            if self.batching.packing:
                check_packable(model, "reward model")
            self.model = _freeze(model.to(self.device))
            if partition:  # ZeRO-3 inference (placement.frozen_zero_stage=3): every submodule gathers its own
                self.model = partition_frozen(self.model, next(model.parameters()).dtype)
            self.head = reward_head_of(self.model)
            self.body = getattr(self.model, self.model.base_model_prefix, None) or base_model_of(self.model)
        self.num_scored = 0
        self.num_invalid = 0

    @classmethod
    def from_function(cls, fn: RewardFn, clip: float = 0.0) -> RewardScorer:
        return cls(fn=fn, clip=clip)

    @classmethod
    def from_model(
        cls, path_or_model: str | nn.Module, clip: float = 0.0, device: torch.device | str | None = None
    ) -> RewardScorer:
        """A reward model (``AutoModelForSequenceClassification``, one label) that shares the policy's tokenizer."""
        if isinstance(path_or_model, str):
            from transformers import AutoModelForSequenceClassification

            path_or_model = AutoModelForSequenceClassification.from_pretrained(
                path_or_model, torch_dtype=torch.float32
            )
        return cls(model=path_or_model, clip=clip, device=device)

    def token_scorer(self) -> RewardScorer:
        """This scorer reading token ids as given: for ids already in the reward model's own vocabulary."""
        if self.text_route is None:
            return self
        twin = copy.copy(self)
        twin.text_route = None
        return twin

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        sequences: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        finish_reasons: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [B] float32, valid [B] bool) on CPU; a function scorer needs only the texts.

        A reward function that takes a ``finish_reasons`` argument (or ``**kwargs``) also gets
        each response's ``"stop"`` / ``"length"`` (cut at ``max_new_tokens``).
        """
        if self.fn is not None:
            kwargs = {}
            if finish_reasons is not None and _accepts(self.fn, "finish_reasons"):
                kwargs["finish_reasons"] = list(finish_reasons)
            raw = list(self.fn(list(prompts), list(responses), **kwargs))
            if len(raw) != len(prompts):
                raise ValueError(f"reward function returned {len(raw)} scores for {len(prompts)} samples")
            values = [_as_float(r) for r in raw]
        else:
            values = self._route_scores(prompts, responses, sequences, attention_mask, finish_reasons)
        scores = torch.tensor(values, dtype=torch.float32)
        valid = torch.isfinite(scores)
        scores = torch.where(valid, scores, torch.zeros_like(scores))
        if self.clip > 0:
            scores = scores.clamp(-self.clip, self.clip)
        self.num_scored += len(values)
        self.num_invalid += int((~valid).sum())
        return scores, valid

    def score_samples(self, samples: Sequence[Any], tokenizer: Any) -> None:
        """Set ``score`` and ``score_valid`` of rollout ``Sample``s in place (``score`` semantics)."""
        from tritonrlhf.engine.rl.experience import collate_samples

        if not samples:
            return
        rb = collate_samples(list(samples), tokenizer, tokenizer.pad_token_id)
        scores, valid = self.score(
            rb.prompts, rb.responses, rb.sequences, rb.attention_mask, rb.finish_reasons
        )
        for i, s in enumerate(samples):
            s.score, s.score_valid = float(scores[i]), bool(valid[i])

    def _route_scores(self, prompts, responses, sequences, attention_mask, finish_reasons) -> list[float]:
        """The model's scores on the policy's ids (token route) or on the re-tokenized texts (text route)."""
        if self.text_route is None:
            if sequences is None or attention_mask is None:
                raise ValueError("a reward-model scorer needs sequences and attention_mask")
            return self._model_scores(sequences, attention_mask).tolist()
        ids, mask, ok = self.text_route.encode(prompts, responses, finish_reasons)
        values = self._model_scores(ids, mask)
        return torch.where(ok, values, torch.full_like(values, math.nan)).tolist()

    @torch.no_grad()
    def _model_scores(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] reward-model outputs at each row's last real token (float32, CPU).

        Packed (``batching.packing``): NaN (invalid) for a row with no real token.
        """
        b = self.batching
        # ZeRO-3 (partition) gathers in each forward: as many forwards on every rank.
        groups = b.groups(attention_mask, agree=self.partition)
        chunks = [(sequences[g], attention_mask[g]) for g in groups]
        outs = []
        for ids, am in chunks:
            ids, am = ids.to(self.device), am.to(self.device)
            if b.packing:
                outs.append(self._packed_scores(ids, am))
                continue
            out = self.body(
                input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am), use_cache=False
            )
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            pos = torch.arange(am.shape[1], device=am.device).expand_as(am)
            last = torch.where(am.bool(), pos, torch.zeros_like(pos)).max(dim=1).values
            h = hidden[torch.arange(ids.shape[0], device=ids.device), last]
            outs.append(self.head(h).squeeze(-1).float().cpu())
        return torch.cat(outs)

    def _packed_scores(self, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        """[B] scores at each row's last real token from one packed forward (NaN for an empty row)."""
        pk = pack(ids, am, row_capacity(self.body, am))
        last = pk.slot.max(1).values  # slots rise along a sample's real tokens; -1 on padding
        has = last >= 0
        h = packed_hidden(self.body, pk)[last[has]]
        out = torch.full((ids.shape[0],), float("nan"))
        out[has.cpu()] = self.head(h).squeeze(-1).float().cpu()
        return out


def _accepts(fn: Any, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (by name, or through ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _as_float(x: object) -> float:
    """A reward value as a float; None / unparsable / non-finite -> NaN (invalid)."""
    if x is None:
        return math.nan
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def build_scoring(
    cfg: Any, policy_dir: str, dtype: torch.dtype, device: torch.device, route: RewardRoute | None = None
) -> tuple:
    """The frozen roles of a PPO config: ``(ReferenceModel | None, RewardScorer)`` on ``device``.

    Used by the trainer ranks, or by the rollout ranks under ``placement.scoring=rollout``. The
    reference is None when the KL does not act and is not asked for (``ppo.kl.needs_reference``).
    ``route``: how a reward model reads samples (``resolve_reward_route``; the token route if None).
    """
    from tritonrlhf.engine.models import load_causal_lm, load_reward_model
    from tritonrlhf.engine.tasks import load_callable

    attn, mb = cfg.model.attn_implementation, Batching.from_config(cfg.ppo)
    part = cfg.placement.frozen_zero_stage == 3  # trainer ranks of a colocate launch only (validated)
    if part:
        print(f"[scoring] reference and reward partitioned over {dist.world_size()} ranks (ZeRO-3 inference)")
    ref = None
    if cfg.ppo.kl.needs_reference:
        ref = ReferenceModel(load_causal_lm(policy_dir, dtype, attn, device), device, mb, partition=part)
    if cfg.reward.kind == "function":
        return ref, RewardScorer.from_function(load_callable(cfg.reward.function), clip=cfg.reward.clip)
    rm = load_reward_model(cfg.reward.model_path, dtype, attn, device)
    text = route.text if route is not None else None
    rmb = dataclasses.replace(
        mb, micro_batch_size=8
    )  # the reward model's forwards: 8 samples unless a budget
    scorer = RewardScorer(
        model=rm, clip=cfg.reward.clip, device=device, micro_batch_size=rmb, text_route=text, partition=part
    )
    return ref, scorer
