"""Toy tokenizer, tiny models, and the checked loaders (policy, reference, reward)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tritonrlhf.engine.config import ConfigError, ModelConfig, TinyModelConfig
from tritonrlhf.engine.models import (
    build_tiny_model,
    build_tiny_reward_model,
    build_tokenizer,
    check_tokenizer_matches,
    load_causal_lm,
    load_reward_model,
    prepare_policy,
    resolve_attn_implementation,
    resolve_dtype,
)

TINY = TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def _small_llama(**overrides):
    """A hand-made LlamaConfig, for checkpoints the builders would never produce."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        **overrides,
    )


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tok) -> Path:
    path, _ = prepare_policy(ModelConfig(tiny=TINY), tmp_path_factory.mktemp("work"), seed=0)
    return path


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tok) -> Path:
    out = tmp_path_factory.mktemp("rm")
    build_tiny_reward_model(tok, TINY, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_specials(tok):
    assert len(tok) == 64
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "left"
    text = "say a: 3 + 4 = 7, (ok)!\nnext line?"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one id per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("Hello")["input_ids"], skip_special_tokens=True) == "hello"  # lowercased
    assert tok("a~b", add_special_tokens=False)["input_ids"][1] == tok.unk_token_id


def test_tokenizer_is_deterministic(tok):
    other = build_tokenizer()
    assert other.get_vocab() == tok.get_vocab()
    text = "the quick brown fox: 0123456789"
    assert other(text)["input_ids"] == tok(text)["input_ids"]


def test_tokenizer_with_merges_keeps_the_toy_ids_and_decodes_every_id(tok):
    big = build_tokenizer(merges=448)
    assert len(big) == 512
    vocab = big.get_vocab()
    assert {t: i for t, i in vocab.items() if i < 64} == tok.get_vocab()  # ids 0-63 as before
    assert vocab["aa"] == 64 and vocab["ab"] == 65 and max(vocab.values()) == 511
    text = "say a: 3 + 4 = 7, (ok)!\nnext line?"
    ids = big(text)["input_ids"]
    assert any(i >= 64 for i in ids) and len(ids) < len(text) + 1  # letter pairs merged
    assert big.decode(ids, skip_special_tokens=True) == text
    assert all(big.decode([i]) for i in range(7, 512))  # every non-special id is text
    with pytest.raises(ValueError, match="merges must be in 0..676"):
        build_tokenizer(merges=677)


def test_left_padding(tok):
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [tok.pad_token_id] * 2
    assert batch["attention_mask"][0].tolist() == [0, 0, 1, 1, 1]


