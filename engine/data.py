"""Prompt data: checked JSONL reading, the tokenized prompt set, and a resumable sampler.

``read_jsonl`` is shared by every stage (PPO prompts; SFT, RM and DPO records) and
reports problems as ``file:line: ...``. Chat ``messages`` are checked (``check_messages``)
and rendered by the tokenizer's chat template (``render_chat``). ``PromptDataset`` tokenizes
prompts once (plain ``prompt`` or chat ``messages``, ``read_prompts``) and applies
``data.max_prompt_len``. ``PromptSampler`` deals global batches of indices
epoch after epoch; its ``state_dict`` is two integers and the seed, so a resumed
run draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tritonrlhf.engine.config import ConfigError, DataConfig
from tritonrlhf.engine.tasks import toy_prompts, toy_target

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class DataError(ConfigError):
    """A problem with a data file or with what is left of it after filtering."""


# --------------------------------------------------------------------------- JSONL
def read_jsonl(
    path: str | os.PathLike, required: Sequence[str] = (), *, text: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Read one JSON object per line; blank lines are skipped.

    Every record must have the ``required`` columns; those named in ``text``
    (default: all of ``required``) must be non-empty strings. Errors name the
    file, the line and the column.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file does not exist: {p}")
    if not p.is_file():
        raise DataError(f"data path is not a file: {p}")
    text_cols = list(required) if text is None else list(text)
    records = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for col in required:
                if col not in rec:
                    raise DataError(f"{where}: missing column {col!r} (has {sorted(rec)})")
            for col in text_cols:
                value = rec.get(col)
                if not isinstance(value, str):
                    raise DataError(f"{where}: column {col!r} must be a string, got {type(value).__name__}")
                if not value.strip():
                    raise DataError(f"{where}: column {col!r} is empty")
            records.append(rec)
    if not records:
        raise DataError(f"{p}: no records")
    return records


def nonblank_line_numbers(path: str | os.PathLike) -> list[int]:
    """1-based numbers of the non-blank lines: ``read_jsonl``'s i-th record came from line ``[i]``."""
    with Path(path).open(encoding="utf-8") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


# --------------------------------------------------------------------------- chat
CHAT_ROLES = ("system", "user", "assistant")


def check_messages(messages: Any, where: str, col: str = "messages", *, last: str = "prompt") -> None:
    """A chat conversation: a non-empty list of ``{"role", "content"}`` objects, roles in
    ``CHAT_ROLES``, contents non-empty strings. ``last="prompt"``: the last turn is not the
    assistant's (the policy answers next); ``"assistant"``: it is (a response); ``"any"``: no
    rule. Errors name ``where`` (``file:line``), the column and the message index."""
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: column {col!r} must be a non-empty list of {{role, content}} objects, "
            f"got {type(messages).__name__}"
        )
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: column {col!r}: {col}[{j}] must have 'role' and 'content', got {m!r}")
        if m["role"] not in CHAT_ROLES:
            raise DataError(
                f"{where}: column {col!r}: {col}[{j}] has unknown role {m['role']!r} (use one of {CHAT_ROLES})"
            )
        if not isinstance(m["content"], str):
            raise DataError(
                f"{where}: column {col!r}: {col}[{j}] ({m['role']}) content must be a string, "
                f"got {type(m['content']).__name__}"
            )
        if not m["content"].strip():
            raise DataError(f"{where}: column {col!r}: {col}[{j}] ({m['role']}) has empty content")
    if last == "prompt" and messages[-1]["role"] == "assistant":
        raise DataError(
            f"{where}: column {col!r}: the last turn is the assistant's; a prompt ends with a user "
            "(or system) turn for the policy to answer"
        )
    if last == "assistant" and messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: column {col!r}: the last turn must be the assistant's response")


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    where: str,
    col: str = "messages",
    *,
    generation_prompt: bool = True,
) -> str:
    """``messages`` rendered as text by the tokenizer's chat template (``add_generation_prompt``
    when ``generation_prompt``). A tokenizer without a template, or a template that raises, is a
    ``DataError`` naming ``where`` and the column."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: column {col!r} holds chat messages, but the tokenizer has no chat template; "
            "give plain 'prompt' strings or use a tokenizer (model.tokenizer) that has one"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja2 errors, raise_exception() in the template
        raise DataError(f"{where}: column {col!r}: the chat template failed: {e}") from None


# A prompt record's columns other than the prompt reach reward functions as keyword arguments of
# these names; the call's own arguments cannot be column names.
RESERVED_COLUMNS = ("prompt", "messages", "prompts", "responses", "finish_reasons")


def record_columns(rec: dict[str, Any], where: str) -> dict[str, Any]:
    """The record's columns other than ``prompt`` / ``messages`` (``answer``, ``tests``, ...)."""
    cols = {k: v for k, v in rec.items() if k not in ("prompt", "messages")}
    bad = [k for k in cols if k in RESERVED_COLUMNS or not k.isidentifier()]
    if bad:
        raise DataError(
            f"{where}: column(s) {bad} cannot reach a reward function as keyword arguments "
            f"(reserved: {list(RESERVED_COLUMNS)}; names must be Python identifiers): rename them"
        )
    return cols


