"""The SFT stage: causal-LM cross-entropy on response tokens only, under DeepSpeed ZeRO.

Records are ``{"prompt", "response"}`` (sequence ``<bos> prompt response <eos>``)
or chat ``{"messages": [...]}`` rendered by the tokenizer's chat template, whose
``{% generation %}`` blocks mark the assistant tokens that carry loss. Prompt and
pad positions get label -100. With ``data.packing`` several examples share a row
of ``data.max_len`` tokens; position ids restart per example and the attention
mask is omitted, so transformers builds a block-diagonal causal mask from the
position ids (no attention across examples).

``run_sft(cfg)`` trains ``total_steps`` optimizer steps and saves an HF
checkpoint plus tokenizer into ``cfg.output_dir`` (with ``config.yaml`` and
``metrics.jsonl``). Every ``save_every`` steps it writes a full-state checkpoint
under ``<output_dir>/checkpoints/`` (``tritonrlhf.engine.stages.common.StageCheckpoints``) that
``resume=auto`` continues from exactly. With an empty ``model.path`` it trains the
tiny model of ``model.tiny`` from scratch with the offline toy tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
from tritonrlhf.engine.data import DataError, PromptSampler, check_messages, read_jsonl
from tritonrlhf.engine.stages.common import (
    EncodeStats,
    LoopState,
    encode_prompt,
    encode_response,
    eval_due,
    finish_stage,
    fit_prompt,
    fit_response,
    log_due,
    nonblank_line_numbers,
    pad_right,
    setup_resumable_stage,
    split_eval,
    validate_stage,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100


# --------------------------------------------------------------------------- config
@dataclass
class SFTDataConfig:
    """Training records for SFT: a JSONL of ``{"prompt", "response"}`` or chat ``{"messages": [...]}``.

    (The ``datasets`` library is not a dependency; convert HF datasets to JSONL.)
    """

    train: str = "data/demo/sft.jsonl"
    format: str = "auto"  # auto (from the first record) | prompt_response | messages
    eval_size: int = 128  # records held out for the eval loss (0: none)
    max_len: int = 64  # prompt + response tokens (incl. bos/eos); longer responses are cut
    max_prompt_len: int = 48
    on_long_prompt: str = "truncate"  # truncate (keep the prompt's last tokens) | drop
    packing: bool = False  # pack several examples into each max_len row (block-diagonal attention)
    shuffle: bool = True


@dataclass
class SFTTrainConfig:
    batch_size: int = 32  # sequences (rows when packing) per optimizer step, across all ranks
    micro_batch_size: int = 32  # per rank per forward/backward
    eval_every: int = 100  # steps; 0: only at the end
    log_every: int = 10


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning: causal-LM cross-entropy on response tokens only."""

    output_dir: str = "runs/sft"
    total_steps: int = 500
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=3e-3, weight_decay=0.0, warmup_steps=20)
    )
    logging: QuietLoggingConfig = field(default_factory=QuietLoggingConfig)

    def validate(self, world_size: int = 1) -> None:
        validate_stage(self, world_size)
        check_choice("data.format", self.data.format, ("auto", "prompt_response", "messages"))
        check_choice("data.on_long_prompt", self.data.on_long_prompt, ("truncate", "drop"))
        if not 2 <= self.data.max_prompt_len < self.data.max_len:
            raise ConfigError(
                f"data.max_prompt_len={self.data.max_prompt_len} must be in [2, data.max_len={self.data.max_len})"
            )
        if self.data.train and not Path(self.data.train).exists():
            raise ConfigError(f"data.train: file does not exist: {self.data.train}")


# --------------------------------------------------------------------------- examples and batches
@dataclass
class SFTExample:
    """One tokenized example: ``input_ids`` [L] and ``loss_mask`` [L] (1 = a response token, trained on)."""

    input_ids: list[int]
    loss_mask: list[int]


