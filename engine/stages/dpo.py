"""The DPO stage (and IPO): preference optimisation against a frozen copy of the starting policy.

Loss, with ``h = [logπ(y_w) - logπ_ref(y_w)] - [logπ(y_l) - logπ_ref(y_l)]``:

* ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta * h)``;
* ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 * beta))^2``. With ``dpo.length_normalize``
  (the default for IPO, as in the IPO paper's formulation and TRL's ``ipo``) each
  sequence log-ratio is divided by its response length, so ``h`` is a per-token
  average; DPO always uses sequence sums unless ``length_normalize`` is set.

Sequence log-probs are sums of response-token log-probs from ``tritonrlhf.engine.rl.actor.PolicyLogprobs``
(``tritonrlhf.kernels.linear_logprobs``: no ``[tokens, vocab]`` logits), for policy and reference alike.
The reference is a frozen copy of the starting weights; its log-probs are computed once
per micro-batch under ``no_grad``, before the policy's forward.

Implicit rewards are ``beta * (logπ - logπ_ref)`` (the same log-ratios the loss sees);
``rewards/accuracy`` is the fraction of pairs whose chosen reward is strictly higher.

Checkpoints, ``resume`` and SIGTERM work as in the SFT and RM stages
(``tritonrlhf.engine.stages.common.StageCheckpoints``): a checkpoint holds the policy's engine state and
the loop's; the reference needs none, it is rebuilt from the config like the policy's start.

Data: the RM stage's preference JSONL ``{"prompt", "chosen", "rejected"}`` and its
``RMDataConfig``; pairs whose chosen and rejected texts are identical (or become so after
truncation to ``data.max_len``) are dropped and counted as ``data/pairs_identical_dropped``.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

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
from tritonrlhf.engine.stages.common import (
    EncodeStats,
    LoopState,
    TokenizedPair,
    eval_due,
    finish_stage,
    log_due,
    setup_resumable_stage,
    split_eval,
    tokenize_preference_pairs,
    validate_stage,
)
from tritonrlhf.engine.stages.rm import RMDataConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tritonrlhf.engine.rl.experience import Experience


# --------------------------------------------------------------------------- config
@dataclass
class DPOLossConfig:
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    length_normalize: bool | None = None  # None: True for ipo, False for sigmoid


@dataclass
class DPOTrainConfig:
    batch_size: int = 32  # pairs per optimizer step, across all ranks
    micro_batch_size: int = 16  # pairs per rank per forward/backward (2x rows: chosen + rejected)
    eval_every: int = 50  # steps; 0: only at the end
    log_every: int = 10


@dataclass
class DPOModelConfig(ModelConfig):
    path: str = "runs/sft"


@dataclass
class DPOOptimConfig(OptimConfig):
    lr: float = 1e-4
    warmup_steps: int = 10


@dataclass
class DPOConfig(StageConfig):
    """DPO / IPO from a causal-LM checkpoint (usually the SFT stage's output) on preference pairs."""

    output_dir: str = "runs/dpo"
    total_steps: int = 200
    model: DPOModelConfig = field(default_factory=DPOModelConfig)
    data: RMDataConfig = field(default_factory=RMDataConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)
    optim: DPOOptimConfig = field(default_factory=DPOOptimConfig)
    logging: QuietLoggingConfig = field(default_factory=QuietLoggingConfig)

    def validate(self, world_size: int = 1) -> None:
        validate_stage(self, world_size)
        check_choice("data.on_long_prompt", self.data.on_long_prompt, ("truncate", "drop"))
        check_choice("dpo.loss", self.dpo.loss, ("sigmoid", "ipo"))
        if not self.dpo.beta > 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.dpo.beta}")
        if not 2 <= self.data.max_prompt_len < self.data.max_len:
            raise ConfigError(
                f"data.max_prompt_len={self.data.max_prompt_len} must be in [2, data.max_len={self.data.max_len})"
            )
        if not os.path.exists(self.data.train):
            raise ConfigError(f"data.train: file does not exist: {self.data.train}")

    @property
    def length_normalize(self) -> bool:
        ln = self.dpo.length_normalize
        return self.dpo.loss == "ipo" if ln is None else bool(ln)


