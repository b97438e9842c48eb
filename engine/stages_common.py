"""What the offline stages (SFT, RM) share: setup, tokenizing records, eval splits, HF saving.

The DeepSpeed engine itself is ``engine.actor.TrainEngine`` (AdamW, clipping,
warmup, ZeRO stage from ``OptimConfig``, the non-finite step guard), reused as is.

Sequences follow the layout of every stage: ``<bos> prompt response <eos>``,
prompt tokenized without special tokens (as ``engine.data.PromptDataset`` does,
so a PPO prompt is exactly an SFT prompt), right-padded for training.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine import distributed as D
from engine.config import ConfigError, save_config
from engine.data import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from engine.metrics import MetricsLogger


# --------------------------------------------------------------------------- setup
def setup_stage(cfg: Any, name: str = "train") -> MetricsLogger:
    """Init distributed (if launched), validate, seed, write the resolved config; return the logger.

    Call first in every stage. Rank 0 writes; other ranks get a disabled logger.
    """
    from engine.metrics import MetricsLogger

    D.init_distributed()
    cfg.validate(D.world_size())
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    out = Path(cfg.output_dir)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)  # resume=never: a fresh log
        save_config(cfg, out)
    D.barrier()
    return MetricsLogger(out, cfg.logging, cfg.total_steps, enabled=D.is_main(), desc=name)


# --------------------------------------------------------------------------- tokenizing
@dataclass
class EncodeStats:
    """Counts of what tokenizing changed; reported in metrics as ``data/*``."""

    prompts_truncated: int = 0
    prompts_dropped: int = 0
    responses_truncated: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "data/") -> dict[str, int]:
        return {
            f"{prefix}prompts_truncated": self.prompts_truncated,
            f"{prefix}prompts_dropped": self.prompts_dropped,
            f"{prefix}responses_truncated": self.responses_truncated,
            **{f"{prefix}{k}": v for k, v in self.extra.items()},
        }


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt ids without special tokens, with <bos> prepended unless already there (as in PromptDataset)."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)
    return ids


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """Response ids without special tokens, then <eos>: what a policy emits before stopping."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos token; responses need one to mark their end")
    return ids + [tokenizer.eos_token_id]


def fit_prompt(
    ids: list[int], max_prompt_len: int, on_long: str, bos: int | None, stats: EncodeStats
) -> list[int] | None:
    """Apply ``max_prompt_len``: keep <bos> + the last tokens (truncate) or None (drop); counted."""
    if len(ids) <= max_prompt_len:
        return ids
    if on_long == "drop":
        stats.prompts_dropped += 1
        return None
    stats.prompts_truncated += 1
    if bos is not None and ids[:1] == [bos]:
        return [bos] + ids[len(ids) - max_prompt_len + 1 :]
    return ids[-max_prompt_len:]


def fit_response(prompt: list[int], response: list[int], max_len: int, stats: EncodeStats) -> list[int]:
    """Cut ``response`` so prompt + response fits ``max_len`` tokens; counted."""
    room = max_len - len(prompt)
    if len(response) > room:
        stats.responses_truncated += 1
        return response[:room]
    return response


def pad_right(rows: Sequence[Sequence[int]], pad: int, length: int | None = None) -> torch.Tensor:
    """[B, T] long tensor, each row followed by ``pad`` up to ``length`` (default: the longest row)."""
    T = length or max(len(r) for r in rows)
    out = torch.full((len(rows), T), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def nonblank_line_numbers(path: str | os.PathLike) -> list[int]:
    """1-based numbers of the non-blank lines: ``read_jsonl``'s i-th record came from line ``[i]``."""
    with Path(path).open(encoding="utf-8") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


def split_eval(n: int, eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): a seeded random ``eval_size`` held out; at least one left to train."""
    if eval_size >= n:
        raise DataError(f"data.eval_size={eval_size} leaves no training data ({n} usable records)")
    order = list(range(n))
    random.Random(f"eval-split-{seed}").shuffle(order)
    return sorted(order[eval_size:]), sorted(order[:eval_size])


# --------------------------------------------------------------------------- saving
def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict (CPU clones) on rank 0, None elsewhere; gathers ZeRO-3 partitions.

    A collective under ZeRO-3: every rank must call it.
    """
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if not D.is_main():
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_hf_checkpoint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike
) -> Path:
    """``save_pretrained`` the model (gathered under ZeRO-3) and its tokenizer on rank 0; all ranks wait.

    Collective: every rank must call it.
    """
    out = Path(out_dir)
    state = gathered_state_dict(model)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    D.barrier()
    return out


def require_checkpoint_kind(path: str | os.PathLike, role: str, kind: str) -> None:
    """ConfigError unless ``path`` is an HF checkpoint of ``kind`` (``causal_lm`` or ``seq_cls``)."""
    from engine.models import _checkpoint_kind, _load_config

    config = _load_config(path, role)
    found = _checkpoint_kind(config)
    if found == kind:
        return
    names = {"causal_lm": "a causal-LM (policy / SFT)", "seq_cls": "a sequence-classification (reward)"}
    raise ConfigError(
        f"{role}: {path} is {names.get(found, 'an unrecognised')} checkpoint "
        f"(architectures={getattr(config, 'architectures', None)}), but this stage needs "
        f"{names[kind]} checkpoint"
    )