@dataclass
class SFTBatch:
    """A training batch, right-padded.

    input_ids:      [B, T] long, pad id after each row's end
    labels:         [B, T] long, the token at response positions, -100 at prompt and pad positions
                    (unshifted: the loss compares logits[:, t-1] with labels[:, t])
    position_ids:   [B, T] long; restart at 0 for each packed example
    attention_mask: [B, T] long (1 = real token), or None for packed rows (the
                    block-diagonal mask is derived from ``position_ids``)
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def sft_collate(examples: Sequence[SFTExample], pad_id: int) -> SFTBatch:
    """One example per row, right-padded; labels -100 on prompt and pad tokens."""
    ids = pad_right([e.input_ids for e in examples], pad_id)
    mask = pad_right([e.loss_mask for e in examples], 0, ids.shape[1]).bool()
    am = pad_right([[1] * len(e.input_ids) for e in examples], 0, ids.shape[1])
    labels = ids.masked_fill(~mask, IGNORE)
    pos = torch.arange(ids.shape[1]).expand_as(ids).clone()
    return SFTBatch(ids, labels, pos, am)


def pack_examples(examples: Sequence[SFTExample], max_len: int) -> list[list[int]]:
    """First-fit-decreasing bins of example indices, each bin's total length <= ``max_len``."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_len - n)
    return bins


def packed_collate(rows: Sequence[Sequence[SFTExample]], pad_id: int, max_len: int) -> SFTBatch:
    """Each row concatenates its examples then pads to ``max_len``; positions restart per example.

    The pad tail gets its own restarting positions, so it is a separate block that
    no real token attends to; its labels are -100.
    """
    ids, labels, pos = [], [], []
    for row in rows:
        r_ids, r_lab, r_pos = [], [], []
        for e in row:
            r_ids += e.input_ids
            r_lab += [t if m else IGNORE for t, m in zip(e.input_ids, e.loss_mask)]
            r_pos += list(range(len(e.input_ids)))
        tail = max_len - len(r_ids)
        ids.append(r_ids + [pad_id] * tail)
        labels.append(r_lab + [IGNORE] * tail)
        pos.append(r_pos + list(range(tail)))
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return SFTBatch(t(ids), t(labels), t(pos), None)


# --------------------------------------------------------------------------- loss
def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum of token NLLs, number of correct argmax predictions, number of loss tokens).

    logits [B, T, V] (any float dtype; computed in fp32), labels [B, T] with -100
    where there is no loss. Position t's logits predict labels[:, t + 1].
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    valid = shift_labels != IGNORE
    correct = ((shift_logits.argmax(-1) == shift_labels) & valid).sum()
    return nll, correct, int(valid.sum())


# --------------------------------------------------------------------------- data
def _check_messages(messages: Any, where: str) -> None:
    check_messages(messages, where, last="any")  # the shape every chat column shares
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: 'messages' has no assistant turn, so nothing to train on")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: 'messages' starts with an assistant turn (empty prompt)")


def _encode_messages(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str
) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat 'messages' records need a tokenizer with a chat template")
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):
        raise DataError(
            f"{where}: the chat template marks no assistant tokens; it needs {{% generation %}} blocks"
        )
    return ids, mask


