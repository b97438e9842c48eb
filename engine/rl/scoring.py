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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tritonrlhf.engine import distributed as dist
from tritonrlhf.engine.rewards.functions import RewardFunctions, RewardTerm, as_score, reward_functions
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


@dataclass
class Scored:
    """One batch's rewards as the trainer takes them.

    scores: [B] float32, clipped, 0 where invalid; valid: [B] bool.
    parts:  name -> [B] float32 each reward function's own score (NaN: none), with several functions.
    info:   [B] per-sample dicts a reward function returned (``RewardBatch.info``), or None.
    errors, timeouts: reward functions that raised / ran past ``reward.timeout_s`` on this batch.
    """

    scores: torch.Tensor
    valid: torch.Tensor
    parts: dict[str, torch.Tensor] | None = None
    info: list[dict[str, Any] | None] | None = None
    errors: int = 0
    timeouts: int = 0

    def set_on(self, samples: Sequence[Any]) -> None:
        """Copy each sample's share onto rollout ``Sample``s (``score``, ``score_valid``, parts, info)."""
        for i, s in enumerate(samples):
            s.score, s.score_valid = float(self.scores[i]), bool(self.valid[i])
            s.reward_parts = {k: float(v[i]) for k, v in self.parts.items()} if self.parts else None
            s.reward_info = self.info[i] if self.info else None

    def stats(self) -> dict[str, float]:
        """``reward/<name>`` (each function's mean over the samples it scored) and the failure counts."""
        return {
            "reward/errors": float(self.errors),
            "reward/timeouts": float(self.timeouts),
            **part_means(self.parts),
        }


