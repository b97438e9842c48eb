"""The reward-model stage: a scalar head on the SFT checkpoint, trained with the Bradley-Terry loss.

The model is ``AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1)``:
the SFT backbone plus a fresh ``score`` head, re-initialised here as
N(0, std) (default std = 1 / (H + 1), as the critic's value head) so rewards start
near zero whatever transformers' default init does. A sequence
``<bos> prompt response <eos>`` (the layout every stage uses) is scored at its
last real token, from the attention mask, exactly as ``tritonrlhf.engine.rl.scoring`` scores
PPO rollouts. The checkpoint's ``config.json`` records that layout (``rm_layout: plain``), so the
text route scores plain prompts in it even when the tokenizer has a chat template.

Loss per pair: ``-log sigmoid(r_chosen - r_rejected - margin)``, with ``margin``
from ``train.margin`` plus, with ``train.margin_from_data``, each record's numeric
``margin`` field. Pairs whose chosen and rejected texts are equal are dropped and
counted. Held-out pairs give the pairwise accuracy and the mean margin
``r_chosen - r_rejected``; records with ``gold_chosen``/``gold_rejected`` (the demo
task) also give the accuracy against the gold ordering.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tritonrlhf.engine import distributed as D
from tritonrlhf.engine.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    QuietLoggingConfig,
    StageConfig,
    check_choice,
    load_config,
)
from tritonrlhf.engine.data import DataError, PromptSampler
from tritonrlhf.engine.models import require_checkpoint_kind
from tritonrlhf.engine.stages.common import (
    EncodeStats,
    LoopState,
    eval_due,
    finish_stage,
    log_due,
    pad_right,
    setup_resumable_stage,
    split_eval,
    tokenize_preference_pairs,
    validate_stage,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# --------------------------------------------------------------------------- config
@dataclass
class RMDataConfig:
    """Preference pairs: a JSONL of ``{"prompt", "chosen", "rejected"}`` (optional numeric ``margin``)."""

    train: str = "data/demo/preferences.jsonl"
    eval_size: int = 256  # pairs held out for accuracy / margin (0: none)
    max_len: int = 64  # prompt + response tokens (incl. bos/eos); longer responses are cut
    max_prompt_len: int = 48
    on_long_prompt: str = "truncate"  # truncate | drop
    shuffle: bool = True


@dataclass
class RMTrainConfig:
    batch_size: int = 32  # pairs per optimizer step, across all ranks
    micro_batch_size: int = 32  # pairs per rank per forward/backward
    eval_every: int = 100
    log_every: int = 10
    margin: float = 0.0  # loss = -log sigmoid(r_chosen - r_rejected - margin)
    margin_from_data: bool = False  # add each record's numeric "margin" field to ``margin``
    head_init_std: float = 0.0  # score head N(0, std); 0: 1 / (hidden_size + 1)


@dataclass
class RMConfig(StageConfig):
    """Reward modelling: a scalar head on the SFT checkpoint, Bradley-Terry loss on preference pairs."""

    output_dir: str = "runs/rm"
    total_steps: int = 300
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path="runs/sft"))
    data: RMDataConfig = field(default_factory=RMDataConfig)
    train: RMTrainConfig = field(default_factory=RMTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20))
    logging: QuietLoggingConfig = field(default_factory=QuietLoggingConfig)

    def validate(self, world_size: int = 1) -> None:
        validate_stage(self, world_size)
        check_choice("data.on_long_prompt", self.data.on_long_prompt, ("truncate", "drop"))
        if not 2 <= self.data.max_prompt_len < self.data.max_len:
            raise ConfigError(
                f"data.max_prompt_len={self.data.max_prompt_len} must be in [2, data.max_len={self.data.max_len})"
            )
        if not self.model.path:
            raise ConfigError("model.path must name the SFT checkpoint the reward model starts from")
        if self.train.head_init_std < 0:
            raise ConfigError(f"train.head_init_std must be >= 0, got {self.train.head_init_std}")
        if not Path(self.data.train).exists():
            raise ConfigError(f"data.train: file does not exist: {self.data.train}")


# --------------------------------------------------------------------------- pairs and batches
@dataclass
class PairExample:
    """One tokenized pair; ``gold_*`` are NaN when the record has no gold scores."""

    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    gold_chosen: float = math.nan
    gold_rejected: float = math.nan


@dataclass
class RMBatch:
    """B pairs as 2B right-padded rows: chosen rows 0..B-1, then rejected rows B..2B-1.

    input_ids:      [2B, T] long
    attention_mask: [2B, T] long, 1 = real token
    margin:         [B] float32, subtracted from r_chosen - r_rejected in the loss
    gold_order:     [B] float32, 1 if gold prefers chosen, 0 if rejected, NaN if unknown or tied
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    margin: torch.Tensor
    gold_order: torch.Tensor