def test_chat_template(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "say a:"},
        {"role": "assistant", "content": "aaa"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<bos><|system|>be brief<eos><|user|>say a:<eos><|assistant|>aaa<eos>"
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>")
    enc = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert ids.count(tok.bos_token_id) == 1  # the template's bos is not doubled
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "aaa<eos>"
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


# --------------------------------------------------------------------------- tiny models
def test_tiny_model_forward_and_seed(tok):
    model = build_tiny_model(tok, TINY, seed=0)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    assert not model.config.tie_word_embeddings
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    batch = tok(["say a:", "1 2 say b:"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    state = torch.random.get_rng_state()
    again = build_tiny_model(tok, TINY, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    other = build_tiny_model(tok, TINY, seed=1)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


# model.tiny.family -> (HF class prefix, a parameter name only that family has)
FAMILIES = {
    "llama": ("Llama", None),
    "qwen2": ("Qwen2", "model.layers.0.self_attn.q_proj.bias"),
    "qwen3": ("Qwen3", "model.layers.0.self_attn.q_norm.weight"),
    "mistral": ("Mistral", None),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_families_build_with_their_own_layers(tok, family, tied):
    """Each family from its HF config class, with grouped-query attention (4 heads, 2 KV heads),
    tied or untied embeddings, as a causal LM and as a one-output reward model."""
    prefix, own = FAMILIES[family]
    cfg = TinyModelConfig(
        family=family, tie_word_embeddings=tied, hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=1
    )
    model = build_tiny_model(tok, cfg, seed=0)
    rm = build_tiny_reward_model(tok, cfg, seed=0)
    assert type(model).__name__ == f"{prefix}ForCausalLM"
    assert type(rm).__name__ == f"{prefix}ForSequenceClassification" and rm.config.num_labels == 1
    names = dict(model.named_parameters())
    assert names["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 32, 128)  # 2 KV heads of 32
    assert (own is None) or own in names
    others = [o for f, (_, o) in FAMILIES.items() if f != family and o]
    assert not any(o in names for o in others)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert ("lm_head.weight" in names) == (not tied)  # a tied head is the embedding's parameter
    assert getattr(model.config, "sliding_window", None) is None  # Mistral's window is off
    batch = tok(["say a:", "1 2 say b:"], padding=True, return_tensors="pt")
    assert torch.isfinite(model(**batch).logits).all() and rm(**batch).logits.shape == (2, 1)


def test_llama_default_is_unchanged(tok):
    """The default (llama, untied) is exactly what LlamaForCausalLM built before families existed."""
    from transformers import LlamaForCausalLM

    model = build_tiny_model(tok, TinyModelConfig(), seed=0)
    torch.manual_seed(0)
    direct = LlamaForCausalLM(model.config)
    assert type(model) is LlamaForCausalLM and not model.config.tie_word_embeddings
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"family": "gemma"}, r"model.tiny.family must be one of"),
        ({"hidden_size": 96, "num_heads": 2, "num_kv_heads": 1}, r"head size .* = 48 is not one vLLM"),
        ({"hidden_size": 64, "num_heads": 4, "num_kv_heads": 4}, r"head size .* = 16"),
        ({"hidden_size": 100, "num_heads": 3, "num_kv_heads": 3}, r"not divisible by num_heads=3"),
        (
            {"hidden_size": 128, "num_heads": 4, "num_kv_heads": 3},
            r"num_heads=4 is not divisible by num_kv_heads=3",
        ),
        ({"num_layers": 0}, r"model.tiny.num_layers"),
    ],
)
def test_tiny_config_rejects_what_cannot_run(tok, overrides, match):
    cfg = TinyModelConfig(**overrides)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()
    with pytest.raises(ConfigError, match=match):  # the builder checks too
        build_tiny_model(tok, cfg, seed=0)


def test_stage_configs_check_the_tiny_model_before_any_work(tmp_path):
    from tritonrlhf.engine.config import PPOConfig, load_config
    from tritonrlhf.engine.stages.sft import SFTConfig

    bad = ["model.tiny.family=qwen2", "model.tiny.num_heads=4"]  # head size 16
    for cls in (PPOConfig, SFTConfig):
        cfg = load_config(cls, None, [f"output_dir={tmp_path}", *bad])
        with pytest.raises(ConfigError, match="head size"):
            cfg.validate()
    ok = load_config(PPOConfig, None, ["model.tiny.family=qwen3", "model.tiny.tie_word_embeddings=true"])
    ok.validate()
    assert ok.model.tiny.family == "qwen3" and ok.model.tiny.tie_word_embeddings is True


def test_tiny_spec_covers_family_and_tie(tmp_path):
    """A cached init_policy of another family or tie setting is rebuilt, not reused."""
    base = TinyModelConfig(hidden_size=64, num_layers=1)
    path, _ = prepare_policy(ModelConfig(tiny=base), tmp_path, seed=0)
    for change in ({"family": "qwen2"}, {"tie_word_embeddings": True}):
        cfg = ModelConfig(tiny=TinyModelConfig(**{**base.__dict__, **change}))
        prepare_policy(cfg, tmp_path, seed=0)
        config = json.loads((path / "config.json").read_text())
        assert (
            config["model_type"] == cfg.tiny.family
            and config["tie_word_embeddings"] == cfg.tiny.tie_word_embeddings
        )


# --------------------------------------------------------------------------- prepare_policy
def test_prepare_policy_tiny_is_loadable(policy_dir, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert policy_dir.name == "init_policy" and (policy_dir / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    loaded = AutoTokenizer.from_pretrained(policy_dir)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.padding_side == "left"
    assert loaded.decode(loaded("say b:")["input_ids"], skip_special_tokens=True) == "say b:"
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<bos><|user|>hi<eos>"
    )
    expected = build_tiny_model(tok, TINY, seed=0)
    assert torch.equal(model.lm_head.weight, expected.lm_head.weight)


def test_prepare_policy_reuses_and_rebuilds(tmp_path):
    cfg = ModelConfig(tiny=TINY)
    path, _ = prepare_policy(cfg, tmp_path, seed=0)
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert prepare_policy(cfg, tmp_path, seed=0)[0] == path
    assert weights.stat().st_mtime_ns == mtime  # reused, not rebuilt
    prepare_policy(cfg, tmp_path, seed=1)  # a different spec rebuilds in place
    assert json.loads((path / "tiny_spec.json").read_text())["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["init_policy"]  # no temp dirs left


def test_prepare_policy_existing_checkpoint(policy_dir, tok):
    path, loaded = prepare_policy(ModelConfig(path=str(policy_dir)), Path("unused"), seed=0)
    assert path == policy_dir and len(loaded) == len(tok)


def test_prepare_policy_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_policy(ModelConfig(path=str(tmp_path / "nope")), tmp_path, seed=0)
    with pytest.raises(ConfigError, match="no config.json"):
        prepare_policy(ModelConfig(path=str(tmp_path)), tmp_path, seed=0)


def test_tokenizer_larger_than_embedding(tok, tmp_path):
    from transformers import LlamaForCausalLM

    config = _small_llama(vocab_size=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"64 tokens.*vocab_size=32"):
        prepare_policy(ModelConfig(path=str(tmp_path)), tmp_path, seed=0)
    with pytest.raises(ConfigError, match="64 tokens"):
        check_tokenizer_matches(tok, config)


def test_seq_cls_checkpoint_as_policy(reward_dir):
    with pytest.raises(ConfigError, match="sequence-classification checkpoint.*not a causal LM"):
        prepare_policy(ModelConfig(path=str(reward_dir)), reward_dir, seed=0)
    with pytest.raises(ConfigError, match="not a causal LM"):
        load_causal_lm(reward_dir)


# --------------------------------------------------------------------------- loaders
def test_load_causal_lm(policy_dir):
    model = load_causal_lm(policy_dir, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"


def test_load_reward_model(reward_dir, tok):
    model = load_reward_model(reward_dir, torch.float32)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    batch = tok(["say a: aaa", "say b: b"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 1)


def test_causal_lm_as_reward_model(policy_dir):
    with pytest.raises(ConfigError, match="causal-LM checkpoint.*not a sequence-classification"):
        load_reward_model(policy_dir, torch.float32)


def test_reward_model_needs_one_label(tok, tmp_path):
    from transformers import LlamaForSequenceClassification

    config = _small_llama(vocab_size=64, num_labels=3, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="num_labels=3"):
        load_reward_model(tmp_path, torch.float32)


def test_resolve_dtype_and_attention():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cuda") == torch.float16
    with pytest.raises(ConfigError, match="model.dtype"):
        resolve_dtype("fp8", "cpu")
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("auto", "cuda", torch.float32) == "sdpa"
    assert resolve_attn_implementation("eager", "cpu") == "eager"
    with pytest.raises(ConfigError, match="attn_implementation"):
        resolve_attn_implementation("flash", "cpu")