def part_means(parts: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """``reward/<name>``: each reward function's mean over the samples it scored (NaN where none)."""
    out = {}
    for name, v in (parts or {}).items():
        ok = torch.isfinite(v)
        out[f"reward/{name}"] = float(v[ok].mean()) if ok.any() else float("nan")
    return out


class PendingScore:
    """A batch being scored (``RewardScorer.submit``): a pool of reward functions works on it
    while the caller runs its forwards; ``result()`` waits for it."""

    def __init__(self, finish: Callable[[], Scored]) -> None:
        self._finish = finish
        self._result: Scored | None = None

    def result(self) -> Scored:
        if self._result is None:
            self._result = self._finish()
        return self._result


class RewardScorer:
    """Scores finished samples with reward functions of texts (``tritonrlhf.engine.rewards``: record
    columns as keyword arguments, several weighted functions, a worker pool, HTTP) or with a frozen
    reward model.

    ``score(prompts, responses, sequences, attention_mask) -> (scores[B] float32, valid[B] bool)``;
    ``score_detailed`` / ``submit`` also give each function's part and per-sample info.
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
        functions: RewardFunctions | None = None,
    ) -> None:
        if sum(x is not None for x in (fn, model, functions)) != 1:
            raise ValueError("RewardScorer needs exactly one of fn, functions or model")
        if fn is not None:
            functions = RewardFunctions([RewardTerm(getattr(fn, "__name__", "reward"), fn)])
        self.functions = functions
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
        columns: dict[str, list[Any]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [B] float32, valid [B] bool) on CPU; a function scorer needs only the texts.

        Reward functions get each response's ``finish_reasons`` (``"stop"`` / ``"length"``, cut at
        ``max_new_tokens``) and the prompt records' ``columns`` as keyword arguments, where they take
        them (``tritonrlhf.engine.rewards``).
        """
        out = self.score_detailed(prompts, responses, sequences, attention_mask, finish_reasons, columns)
        return out.scores, out.valid

    def submit(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        sequences: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        finish_reasons: Sequence[str] | None = None,
        columns: dict[str, list[Any]] | None = None,
    ) -> PendingScore:
        """Start scoring (reward functions in a pool run meanwhile; a reward model scores now)."""
        if self.functions is None:
            values = self._route_scores(prompts, responses, sequences, attention_mask, finish_reasons)
            done = self._finish(values)
            return PendingScore(lambda: done)
        pending = self.functions.submit(prompts, responses, columns, finish_reasons)

        def finish() -> Scored:
            got = pending.result()
            parts = None
            if len(self.functions.terms) > 1:
                parts = {k: torch.tensor(v, dtype=torch.float32) for k, v in got.parts.items()}
            info = got.info if any(got.info) else None
            return self._finish(got.scores, parts, info, got.errors, got.timeouts)

        return PendingScore(finish)

    @property
    def in_background(self) -> bool:
        """Whether ``submit`` returns before the scores exist (a worker pool or an HTTP endpoint), so
        a caller gains by submitting before its other work."""
        return self.functions is not None and self.functions.background

    def score_detailed(self, *args: Any, **kwargs: Any) -> Scored:
        """``submit(...).result()``: scores, validity, each function's part and per-sample info."""
        return self.submit(*args, **kwargs).result()

    def _finish(
        self, values: Sequence[float], parts=None, info=None, errors: int = 0, timeouts: int = 0
    ) -> Scored:
        scores = torch.tensor([as_score(v) for v in values], dtype=torch.float32)
        valid = torch.isfinite(scores)
        scores = torch.where(valid, scores, torch.zeros_like(scores))
        if self.clip > 0:
            scores = scores.clamp(-self.clip, self.clip)
        self.num_scored += len(values)
        self.num_invalid += int((~valid).sum())
        return Scored(scores, valid, parts, info, errors, timeouts)

    def score_samples(self, samples: Sequence[Any], tokenizer: Any) -> Scored | None:
        """Score rollout ``Sample``s in place (``score``, ``score_valid``, the parts and info); returns
        the batch's ``Scored`` (None without samples)."""
        from tritonrlhf.engine.rl.experience import collate_samples

        if not samples:
            return None
        rb = collate_samples(list(samples), tokenizer, tokenizer.pad_token_id)
        out = self.score_detailed(
            rb.prompts, rb.responses, rb.sequences, rb.attention_mask, rb.finish_reasons, rb.columns
        )
        out.set_on(samples)
        return out

    def close(self) -> None:
        """Stop the reward functions' worker pool, if any."""
        if self.functions is not None:
            self.functions.close()

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


def build_scoring(
    cfg: Any, policy_dir: str, dtype: torch.dtype, device: torch.device, route: RewardRoute | None = None
) -> tuple:
    """The frozen roles of a PPO config: ``(ReferenceModel | None, RewardScorer)`` on ``device``.

    Used by the trainer ranks, or by the rollout ranks under ``placement.scoring=rollout``. The
    reference is None when the KL does not act and is not asked for (``ppo.kl.needs_reference``).
    ``route``: how a reward model reads samples (``resolve_reward_route``; the token route if None).
    """
    from tritonrlhf.engine.models import load_causal_lm, load_reward_model

    attn, mb = cfg.model.attn_implementation, Batching.from_config(cfg.ppo)
    part = cfg.placement.frozen_zero_stage == 3  # trainer ranks of a colocate launch only (validated)
    if part:
        print(f"[scoring] reference and reward partitioned over {dist.world_size()} ranks (ZeRO-3 inference)")
    ref = None
    if cfg.ppo.kl.needs_reference:
        ref = ReferenceModel(load_causal_lm(policy_dir, dtype, attn, device), device, mb, partition=part)
    if cfg.reward.kind in ("function", "http"):
        return ref, RewardScorer(functions=reward_functions(cfg.reward), clip=cfg.reward.clip)
    rm = load_reward_model(cfg.reward.model_path, dtype, attn, device)
    text = route.text if route is not None else None
    rmb = dataclasses.replace(
        mb, micro_batch_size=8
    )  # the reward model's forwards: 8 samples unless a budget
    scorer = RewardScorer(
        model=rm, clip=cfg.reward.clip, device=device, micro_batch_size=rmb, text_route=text, partition=part
    )
    return ref, scorer