def read_prompt_records(
    path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str, list[dict[str, Any]] | None, dict[str, Any]]]:
    """``(text, messages, columns)`` of each record of a prompt JSONL: ``prompt`` (a string, used as
    is; messages None) or ``messages`` (a chat, rendered by the tokenizer's chat template with the
    generation prompt; the chat kept beside its rendering), and every other column (``answer``,
    ``tests``, ...), which reward functions receive (``tritonrlhf.engine.rewards``)."""
    records = read_jsonl(path, [], text=[])
    out: list[tuple[str, list[dict[str, Any]] | None, dict[str, Any]]] = []
    for rec, line in zip(records, nonblank_line_numbers(path)):
        where = f"{path}:{line}"
        if ("prompt" in rec) == ("messages" in rec):
            raise DataError(
                f"{where}: a prompt record needs exactly one of 'prompt' (a string) or 'messages' "
                f"(a chat), has {sorted(rec)}"
            )
        columns = record_columns(rec, where)
        if "messages" in rec:
            check_messages(rec["messages"], where)
            out.append((render_chat(tokenizer, rec["messages"], where), rec["messages"], columns))
            continue
        value = rec["prompt"]
        if not isinstance(value, str):
            raise DataError(
                f"{where}: column 'prompt' must be a string, got {type(value).__name__} "
                "(a chat goes in a 'messages' column)"
            )
        if not value.strip():
            raise DataError(f"{where}: column 'prompt' is empty")
        out.append((value, None, columns))
    return out


