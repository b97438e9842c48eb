"""A tiny random Llama checkpoint with an offline byte-level tokenizer, for rollout/sync tests.

``save_tiny_llama(path)`` writes ``config.json``, ``model.safetensors`` and a tokenizer
that vLLM and transformers can both load. Head size is 32 (vLLM's CPU attention needs >= 32).
Kept local to the rollout/sync tests on purpose: they must not depend on ``tritonrlhf.engine.models``.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ("<|eos|>", "<|pad|>")


def build_tokenizer():
    """256 byte tokens + ``<|eos|>`` (256) + ``<|pad|>`` (257); no merges, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[1])


def build_tiny_llama(
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 264,
):
    """A random fp32 LlamaForCausalLM; vocab padded past the tokenizer's 258 ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=256,
        eos_token_id=256,
        pad_token_id=257,
        bos_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # A larger init than HF's 0.02 so the tiny model's distribution is far from uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.float().eval()


def save_tiny_llama(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write a tiny model + tokenizer to ``path`` and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_llama(seed, **kwargs).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    print(save_tiny_llama(sys.argv[1]))