# --------------------------------------------------------------------------- pure loss
def dpo_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, loss: str = "sigmoid"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and implicit rewards.

    ``chosen_logratios`` / ``rejected_logratios``: [B] float, ``logπ(y) - logπ_ref(y)``
    (sequence sums, or per-token means when length-normalised).
    Returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; rewards are
    ``beta * logratio`` and detached.
    """
    h = chosen_logratios - rejected_logratios
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo_loss: loss must be sigmoid or ipo, got {loss!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# --------------------------------------------------------------------------- data
def load_preference_pairs(
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    max_prompt_len: int,
    on_long_prompt: str = "truncate",
) -> tuple[list[TokenizedPair], EncodeStats]:
    """``common.tokenize_preference_pairs`` (the loader the RM stage uses too), needing at
    least one usable pair."""
    tokenized, stats, n_records = tokenize_preference_pairs(
        path, tokenizer, max_len, max_prompt_len, on_long_prompt
    )
    if not tokenized:
        identical = sum(stats.extra.values())
        raise DataError(
            f"{path}: no usable pairs among {n_records} records "
            f"({identical} had chosen == rejected, "
            f"{stats.prompts_dropped} prompts longer than max_prompt_len={max_prompt_len} were dropped)"
        )
    return tokenized, stats


def pack_rows(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> Experience:
    """An ``Experience`` (sequences, attention_mask, action_mask) in the engine's layout.

    sequences [N, P+R]: left-padded prompt then right-padded response; P, R the longest.
    """
    from tritonrlhf.engine.rl.experience import Experience

    P = max(len(p) for p in prompts)
    R = max(max(len(r) for r in responses), 1)
    N = len(prompts)
    seq = torch.full((N, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((N, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq[i, P - len(p) : P] = torch.as_tensor(list(p), dtype=torch.long)
        attn[i, P - len(p) : P] = 1
        if r:
            seq[i, P : P + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            attn[i, P : P + len(r)] = 1
    return Experience(seq, attn, attn[:, P:].bool())


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> Experience:
    """B pairs -> 2B rows: rows ``[0, B)`` the chosen responses, ``[B, 2B)`` the rejected ones."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return pack_rows(prompts, responses, pad_id)


# --------------------------------------------------------------------------- the stage
PAIR_STATS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
)  # the keys of ``_pair_stats``'s sums: per-pair means in the metrics