def read_prompts(path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The prompt texts of ``read_prompt_records`` (chats rendered)."""
    return [text for text, _, _ in read_prompt_records(path, tokenizer)]


def columns_by_name(records: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-record column dicts -> name -> [one value per record] (None where a record lacks it)."""
    names = sorted({k for cols in records for k in cols})
    return {k: [cols.get(k) for cols in records] for k in names}


# --------------------------------------------------------------------------- prompts
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


@dataclass
class PromptBatch:
    """Prompts for one rollout step, as the rollout engine takes them.

    indices:   [B] dataset indices (for logging and resume checks)
    texts:     [B] original prompt strings (what reward functions see)
    input_ids: [B] token-id lists of varying length <= max_prompt_len, unpadded
    columns:   [B] each record's other columns (``answer``, ``tests``, ...; ``target`` for toy prompts)
    """

    indices: list[int]
    texts: list[str]
    input_ids: list[list[int]]
    columns: list[dict[str, Any]] = field(default_factory=list)


class PromptDataset:
    """Tokenized prompts from ``data.prompts``: ``"toy"`` (``tasks.toy_prompts``) or a JSONL of
    ``{"prompt": str}`` or chat ``{"messages": [...]}`` records (``read_prompts``).

    Each prompt is tokenized without special tokens, then <bos> is prepended when
    the tokenizer has one and the text did not already start with it. Prompts longer than ``max_prompt_len`` tokens are cut to
    their last tokens (bos kept) under ``on_long_prompt="truncate"``, or removed
    under ``"drop"``; ``num_truncated`` / ``num_dropped`` count them. ``texts`` keep
    the original strings. ``num_prompts`` applies to toy prompts only.
    """

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> None:
        if cfg.on_long_prompt not in ("truncate", "drop"):
            raise ConfigError(f"data.on_long_prompt must be truncate or drop, got {cfg.on_long_prompt!r}")
        if cfg.max_prompt_len < 2:
            raise ConfigError(f"data.max_prompt_len must be >= 2, got {cfg.max_prompt_len}")
        if cfg.prompts == "toy":
            # Each toy prompt's ground truth as a column (tasks.target_reward reads it).
            toys = toy_prompts(cfg.num_prompts, seed)
            records, source = [(p, None, {"target": toy_target(p)}) for p in toys], "toy prompts"
        else:
            records, source = read_prompt_records(cfg.prompts, tokenizer), cfg.prompts
        raw = [text for text, _, _ in records]
        bos = tokenizer.bos_token_id
        encoded = tokenizer(raw, add_special_tokens=False)["input_ids"]
        self.texts: list[str] = []
        self.input_ids: list[list[int]] = []
        # A chat prompt's conversation, by the prompt as the trainer decodes it from its ids: a reward
        # model with its own tokenizer and chat template renders the conversation itself
        # (engine.rl.reward_route.TextRoute). Truncated chats are left out (no longer the whole chat).
        self.chats: dict[str, list[dict[str, Any]]] = {}
        self.columns: list[dict[str, Any]] = []  # each kept record's other columns
        self.num_truncated = self.num_dropped = 0
        limit = cfg.max_prompt_len
        for (text, messages, columns), ids in zip(records, encoded):
            ids = list(ids)
            if bos is not None and ids[:1] != [bos]:  # chat-rendered text may already hold bos
                ids.insert(0, bos)
            if len(ids) > limit:
                if cfg.on_long_prompt == "drop":
                    self.num_dropped += 1
                    continue
                self.num_truncated += 1
                ids = [bos] + ids[len(ids) - limit + 1 :] if bos is not None else ids[-limit:]
            elif messages is not None:
                self.chats[tokenizer.decode(ids, skip_special_tokens=True)] = messages
            self.texts.append(text)
            self.input_ids.append(ids)
            self.columns.append(columns)
        if not self.input_ids:
            raise DataError(
                f"{source}: all {len(raw)} prompts are longer than data.max_prompt_len={limit} tokens "
                "and data.on_long_prompt=drop; raise max_prompt_len or use truncate"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[str, list[int]]:
        return self.texts[i], self.input_ids[i]

    def batch(self, indices: Sequence[int]) -> PromptBatch:
        idx = [int(i) for i in indices]
        return PromptBatch(
            idx,
            [self.texts[i] for i in idx],
            [self.input_ids[i] for i in idx],
            [self.columns[i] for i in idx],
        )

    def column_names(self) -> list[str]:
        """Every column name some record has (what reward functions may ask for)."""
        return sorted({k for cols in self.columns for k in cols})


# --------------------------------------------------------------------------- sampler
class PromptSampler:
    """Endless, deterministic, resumable batches of dataset indices, sharded over ranks.

    The global stream is epoch 0's order, then epoch 1's, ...; each epoch's order is a
    permutation seeded by ``(seed, epoch)`` (or ``range`` without shuffle). A global
    batch is the next ``batch_size`` indices of that stream, so batches run across
    epoch boundaries and none is dropped. Rank ``r`` of ``world_size`` gets the
    contiguous slice ``[r * b, (r + 1) * b)`` of each global batch, with
    ``b = batch_size // world_size``: the shares are disjoint. Every rank walks the
    same stream, so the state is the same on all ranks.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if dataset_len <= 0:
            raise ValueError(f"PromptSampler: dataset_len must be > 0, got {dataset_len}")
        if batch_size <= 0 or batch_size % world_size:
            raise ValueError(
                f"PromptSampler: batch_size={batch_size} must be a positive multiple of {world_size=}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"PromptSampler: rank={rank} not in [0, {world_size})")
        self.dataset_len, self.batch_size, self.seed, self.shuffle = dataset_len, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # next index within the current epoch's order
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
                self._order = torch.randperm(self.dataset_len, generator=g)
            else:
                self._order = torch.arange(self.dataset_len)
            self._order_epoch = epoch
        return self._order

    def next_global_batch(self) -> list[int]:
        """The next ``batch_size`` indices for all ranks together; advances the state."""
        out: list[int] = []
        while len(out) < self.batch_size:
            order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(out), self.dataset_len - self.position)
            out.extend(order[self.position : self.position + take].tolist())
            self.position += take
            if self.position == self.dataset_len:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def next_batch(self) -> list[int]:
        """This rank's share (``batch_size // world_size`` indices) of the next global batch."""
        per = self.batch_size // self.world_size
        return self.next_global_batch()[self.rank * per : (self.rank + 1) * per]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "dataset_len": self.dataset_len,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken; the seed, data size and batch size must match."""
        for key in ("seed", "dataset_len", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"PromptSampler: checkpoint has {key}={state[key]} but this run has {getattr(self, key)}; "
                    "resuming would not continue the same stream"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.dataset_len:
            raise ValueError(f"PromptSampler: bad state epoch={epoch} position={position}")
        self.epoch, self.position = epoch, position