def rm_collate(pairs: Sequence[PairExample], pad_id: int) -> RMBatch:
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids = pad_right(rows, pad_id)
    am = pad_right([[1] * len(r) for r in rows], 0, ids.shape[1])
    gold = [
        math.nan
        if math.isnan(p.gold_chosen) or math.isnan(p.gold_rejected) or p.gold_chosen == p.gold_rejected
        else float(p.gold_chosen > p.gold_rejected)
        for p in pairs
    ]
    return RMBatch(
        ids,
        am,
        torch.tensor([p.margin for p in pairs], dtype=torch.float32),
        torch.tensor(gold, dtype=torch.float32),
    )


# --------------------------------------------------------------------------- loss
def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean of ``-log sigmoid(r_chosen - r_rejected - margin)`` over [B] pairs, and stats.

    Stats (detached): ``accuracy`` (r_chosen > r_rejected; ties count 1/2) and
    ``margin`` (mean r_chosen - r_rejected).
    """
    diff = r_chosen.float() - r_rejected.float()
    loss = -F.logsigmoid(diff - margin).mean()
    d = diff.detach()
    acc = ((d > 0).float() + 0.5 * (d == 0).float()).mean()
    return loss, {"accuracy": acc, "margin": d.mean()}


class RewardScores(nn.Module):
    """``forward(input_ids[N, T], attention_mask[N, T]) -> [N]`` float32 scores at each row's last real token.

    Wraps an HF sequence classifier (``model.score`` a Linear(H, 1)); pooling by the
    attention mask, not by the pad id, so a tokenizer whose pad is its eos still works.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        from tritonrlhf.engine.rl.critic import reward_head_of

        reward_head_of(model)  # checks the head is a Linear(H, 1)
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from tritonrlhf.engine.rl.actor import base_model_of, position_ids_from_mask
        from tritonrlhf.engine.rl.critic import reward_head_of

        out = base_model_of(self.model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        pos = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
        last = torch.where(attention_mask.bool(), pos, torch.zeros_like(pos)).max(dim=1).values
        h = hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last]
        return reward_head_of(self.model)(h).squeeze(-1).float()


# --------------------------------------------------------------------------- data
def load_pairs(
    cfg: RMDataConfig, train: RMTrainConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[PairExample], EncodeStats]:
    """Read, check and tokenize preference pairs; identical pairs are dropped and counted."""
    tokenized, stats, n_records = tokenize_preference_pairs(
        cfg.train, tokenizer, cfg.max_len, cfg.max_prompt_len, cfg.on_long_prompt
    )
    pairs = []
    for tp in tokenized:
        margin = float(train.margin)
        if train.margin_from_data:
            m = tp.record.get("margin")
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
                raise DataError(
                    f"{tp.where}: train.margin_from_data=true needs a numeric 'margin', got {m!r}"
                )
            margin += float(m)
        gold = [tp.record.get(k) for k in ("gold_chosen", "gold_rejected")]
        gold = [
            float(g) if isinstance(g, (int, float)) and not isinstance(g, bool) else math.nan for g in gold
        ]
        pairs.append(PairExample(tp.prompt + tp.chosen, tp.prompt + tp.rejected, margin, *gold))
    if len(pairs) < 2:
        raise DataError(
            f"{cfg.train}: only {len(pairs)} usable pairs of {n_records} "
            f"(dropped: {stats.as_metrics()}); need at least 2"
        )
    return pairs, stats


