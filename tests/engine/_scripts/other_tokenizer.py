"""A second offline tokenizer, unlike the toy one, and tiny checkpoints that use it.

``build_other_tokenizer``: one token per character of its own alphabet (upper and lower case, no
lowercasing), its own special tokens at other ids (``[PAD]`` 0, ``<s>`` 1, ``</s>`` 2, ``[UNK]`` 3,
then ``<|user|>`` and ``<|bot|>``): 89 tokens, so a tiny model on it has 128 embedding rows
(the toy tokenizer: 64 tokens, 64 rows). Its chat template renders
``<s><|user|>PROMPT<|bot|>RESPONSE</s>``; ``chat_template=False`` leaves it without one.
Used by ``tests/engine/rl/test_reward_route.py`` and ``ppo_rm_text.py``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

SPECIALS = ("[PAD]", "<s>", "</s>", "[UNK]", "<|user|>", "<|bot|>")
ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + " \n.,!?:;'\"-()/+=*<>[]"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<|user|>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|bot|>' + m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|bot|>' }}{% endif %}"
)


def build_other_tokenizer(chat_template: bool = True) -> Any:
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate((*SPECIALS, *ALPHABET))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.add_special_tokens(list(SPECIALS))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        additional_special_tokens=["<|user|>", "<|bot|>"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE if chat_template else None,
        model_max_length=4096,
    )


def save_tiny_reward_model(out: Path, tokenizer: Any, seed: int = 3, max_positions: int = 256) -> Path:
    """A tiny random reward model (``tritonrlhf.engine.models.build_tiny_reward_model``) and ``tokenizer`` in ``out``."""
    from tritonrlhf.engine.config import TinyModelConfig
    from tritonrlhf.engine.models import build_tiny_reward_model

    cfg = TinyModelConfig(max_position_embeddings=max_positions)
    build_tiny_reward_model(tokenizer, cfg, seed).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