def load_sft_examples(
    cfg: SFTDataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[SFTExample], EncodeStats]:
    """Read, check and tokenize ``cfg.train``; errors name the file and line."""
    records = read_jsonl(cfg.train, [], text=[])
    lines = nonblank_line_numbers(cfg.train)
    fmt = cfg.format
    if fmt == "auto":
        fmt = "messages" if "messages" in records[0] else "prompt_response"
    stats = EncodeStats()
    bos = tokenizer.bos_token_id
    examples = []
    for rec, line in zip(records, lines):
        where = f"{cfg.train}:{line}"
        if fmt == "messages":
            if "messages" not in rec:
                raise DataError(f"{where}: missing column 'messages' (has {sorted(rec)})")
            _check_messages(rec["messages"], where)
            ids, mask = _encode_messages(tokenizer, rec["messages"], where)
            n_prompt = mask.index(1)
            prompt = fit_prompt(ids[:n_prompt], cfg.max_prompt_len, cfg.on_long_prompt, bos, stats)
            if prompt is None:
                continue
            rest, rest_mask = fit_response(prompt, ids[n_prompt:], cfg.max_len, stats), mask[n_prompt:]
            examples.append(SFTExample(prompt + rest, [0] * len(prompt) + rest_mask[: len(rest)]))
        else:
            for col in ("prompt", "response"):
                if col not in rec:
                    raise DataError(f"{where}: missing column {col!r} (has {sorted(rec)})")
                if not isinstance(rec[col], str) or not rec[col].strip():
                    raise DataError(f"{where}: column {col!r} must be a non-empty string")
            prompt = fit_prompt(
                encode_prompt(tokenizer, rec["prompt"]), cfg.max_prompt_len, cfg.on_long_prompt, bos, stats
            )
            if prompt is None:
                continue
            response = fit_response(prompt, encode_response(tokenizer, rec["response"]), cfg.max_len, stats)
            examples.append(SFTExample(prompt + response, [0] * len(prompt) + [1] * len(response)))
    if not examples:
        raise DataError(
            f"{cfg.train}: all {len(records)} records were dropped (prompts longer than "
            f"data.max_prompt_len={cfg.max_prompt_len} with data.on_long_prompt=drop)"
        )
    return examples, stats


# --------------------------------------------------------------------------- model
def load_sft_model(cfg: SFTConfig) -> tuple[Any, PreTrainedTokenizerBase]:
    """(causal LM in train mode, tokenizer): a tiny model from ``model.tiny`` or the ``model.path`` checkpoint."""
    from tritonrlhf.engine.models import (
        build_tiny_model,
        build_tokenizer,
        check_tokenizer_matches,
        load_causal_lm,
        load_tokenizer,
        resolve_dtype,
    )

    dtype = resolve_dtype(cfg.model.dtype)
    if not cfg.model.path:
        tokenizer = (
            load_tokenizer(cfg.model.tokenizer)
            if cfg.model.tokenizer
            else build_tokenizer(family=cfg.model.tiny.family)
        )
        model = build_tiny_model(tokenizer, cfg.model.tiny, cfg.seed).to(dtype)
    else:
        # load_causal_lm says so when model.path is a reward (sequence-classification) checkpoint.
        model = load_causal_lm(cfg.model.path, dtype, cfg.model.attn_implementation)
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, role="model.tokenizer")
    check_tokenizer_matches(tokenizer, model.config)
    model.config.use_cache = False
    return model.train(), tokenizer


# --------------------------------------------------------------------------- the stage
def _forward(engine: Any, batch: SFTBatch) -> torch.Tensor:
    dev = engine.device
    out = engine(
        input_ids=batch.input_ids.to(dev),
        attention_mask=None if batch.attention_mask is None else batch.attention_mask.to(dev),
        position_ids=batch.position_ids.to(dev),
        use_cache=False,
    )
    return out.logits