# --------------------------------------------------------------------------- model
def load_rm_model(cfg: RMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The SFT checkpoint as a one-label sequence classifier with a re-initialised score head."""
    from transformers import AutoModelForSequenceClassification

    from tritonrlhf.engine.models import (
        check_tokenizer_matches,
        load_tokenizer,
        resolve_attn_implementation,
        resolve_dtype,
    )
    from tritonrlhf.engine.rl.critic import reward_head_of
    from tritonrlhf.engine.rl.reward_route import RM_LAYOUT_KEY

    path = cfg.model.path
    require_checkpoint_kind(path, "model.path", "causal_lm")
    tokenizer = load_tokenizer(cfg.model.tokenizer or path, role="model.tokenizer")
    dtype = resolve_dtype(cfg.model.dtype)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=1,
        dtype=dtype,
        attn_implementation=resolve_attn_implementation(cfg.model.attn_implementation, dtype=dtype),
        output_loading_info=True,
    )
    head = reward_head_of(model)
    head_names = {n for n, p in model.named_parameters() if any(p is q for q in head.parameters())}
    backbone_missing = [k for k in info["missing_keys"] if k not in head_names]
    if backbone_missing:
        raise ValueError(
            f"model.path: {path}: backbone weights missing from the checkpoint: {backbone_missing[:5]}"
        )
    check_tokenizer_matches(tokenizer, model.config)
    std = cfg.train.head_init_std or 1.0 / (model.config.hidden_size + 1)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        nn.init.normal_(head.weight, std=std)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    # Recorded in every checkpoint this stage writes (config.json): the pairs' layout, which a reward
    # model with its own tokenizer is then scored in (engine.rl.reward_route), chat template or not.
    setattr(model.config, RM_LAYOUT_KEY, "plain")
    return model.train(), tokenizer


# --------------------------------------------------------------------------- the stage
def _scores(engine: Any, b: RMBatch) -> tuple[torch.Tensor, torch.Tensor]:
    r = engine(b.input_ids.to(engine.device), b.attention_mask.to(engine.device))
    B = b.margin.shape[0]
    return r[:B], r[B:]


@torch.no_grad()
def evaluate(engine: Any, batches: Sequence[RMBatch]) -> dict[str, float]:
    """Held-out loss, accuracy, mean margin and, over pairs whose gold scores are known and differ:
    the RM's agreement with the gold order (``eval/accuracy_vs_gold``) and the gold scorer's own
    accuracy on the held-out labels (``eval/gold_label_accuracy``, the ceiling for
    ``eval/accuracy`` when labels carry Bradley-Terry noise)."""
    engine.eval()
    rc_all, rr_all, m_all, gold_all = [], [], [], []
    for b in batches:
        rc, rr = _scores(engine, b)
        rc_all.append(rc.cpu())
        rr_all.append(rr.cpu())
        m_all.append(b.margin)
        gold_all.append(b.gold_order)
    engine.train()
    rc, rr, m, gold = (torch.cat(x) for x in (rc_all, rr_all, m_all, gold_all))
    loss, st = bradley_terry_loss(rc, rr, m)
    out = {
        "eval/loss": float(loss),
        "eval/accuracy": float(st["accuracy"]),
        "eval/margin": float(st["margin"]),
        "eval/reward_mean": float(torch.cat([rc, rr]).mean()),
        "eval/reward_std": float(torch.cat([rc, rr]).std()),
    }
    known = ~torch.isnan(gold)
    if known.any():
        pred = (rc > rr).float()[known]
        out["eval/accuracy_vs_gold"] = float((pred == gold[known]).float().mean())
        # The ceiling: how often the gold scorer itself agrees with these (noisy) held-out labels.
        out["eval/gold_label_accuracy"] = float(gold[known].mean())
        out["eval/gold_pairs"] = float(known.sum())
    return out


def run_rm(cfg: RMConfig) -> dict[str, Any]:
    """Train, evaluate and save the reward model; returns the final metrics (also in ``summary.json``).

    Full-state checkpoints, ``resume`` and SIGTERM work as in ``tritonrlhf.engine.stages.sft.run_sft``.
    """
    from tritonrlhf.engine.checkpoint import GracefulShutdown, hf_exporter, save_hf_checkpoint
    from tritonrlhf.engine.models import resolve_dtype
    from tritonrlhf.engine.rl.train_engine import TrainEngine

    logger, ckpt = setup_resumable_stage(cfg, "rm")
    t_start = time.time()
    model, tokenizer = load_rm_model(cfg)
    pad = tokenizer.pad_token_id
    pairs, stats = load_pairs(cfg.data, cfg.train, tokenizer)
    train_idx, eval_idx = split_eval(len(pairs), cfg.data.eval_size, cfg.seed)
    train = [pairs[i] for i in train_idx]
    mb = cfg.train.micro_batch_size
    eval_batches = [
        rm_collate([pairs[i] for i in eval_idx[j : j + mb]], pad) for j in range(0, len(eval_idx), mb)
    ]

    world = D.world_size()
    grad_accum = cfg.train.batch_size // (mb * world)
    train_engine = TrainEngine(
        RewardScores(model), cfg.optim, mb, grad_accum, resolve_dtype(cfg.model.dtype), cfg.total_steps
    )
    engine = train_engine.engine
    sampler = PromptSampler(len(train), cfg.train.batch_size, cfg.seed, cfg.data.shuffle, D.rank(), world)
    data_metrics = {"data/train_pairs": len(train), "data/eval_pairs": len(eval_idx), **stats.as_metrics()}
    loop = LoopState(dict.fromkeys(("loss", "accuracy", "margin", "n"), 0.0))
    loop = ckpt.attach(train_engine, sampler, hf_exporter(engine.module.model, tokenizer, D.rank()), loop)
    t_window = time.time()
    try:
        with GracefulShutdown() as stop:
            for step in range(loop.step + 1, cfg.total_steps + 1):
                idx = sampler.next_batch()
                w = loop.window
                for j in range(0, len(idx), mb):
                    b = rm_collate([train[i] for i in idx[j : j + mb]], pad)
                    rc, rr = _scores(engine, b)
                    loss, st = bradley_terry_loss(rc, rr, b.margin.to(rc.device))
                    train_engine.micro_step(loss, bool(torch.isfinite(loss)))
                    w["loss"] += float(loss.detach())
                    w["accuracy"] += float(st["accuracy"])
                    w["margin"] += float(st["margin"])
                    w["n"] += 1
                step_stats = train_engine.finish()
                loop.step = step
                if log_due(cfg, step):
                    w = D.all_reduce_mean(loop.window)
                    n = max(w.pop("n"), 1.0)
                    row = {f"train/{k}": v / n for k, v in w.items()}
                    row["train/pairs_per_s"] = n * mb * world / max(time.time() - t_window, 1e-9)
                    row.update(step_stats)
                    if eval_due(cfg, step):
                        row.update(evaluate(engine, eval_batches) if eval_batches else {})
                    if step == 1:
                        row.update(data_metrics)
                    logger.log(step, row)
                    loop.logged(row)
                    t_window = time.time()
                if (stopped := ckpt.end_step(loop, stop)) is not None:
                    return stopped
        final = save_hf_checkpoint(engine.module.model, tokenizer, cfg.output_dir)
        head = {
            "train/accuracy_first": loop.first["train/accuracy"],
            "train/accuracy_last": loop.last["train/accuracy"],
            "train/loss_last": loop.last["train/loss"],
            **data_metrics,
        }
        return finish_stage(logger, loop, train_engine, final, t_start, head)
    finally:
        logger.close()


def main_rm(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """``load_config(RMConfig, config_path, overrides)`` then ``run_rm``."""
    return run_rm(load_config(RMConfig, config_path, overrides))
