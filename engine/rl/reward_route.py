"""How a reward model reads the policy's samples: the policy's token ids, or re-tokenized text.

*Token route*: the RM shares the policy's tokenizer, so the policy's ids (prompt + response, with
the policy's EOS) are scored as they are. *Text route*: the RM has its own tokenizer (another
vocabulary, other special-token ids or another chat template), so each sample is decoded with the
policy's tokenizer (special tokens dropped, so no policy EOS in the text) and re-tokenized with the
RM's, in one of two layouts: the RM's chat template (user turn = prompt, assistant turn = response,
no generation prompt), or the rm stage's (``<bos> prompt response <eos>``,
``tritonrlhf.engine.data.encode_prompt`` / ``encode_response``; a response cut at ``max_new_tokens``
gets no EOS there, as on the token route; a chat template closes every turn its own way).
Which one (``reward.layout``, auto): an RM is scored in the layout it was trained in. The rm stage
records it in the checkpoint's ``config.json`` (``rm_layout: plain``), so plain-string prompts reach
such an RM as ``<bos> prompt response <eos>`` even when its tokenizer carries a chat template;
chat prompts (``{"messages"}``) and RMs trained elsewhere (no record) take the chat template where
the tokenizer has one. ``reward.layout=plain`` / ``chat`` forces one layout for every sample.
A sample longer than the RM's positions is not cut: its score is invalid (dropped from the loss
and counted) and a warning says so.

``resolve_reward_route`` decides from ``reward.tokenizer`` (auto | policy | own), reading only the
RM's ``config.json`` and tokenizer files, so it runs before any weights load.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tritonrlhf.engine.config import ConfigError

TOKENIZER_SETTINGS = ("auto", "policy", "own")
LAYOUT_SETTINGS = ("auto", "plain", "chat")
# config.json key the rm stage writes: the layout its pairs were trained in ("plain": <bos> p r <eos>)
RM_LAYOUT_KEY = "rm_layout"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_differences(policy_tok: Any, rm_tok: Any) -> list[str]:
    """What differs between two tokenizers in ways that change the ids: [] when interchangeable.

    Compares the vocabulary (token -> id), the bos/eos ids, the special tokens and the chat template.
    """
    diffs = []
    if policy_tok.get_vocab() != rm_tok.get_vocab():
        diffs.append(f"vocabulary ({len(policy_tok)} vs {len(rm_tok)} tokens)")
    for name in ("bos_token_id", "eos_token_id"):
        a, b = getattr(policy_tok, name, None), getattr(rm_tok, name, None)
        if a != b:
            diffs.append(f"{name} ({a} vs {b})")
    a = dict(zip(policy_tok.all_special_tokens, policy_tok.all_special_ids))
    b = dict(zip(rm_tok.all_special_tokens, rm_tok.all_special_ids))
    if a != b:
        diffs.append("special tokens")
    if (policy_tok.chat_template or None) != (rm_tok.chat_template or None):
        diffs.append("chat template")
    return diffs


@dataclass
class TextRoute:
    """Re-tokenizes (prompt, response) texts for the RM: ``encode(...) -> (ids [B, T], mask [B, T], ok [B])``.

    ``ids`` are right-padded with the RM tokenizer's pad id; ``ok`` is False for samples longer than
    ``max_len`` (or empty): their row is a lone pad token and the scorer marks them invalid.
    """

    tokenizer: Any
    max_len: int
    chat: bool = True  # False: the rm stage's layout even where the tokenizer has a chat template
    # True: plain-string prompts take the rm stage's layout (the RM was trained so: its checkpoint
    # records rm_layout=plain); chat prompts still take the chat template
    plain_prompts: bool = False
    # Chat prompts' conversations by their decoded prompt text (PromptDataset.chats): rendered as
    # the conversation itself, not as the policy's rendering of it.
    chats: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    num_too_long: int = field(default=0, init=False)

    def render(self, prompt: str, response: str, stopped: bool = True) -> list[int]:
        """One sample's RM ids: the RM's chat template if it has one (and, with ``plain_prompts``, the
        prompt was a chat), else the rm stage's layout.

        A prompt found in ``chats`` was a chat: the RM's template renders that conversation (system
        turns included) and the response; the rm stage's layout takes its last user turn."""
        tok = self.tokenizer
        chat = self.chats.get(prompt)
        if self.chat and tok.chat_template and (chat is not None or not self.plain_prompts):
            turns = list(chat) if chat is not None else [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(
                [*turns, {"role": "assistant", "content": response}],
                tokenize=False,
                add_generation_prompt=False,
            )
            return list(tok(text, add_special_tokens=False)["input_ids"])
        from tritonrlhf.engine.data import encode_prompt, encode_response

        if chat is not None:  # the rm stage's layout holds the request itself: the last user turn
            prompt = next(m["content"] for m in reversed(chat) if m["role"] == "user")

        resp = encode_response(tok, response)
        return encode_prompt(tok, prompt) + (resp if stopped else resp[:-1])

    def encode(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        finish_reasons: Sequence[str | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reasons = list(finish_reasons) if finish_reasons is not None else [None] * len(prompts)
        rows = [self.render(p, r, f != "length") for p, r, f in zip(prompts, responses, reasons)]
        ok = torch.tensor([0 < len(r) <= self.max_len for r in rows], dtype=torch.bool)
        n = sum(len(r) > self.max_len for r in rows)
        if n:
            self.num_too_long += n
            longest = max(len(r) for r in rows)
            print(
                f"[reward] WARNING: {n} sample(s) are longer than the reward model's {self.max_len} "
                f"positions after re-tokenizing (longest {longest} tokens); they are not cut but "
                "scored invalid (left out of the loss, counted in rollout/invalid_rewards)",
                flush=True,
            )
        pad = self.tokenizer.pad_token_id
        rows = [r if k else [pad] for r, k in zip(rows, ok.tolist())]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask, ok


@dataclass
class RewardRoute:
    """The route chosen for one reward model: ``"token"`` or ``"text"`` (then ``text`` encodes)."""

    route: str
    reason: str
    differences: list[str]
    text: TextRoute | None = None

    def log_line(self, key: str = "reward.model_path") -> str:
        return f"[reward] {key}: {self.route} route ({self.reason})"


def _has_tokenizer(path: str | os.PathLike) -> bool:
    return any((Path(path) / f).is_file() for f in _TOKENIZER_FILES)


def resolve_reward_route(
    setting: str,
    policy_tok: Any,
    rm_path: str | os.PathLike,
    role: str = "reward.model_path",
    key: str = "reward.tokenizer",
    layout: str = "auto",
) -> RewardRoute:
    """Decide how the RM at ``rm_path`` reads samples (``setting``: auto | policy | own) and, on the
    text route, in which layout (``layout``: auto | plain | chat, ``reward.layout``; see the module doc).

    Reads ``config.json`` and the tokenizer files only. ConfigError (naming ``key`` / ``role``) when
    ``policy`` is forced but the policy can emit ids the RM has no embedding row for, when ``own``
    is asked of a checkpoint without a tokenizer, or when a token route would index past the RM's
    embedding.
    """
    from tritonrlhf.engine.models import load_tokenizer, require_checkpoint_kind

    if setting not in TOKENIZER_SETTINGS:
        raise ConfigError(f"{key} must be one of {list(TOKENIZER_SETTINGS)}, got {setting!r}")
    if layout not in LAYOUT_SETTINGS:
        raise ConfigError(f"reward.layout must be one of {list(LAYOUT_SETTINGS)}, got {layout!r}")
    config = require_checkpoint_kind(rm_path, role, "seq_cls")
    n_emb, n_pol = int(config.vocab_size), len(policy_tok)
    rm_tok = load_tokenizer(rm_path, role=role) if _has_tokenizer(rm_path) else None
    diffs = tokenizer_differences(policy_tok, rm_tok) if rm_tok is not None else []
    if setting == "own" or (setting == "auto" and diffs):
        if rm_tok is None:
            raise ConfigError(
                f"{key}=own but {role}={rm_path} has no tokenizer files; save the reward model's "
                f"tokenizer there, or use {key}=policy if it reads the policy's ids"
            )
        limit = int(getattr(config, "max_position_embeddings", 0) or 0) or int(rm_tok.model_max_length)
        why = f"{key}={setting}" + (f"; tokenizers differ: {', '.join(diffs)}" if diffs else "")
        if layout == "chat" and not rm_tok.chat_template:
            raise ConfigError(f"reward.layout=chat but {role}={rm_path}'s tokenizer has no chat template")
        trained = getattr(config, RM_LAYOUT_KEY, None)
        text = TextRoute(
            rm_tok, limit, chat=layout != "plain", plain_prompts=layout == "auto" and trained == "plain"
        )
        if not rm_tok.chat_template or layout == "plain":
            how = "the rm stage's layout <bos> prompt response <eos>"
        elif text.plain_prompts:
            how = f"its recorded {RM_LAYOUT_KEY}=plain for plain prompts, its chat template for chat prompts"
        else:
            how = "its chat template"
        return RewardRoute("text", why + f"; samples are re-tokenized as text in {how}", diffs, text)
    if n_pol > n_emb:
        what = f"{key}=policy" if setting == "policy" else f"{role} has no tokenizer files, so"
        raise ConfigError(
            f"{what} the reward model would read the policy's ids, but the policy's tokenizer has "
            f"{n_pol} tokens and {role}={rm_path} only {n_emb} embedding rows (ids >= {n_emb} would "
            f"index past it); use {key}=own with the reward model's tokenizer saved in {role}"
        )
    if rm_tok is None:
        why = f"{key}={setting}; {role} has no tokenizer files: assuming it reads the policy's ids"
    elif diffs:
        why = f"{key}=policy forced although the tokenizers differ: {', '.join(diffs)}"
    else:
        why = f"{key}={setting}; the reward model's tokenizer equals the policy's"
    return RewardRoute("token", why, diffs)