@torch.no_grad()
def evaluate(engine: Any, batches: Sequence[SFTBatch]) -> dict[str, float]:
    """Token-mean response NLL and argmax accuracy over ``batches`` (every rank runs all of them)."""
    engine.eval()
    nll = correct = n = 0.0
    for b in batches:
        s, c, k = sft_loss_sum(_forward(engine, b), b.labels.to(engine.device))
        nll, correct, n = nll + float(s), correct + float(c), n + k
    engine.train()
    return {"eval/loss": nll / max(n, 1), "eval/token_accuracy": correct / max(n, 1)}


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Train, evaluate and save; returns the final metrics (also in ``summary.json``).

    With ``save_every`` it writes full-state checkpoints (``StageCheckpoints``) and ``resume``
    continues from one. SIGTERM/SIGINT finish the step, save, and return ``{"stopped": True, ...}``.
    """
    from tritonrlhf.engine.checkpoint import GracefulShutdown, hf_exporter, save_hf_checkpoint
    from tritonrlhf.engine.models import resolve_dtype
    from tritonrlhf.engine.rl.train_engine import TrainEngine

    logger, ckpt = setup_resumable_stage(cfg, "sft")
    t_start = time.time()
    model, tokenizer = load_sft_model(cfg)
    pad = tokenizer.pad_token_id
    examples, stats = load_sft_examples(cfg.data, tokenizer)
    train_idx, eval_idx = split_eval(len(examples), cfg.data.eval_size, cfg.seed)
    train = [examples[i] for i in train_idx]
    eval_ex = [examples[i] for i in eval_idx]
    mb = cfg.train.micro_batch_size
    if cfg.data.packing:
        units = [[train[i] for i in b] for b in pack_examples(train, cfg.data.max_len)]
        collate = lambda rows: packed_collate(rows, pad, cfg.data.max_len)  # noqa: E731
    else:
        units = [[e] for e in train]
        collate = lambda rows: sft_collate([r[0] for r in rows], pad)  # noqa: E731
    eval_batches = [sft_collate(eval_ex[i : i + mb], pad) for i in range(0, len(eval_ex), mb)]

    world = D.world_size()
    grad_accum = cfg.train.batch_size // (mb * world)
    dtype = resolve_dtype(cfg.model.dtype)  # the model's; 16 bits: DeepSpeed keeps fp32 master weights
    train_engine = TrainEngine(model, cfg.optim, mb, grad_accum, dtype, cfg.total_steps)
    engine = train_engine.engine
    sampler = PromptSampler(
        len(units), cfg.train.batch_size, cfg.seed, cfg.data.shuffle, rank=D.rank(), world_size=world
    )
    data_metrics = {
        "data/train_examples": len(train),
        "data/eval_examples": len(eval_ex),
        "data/train_rows": len(units),
        **stats.as_metrics(),
    }
    loop = LoopState(dict.fromkeys(("nll", "correct", "n", "tokens"), 0.0))
    loop = ckpt.attach(train_engine, sampler, hf_exporter(engine.module, tokenizer, D.rank()), loop)
    t_window = time.time()
    try:
        with GracefulShutdown() as stop:
            for step in range(loop.step + 1, cfg.total_steps + 1):
                batches = [collate(c) for c in _chunks([units[i] for i in sampler.next_batch()], mb)]
                n_local = sum(b.num_loss_tokens for b in batches)
                n_global = D.all_reduce_mean({"n": float(n_local)})["n"] * world
                w = loop.window
                for b in batches:
                    nll, correct, n = sft_loss_sum(_forward(engine, b), b.labels.to(engine.device))
                    # token mean over the global batch: DeepSpeed divides by grad_accum and averages ranks
                    loss = nll * (grad_accum * world / max(n_global, 1.0))
                    train_engine.micro_step(loss, bool(torch.isfinite(loss)))
                    w["nll"] += float(nll.detach())
                    w["correct"] += float(correct)
                    w["n"] += n
                    w["tokens"] += float((b.input_ids != pad).sum())
                step_stats = train_engine.finish()
                loop.step = step
                if log_due(cfg, step):
                    w = D.all_reduce_mean(loop.window)
                    row = {
                        "train/loss": w["nll"] / max(w["n"], 1.0),
                        "train/token_accuracy": w["correct"] / max(w["n"], 1.0),
                        "train/tokens_per_s": w["tokens"] * world / max(time.time() - t_window, 1e-9),
                        **step_stats,
                    }
                    if eval_due(cfg, step):
                        row.update(evaluate(engine, eval_batches) if eval_batches else {})
                    if step == 1:
                        row.update(data_metrics)
                    logger.log(step, row)
                    loop.logged(row)
                    t_window = time.time()
                if (stopped := ckpt.end_step(loop, stop)) is not None:
                    return stopped
        final = save_hf_checkpoint(engine.module, tokenizer, cfg.output_dir)
        head = {"train/loss_first": loop.first["train/loss"], "train/loss_last": loop.last["train/loss"]}
        return finish_stage(logger, loop, train_engine, final, t_start, {**head, **data_metrics})
    finally:
        logger.close()


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def main_sft(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """``load_config(SFTConfig, config_path, overrides)`` then ``run_sft``."""
    return run_sft(load_config(SFTConfig, config_path, overrides))
