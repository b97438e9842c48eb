"""Hard constraints at sampling time: banned strings and patterns (``rollout.banned_strings`` /
``rollout.banned_patterns``).

:class:`BannedText` answers one question, token by token: given the response ids sampled so far,
which next tokens would make the decoded response (``tokenizer.decode(ids,
skip_special_tokens=True)``, as the reward and ``samples.jsonl`` see it) contain a banned string
or match a banned pattern? Both rollout backends mask those tokens to ``-inf`` before temperature,
top-k and top-p (vLLM through :mod:`tritonrlhf.engine.rl.vllm_logits`, HF ``generate`` through
:class:`HFBanProcessor`), so the returned log-probs are those of the renormalised distribution.

How a step is checked (the response text so far never matches: that is what the constraint keeps):

* Every token's text *piece* is precomputed once, as the text it adds after an anchor token
  (``decode([a, t])`` minus ``decode([a])``, so SentencePiece's leading space survives).
* A banned string ``b`` newly appears after token ``t`` exactly when ``b`` lies inside ``t``'s
  piece, or the text ends with ``b[:k]`` and the piece starts with ``b[k:]`` (a string spanning
  two or more tokens). Both are boolean tables over the vocabulary, so a step costs a few
  vectorised ORs.
* A pattern is searched in ``tail + piece`` for every token, where ``tail`` is the end of the text
  long enough to hold the pattern's longest match (plus a margin for lookbehind and ``\\b``), or
  the whole text when the pattern's width is unbounded (``a.*b``). That is one regex search per
  vocabulary entry per step: cheap for small vocabularies, about 0.1-0.3 s per step for 150k; use
  ``banned_strings`` where a literal suffices. A pattern counts as matched as soon as any prefix
  of the response matches it (``$`` matches the end of the text so far).
* Tokens whose piece is not plain text (a lone byte of a multi-byte character decodes to
  U+FFFD) are checked exactly instead: ``decode(ids + [t])`` searched in full.
* The response's first token is what ``decode([t])`` gives alone, its *first piece*: SentencePiece
  decoders drop the leading space there (``'▁hello'`` decodes to ``'hello'``, so ``^hello``
  must ban it and ``' hello'`` must not), byte-level BPEs keep it. The first step uses those
  pieces; a response whose tokens so far decode to nothing is checked exactly.

If every token would be banned, the stop token (EOS) is allowed: the response ends there and no
banned text is emitted. Special tokens decode to nothing, so EOS is never banned otherwise.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import torch

_REPLACEMENT = "\ufffd"
_LOOKAROUND_MARGIN = 32  # characters of context kept before a bounded pattern's window


def _max_width(pattern: re.Pattern) -> int | None:
    """The longest text ``pattern`` can match, or None when unbounded (or unknown)."""
    try:
        from re import _constants, _parser  # CPython's own parser, which re.compile uses

        hi = _parser.parse(pattern.pattern, pattern.flags).getwidth()[1]
        return None if hi >= _constants.MAXREPEAT else int(hi)
    except Exception:  # another interpreter: check the whole text
        return None


class BannedText:
    """The next-token ban of one tokenizer and one list of banned strings and patterns.

    ``banned_mask(ids, vocab_size)`` -> bool ``[vocab_size]``, True on the tokens that would make
    the decoded response contain a banned string or match a banned pattern. Ids past the
    tokenizer's length (a model's padded vocabulary) decode to nothing and are never banned.
    ``eos_token_id`` is the fallback when everything else is banned.
    """

    def __init__(self, tokenizer: Any, strings: Sequence[str] = (), patterns: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.strings = tuple(strings)
        self.patterns = tuple(re.compile(p) for p in patterns)
        self.widths = [_max_width(p) for p in self.patterns]
        self.eos_token_id = tokenizer.eos_token_id
        self.pieces, self.exact = _pieces(tokenizer)
        n = len(self.pieces)
        # the first response token's text: decode([t]) (SentencePiece drops the piece's leading space)
        self.first_pieces = tokenizer.batch_decode([[t] for t in range(n)], skip_special_tokens=True)
        # contains[j][t]: strings[j] lies inside piece t; starts[j][k][t]: piece t starts with strings[j][k:]
        self.contains = [torch.tensor([b in p for p in self.pieces], dtype=torch.bool) for b in self.strings]
        self.first_contains = [
            torch.tensor([b in p for p in self.first_pieces], dtype=torch.bool) for b in self.strings
        ]
        self.starts = [
            {
                k: torch.tensor([p.startswith(b[k:]) for p in self.pieces], dtype=torch.bool)
                for k in range(1, len(b))
            }
            for b in self.strings
        ]
        self._plain = torch.ones(n, dtype=torch.bool)
        self._plain[self.exact] = False

    def __bool__(self) -> bool:
        return bool(self.strings or self.patterns)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _decode_many(self, seqs: list[list[int]]) -> list[str]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)  # a fast tokenizer: one Rust call
        if backend is not None:
            return backend.decode_batch(seqs, skip_special_tokens=True)
        return self.tokenizer.batch_decode(seqs, skip_special_tokens=True)

    def violates(self, text: str) -> bool:
        """True when ``text`` contains a banned string or matches a banned pattern."""
        return any(b in text for b in self.strings) or any(p.search(text) for p in self.patterns)

    def banned_mask(self, ids: Sequence[int], vocab_size: int | None = None) -> torch.Tensor:
        """bool ``[vocab_size]`` (default: the tokenizer's length): the next tokens to ban after ``ids``."""
        n = len(self.pieces)
        ids = [int(i) for i in ids if 0 <= int(i) < n]
        text = self.decode(ids)
        if ids and not text:  # tokens that decode to nothing so far: what the next adds is unknown
            return self._exact_mask(ids, range(n), n, vocab_size)
        first = not ids
        pieces = self.first_pieces if first else self.pieces
        mask = torch.zeros(n, dtype=torch.bool)
        for b, contains, starts in zip(
            self.strings, self.first_contains if first else self.contains, self.starts
        ):
            mask |= contains
            for k, table in starts.items():
                if text.endswith(b[:k]):
                    mask |= table
        for pattern, width in zip(self.patterns, self.widths):
            if width is None:
                tail, pos = text, 0
            else:
                keep = width + _LOOKAROUND_MARGIN
                tail, pos = (text, 0) if len(text) <= keep else (text[-keep:], 1)  # pos 1: no false ^
            todo = (~mask & self._plain).nonzero().flatten().tolist()
            hits = [t for t in todo if pattern.search(tail + pieces[t], pos)]
            mask[hits] = True
        return self._exact_mask(ids, self.exact, n, vocab_size, mask)

    def _exact_mask(self, ids, tokens, n, vocab_size, mask=None) -> torch.Tensor:
        """``mask`` with ``tokens`` checked by decoding ``ids + [t]`` in full, the EOS fallback, sized
        to ``vocab_size``."""
        mask = torch.zeros(n, dtype=torch.bool) if mask is None else mask
        tokens = list(tokens)
        if tokens:
            texts = self._decode_many([ids + [t] for t in tokens])
            mask[tokens] = torch.tensor([self.violates(text) for text in texts])
        if mask.all() and self.eos_token_id is not None:
            mask[self.eos_token_id] = False
        out = torch.zeros(max(vocab_size or n, n), dtype=torch.bool)
        out[:n] = mask
        return out[: vocab_size or n]

    def banned_masks(self, response_ids: Sequence[int], vocab_size: int | None = None) -> torch.Tensor:
        """bool ``[len(response_ids), vocab_size]``: the mask in force at each response position."""
        return torch.stack([self.banned_mask(response_ids[:i], vocab_size) for i in range(len(response_ids))])


def _pieces(tokenizer: Any) -> tuple[list[str], list[int]]:
    """(piece of every token id below ``len(tokenizer)``, ids to check exactly).

    A piece is the text the token adds after an anchor (``a``); special tokens add nothing. Ids
    whose piece holds U+FFFD (a partial UTF-8 character) or does not extend the anchor's text are
    checked by decoding the whole response instead.
    """
    n = len(tokenizer)
    anchor_ids = tokenizer.encode("a", add_special_tokens=False)[:1]
    head = tokenizer.decode(anchor_ids, skip_special_tokens=True)
    texts = tokenizer.batch_decode([anchor_ids + [t] for t in range(n)], skip_special_tokens=True)
    pieces, exact = [], []
    for t, text in enumerate(texts):
        if text.startswith(head):
            piece = text[len(head) :]
        else:
            piece = tokenizer.decode([t], skip_special_tokens=True)
            exact.append(t)
        if _REPLACEMENT in piece and t not in exact:
            exact.append(t)
        pieces.append(piece)
    return pieces, exact


@functools.lru_cache(maxsize=8)
def banned_text_for(tokenizer_path: str, strings: tuple[str, ...], patterns: tuple[str, ...]) -> BannedText:
    """One shared :class:`BannedText` per (tokenizer directory, bans): the vLLM logits processor and
    the rollout's ``sequence_logprobs`` use the same instance (building one decodes the vocabulary)."""
    from transformers import AutoTokenizer

    return BannedText(AutoTokenizer.from_pretrained(tokenizer_path), strings, patterns)


def kept_logmass(logits: torch.Tensor, banned: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log of the probability mass the ban leaves under ``softmax(logits / T)``, ``<= 0``.

    logits: ``[..., V]``; banned: bool ``[..., V]``; returns ``[...]`` fp32. It is the per-token
    KL(constrained || unconstrained), and ``constrained log-prob + kept_logmass`` is the sampled
    token's log-prob without the ban.
    """
    x = logits.float() / max(temperature, 1e-5)
    return x.masked_fill(banned, float("-inf")).logsumexp(-1) - x.logsumexp(-1)


class HFBanProcessor:
    """The ban as a transformers logits processor (any callable ``(input_ids, scores) -> scores``).

    ``generate`` applies custom processors before its temperature/top-k/top-p warpers, as vLLM
    applies non-argmax-invariant processors before temperature. ``prompt_width`` is where the
    responses start in ``input_ids``; rows that already stopped (a ``stop_ids`` token) are left
    alone. ``kept`` collects :func:`kept_logmass` per step as ``[B]`` tensors.
    """

    def __init__(self, ban: BannedText, prompt_width: int, stop_ids: Sequence[int], temperature: float):
        self.ban, self.width, self.stop_ids, self.temperature = ban, prompt_width, set(stop_ids), temperature
        self.kept: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        V = scores.shape[-1]
        masks = torch.zeros(scores.shape, dtype=torch.bool)
        for row, ids in enumerate(input_ids[:, self.width :].tolist()):
            if not self.stop_ids.intersection(ids):
                masks[row] = self.ban.banned_mask(ids, V)
        masks = masks.to(scores.device)
        self.kept.append(kept_logmass(scores, masks, self.temperature).cpu())
        return scores.masked_fill(masks, float("-inf"))