def _pair_stats(
    logp: torch.Tensor, ref_logp: torch.Tensor, batch: Experience, cfg: DPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair losses [B], sums of the logged statistics over the B pairs)."""
    mask = batch.action_mask
    lengths = mask.sum(-1).clamp_min(1).float()
    pol = (logp * mask).sum(-1)
    ratios = pol - (ref_logp * mask).sum(-1)
    if cfg.length_normalize:
        ratios = ratios / lengths
    B = batch.batch_size // 2
    losses, rc, rr = dpo_loss(ratios[:B], ratios[B:], cfg.dpo.beta, cfg.dpo.loss)
    sums = {
        "loss": losses.detach().sum(),
        "rewards/chosen": rc.sum(),
        "rewards/rejected": rr.sum(),
        "rewards/margin": (rc - rr).sum(),
        "rewards/accuracy": (rc > rr).float().sum(),
        "logps/chosen": pol[:B].detach().sum(),
        "logps/rejected": pol[B:].detach().sum(),
    }
    return losses, sums


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def evaluate_pairs(policy: Any, ref: Any, batches: Sequence[Experience], cfg: DPOConfig) -> dict[str, float]:
    """Means of loss, implicit rewards, margin and accuracy over held-out pair batches."""
    policy.eval()
    sums: dict[str, float] = {}
    n = 0
    for b in batches:
        logp, _ = policy(b.sequences.to(policy.device), b.attention_mask.to(policy.device), b.response_len)
        _, s = _pair_stats(logp.cpu(), ref.logprobs(b), b, cfg)
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += b.batch_size // 2
    policy.train()
    return {f"eval/{k}": v / max(n, 1) for k, v in sums.items()}


def run_dpo(cfg: DPOConfig) -> dict[str, Any]:
    """Train ``total_steps`` DPO/IPO steps, evaluate on held-out pairs, save an HF checkpoint.

    Returns the summary (also in ``<output_dir>/summary.json``); per-step metrics go to
    ``metrics.jsonl``. Full-state checkpoints, ``resume`` and SIGTERM work as in
    ``tritonrlhf.engine.stages.sft.run_sft``.
    """
    from tritonrlhf.engine.checkpoint import GracefulShutdown, hf_exporter, save_hf_checkpoint
    from tritonrlhf.engine.models import resolve_dtype
    from tritonrlhf.engine.rl.actor import PolicyLogprobs
    from tritonrlhf.engine.rl.scoring import ReferenceModel
    from tritonrlhf.engine.rl.train_engine import TrainEngine
    from tritonrlhf.engine.stages.sft import load_sft_model

    logger, ckpt = setup_resumable_stage(cfg, "dpo")
    t_start = time.time()
    model, tokenizer = load_sft_model(cfg)  # tiny model when model.path is empty; checks the kind
    pad = tokenizer.pad_token_id
    d = cfg.data
    pairs, stats = load_preference_pairs(d.train, tokenizer, d.max_len, d.max_prompt_len, d.on_long_prompt)
    train_idx, eval_idx = split_eval(len(pairs), d.eval_size, cfg.seed)
    train = [pairs[i] for i in train_idx]
    mb = cfg.train.micro_batch_size
    eval_batches = [collate_pairs([pairs[i] for i in c], pad) for c in _chunks(eval_idx, mb)]

    world = D.world_size()
    grad_accum = cfg.train.batch_size // (mb * world)
    ref_lm = copy.deepcopy(model)  # the frozen starting weights, copied before DeepSpeed wraps them
    train_engine = TrainEngine(
        PolicyLogprobs(model), cfg.optim, mb, grad_accum, resolve_dtype(cfg.model.dtype), cfg.total_steps
    )
    engine = train_engine.engine
    ref = ReferenceModel(ref_lm, device=engine.device, micro_batch_size=2 * mb)
    sampler = PromptSampler(len(train), cfg.train.batch_size, cfg.seed, d.shuffle, D.rank(), world)
    data_metrics = {
        "data/train_pairs": len(train),
        "data/eval_pairs": len(eval_idx),
        **stats.as_metrics(),
    }
    loop = LoopState(dict.fromkeys((*PAIR_STATS, "n"), 0.0))
    loop = ckpt.attach(train_engine, sampler, hf_exporter(engine.module.lm, tokenizer, D.rank()), loop)
    steps_window, t_window = 0, time.time()
    try:
        with GracefulShutdown() as stop:
            for step in range(loop.step + 1, cfg.total_steps + 1):
                w = loop.window
                for chunk in _chunks(sampler.next_batch(), mb):
                    batch = collate_pairs([train[i] for i in chunk], pad).to(engine.device)
                    ref_logp = ref.logprobs(batch)  # no grad, once per micro-batch
                    logp, _ = engine(batch.sequences, batch.attention_mask, batch.response_len)
                    losses, sums = _pair_stats(logp, ref_logp, batch, cfg)
                    loss = losses.mean()
                    train_engine.micro_step(loss, bool(torch.isfinite(loss)))
                    for k, v in sums.items():
                        w[k] += float(v)
                    w["n"] += len(chunk)
                step_stats = train_engine.finish()
                loop.step, steps_window = step, steps_window + 1
                if log_due(cfg, step):
                    means = D.all_reduce_mean({k: w[k] / max(w["n"], 1.0) for k in PAIR_STATS})
                    row = {**means, **step_stats, "time/step_s": (time.time() - t_window) / steps_window}
                    if eval_due(cfg, step) and eval_batches:
                        row.update(D.all_reduce_mean(evaluate_pairs(engine, ref, eval_batches, cfg)))
                    if step == 1:
                        row.update(data_metrics)
                    logger.log(step, row)
                    loop.logged(row)
                    steps_window, t_window = 0, time.time()
                if (stopped := ckpt.end_step(loop, stop)) is not None:
                    return stopped
        final = save_hf_checkpoint(engine.module.lm, tokenizer, cfg.output_dir)
        head = {
            "train/margin_first": loop.first["rewards/margin"],
            "train/margin_last": loop.last["rewards/margin"],
            "train/loss_first": loop.first["loss"],
            "train/loss_last": loop.last["loss"],
            **data_metrics,
            "loss_type": cfg.dpo.loss,
            "length_normalize": cfg.length_normalize,
        }
        return finish_stage(logger, loop, train_engine, final, t_start, head)
    finally:
        logger.close()


def main_dpo(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """``load_config(DPOConfig, config_path, overrides)`` then ``run_dpo``."""
    return run_dpo(load_config(DPOConfig, config_path, overrides))
