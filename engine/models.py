"""Model and tokenizer loading: the offline toy tokenizer, tiny random models, and checked loaders.

Every role loads through here: the policy directory vLLM reads (``prepare_policy``),
the trainable actor and frozen reference (``load_causal_lm``), the frozen reward
(``load_reward_model``). Each loader checks that a checkpoint is the kind of model
its role needs, so a reward checkpoint given as policy (or the reverse) fails at
start-up with a message naming the config key and the path, not deep inside a forward
pass. ``require_checkpoint_kind`` is that one check (it reads only ``config.json``); the
stages and the PPO command line also call it before loading anything.

Nothing here downloads: the tiny model and its tokenizer are built from code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tritonrlhf.engine.config import ConfigError, ModelConfig, TinyModelConfig

if TYPE_CHECKING:  # transformers is imported lazily: `import engine` stays cheap
    from transformers import (
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )

# --------------------------------------------------------------------------- tokenizer
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# One token per character. Uppercase input is lowercased by the normalizer; any
# other character outside this alphabet becomes <unk>.
ALPHABET = "\n abcdefghijklmnopqrstuvwxyz0123456789.,!?:;'\"-()/+=*<>[]"
TOY_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(ROLE_TOKENS) + len(ALPHABET)  # 64

# `<|role|>content<eos>` per message; assistant turns are wrapped in
# {% generation %} so `return_assistant_tokens_mask=True` marks what SFT trains on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer(merges: int = 0, family: str = "llama") -> PreTrainedTokenizerBase:
    """The offline character-level toy tokenizer: 64 ids, identical on every call.

    Ids 0-3 are <pad>, <bos>, <eos>, <unk>; 4-6 the chat role markers; the rest
    one character each of ``ALPHABET``. Encoding prepends <bos>; decoding joins
    characters without spaces, so ``decode(encode(s), skip_special_tokens=True) == s``
    for lowercase text in the alphabet. Pads on the left (generation layout).
    As with Llama's tokenizers, the chat template also starts with <bos>: encode
    rendered chat text with ``add_special_tokens=False`` (``PromptDataset`` does).

    ``merges`` > 0 adds that many BPE merges of two letters (``aa``, ``ab``, ... in alphabet
    order, at most 26 x 26) as ids 64 on: a larger vocabulary whose every id still decodes to text
    (the PPO benchmark's ``--vocab 512``, the size of issue #16's model).

    ``family`` is the tiny model's (``model.tiny.family``). Where transformers' ``AutoTokenizer``
    rebuilds a family's tokenizer from the saved vocabulary with its own pipeline (Qwen2: a byte-level
    BPE with Qwen's split pattern, whatever ``tokenizer.json`` says), the toy vocabulary is built as
    that class, so the ids this tokenizer gives are the ids every loader of the saved checkpoint gets
    (``save_tokenizer`` checks it). Such a toy keeps case and drops characters outside the alphabet,
    as that family's tokenizer does with unknown bytes; encoding prepends <bos> as the others do.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *ROLE_TOKENS, *ALPHABET))}
    assert len(vocab) == TOY_VOCAB_SIZE == 64, len(vocab)
    letters = [c for c in ALPHABET if c.isalpha()]
    if not 0 <= merges <= len(letters) ** 2:
        raise ValueError(f"merges must be in 0..{len(letters) ** 2}, got {merges}")
    pairs = [(a, b) for a in letters for b in letters][:merges]
    vocab.update({a + b: TOY_VOCAB_SIZE + i for i, (a, b) in enumerate(pairs)})
    if family in _BYTE_LEVEL_FAMILIES:
        return _byte_level_toy(_BYTE_LEVEL_FAMILIES[family], vocab, pairs)
    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown model family {family!r}; one of {sorted(_FAMILY_CONFIGS)}")
    # BPE with no merges is a character-level model with an <unk> fallback.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token="<unk>"))
    tok.add_special_tokens(list(SPECIAL_TOKENS) + list(ROLE_TOKENS))
    tok.normalizer = normalizers.Lowercase()
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **_TOY_TOKENIZER_ARGS)


# What every toy tokenizer class is built with: its special tokens, left padding, the chat template.
_TOY_TOKENIZER_ARGS: dict[str, Any] = dict(
    pad_token="<pad>",
    bos_token="<bos>",
    eos_token="<eos>",
    unk_token="<unk>",
    additional_special_tokens=list(ROLE_TOKENS),
    padding_side="left",
    clean_up_tokenization_spaces=False,
    chat_template=CHAT_TEMPLATE,
    model_max_length=4096,
)


# Families whose AutoTokenizer class (transformers >= 5) ignores tokenizer.json's pipeline and
# rebuilds its own byte-level BPE from the saved vocabulary and merges.
_BYTE_LEVEL_FAMILIES = {"qwen2": "Qwen2Tokenizer"}


def _byte_level_toy(
    class_name: str, vocab: dict[str, int], pairs: list[tuple[str, str]]
) -> PreTrainedTokenizerBase:
    """The toy vocabulary (same ids) as ``transformers.<class_name>``: each character under its
    byte-level spelling (space -> ``Ġ``, newline -> ``Ċ``), the special tokens as they are."""
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spell = bytes_to_unicode()

    def byte_level(s: str) -> str:
        return s if s in SPECIAL_TOKENS or s in ROLE_TOKENS else "".join(spell[b] for b in s.encode())

    return getattr(transformers, class_name)(
        vocab={byte_level(k): i for k, i in vocab.items()},
        merges=[(byte_level(a), byte_level(b)) for a, b in pairs],
        add_bos_token=True,  # as the other families' toy: <bos> first (that class adds none by default)
        **_TOY_TOKENIZER_ARGS,
    )


# A probe for save_tokenizer: spaces, digits, punctuation, case, non-ASCII text and special tokens.
_ROUND_TRIP_PROBE = 'Reverse 459: ok!  x=1/3; "quoted" (ünïcødé ✓ 漢字)\n<|user|>hi<eos><pad> <bos>'


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained(out_dir)``, then check that what every consumer loads from it
    (``AutoTokenizer.from_pretrained``: transformers, vLLM, TRL) gives the same ids.

    Call after the model's ``config.json`` is written: ``AutoTokenizer`` picks the class by model
    family. Raises ``ValueError`` naming both classes and the first difference when it does not round
    trip (for example a custom tokenizer saved under a family whose tokenizer class rebuilds its own
    pipeline), instead of a checkpoint that trains on other ids than it serves.
    """
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(out_dir)
    loaded = AutoTokenizer.from_pretrained(out_dir)
    for special in (True, False):
        ours = tokenizer(_ROUND_TRIP_PROBE, add_special_tokens=special)["input_ids"]
        theirs = loaded(_ROUND_TRIP_PROBE, add_special_tokens=special)["input_ids"]
        if ours != theirs:
            raise ValueError(
                f"the tokenizer saved to {out_dir} does not round-trip: AutoTokenizer loads it as "
                f"{type(loaded).__name__}, which encodes {_ROUND_TRIP_PROBE!r} as {theirs}, but the "
                f"{type(tokenizer).__name__} that trained gives {ours}; save the checkpoint with a "
                f"tokenizer of the class its model family loads (config.json's model_type)"
            )
    if tokenizer.decode(ours) != loaded.decode(ours):
        raise ValueError(f"the tokenizer saved to {out_dir} decodes differently once loaded by AutoTokenizer")
    if getattr(tokenizer, "chat_template", None) != getattr(loaded, "chat_template", None):
        raise ValueError(f"the tokenizer saved to {out_dir} loses its chat template through AutoTokenizer")


# --------------------------------------------------------------------------- tiny models
def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


# model.tiny.family -> the HF config class. Each class gives the family's own layers: Qwen2's
# q/k/v biases, Qwen3's per-head q/k RMSNorms, Mistral's (here disabled) sliding window.
_FAMILY_CONFIGS = {
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "mistral": "MistralConfig",
}


def _tiny_config(tokenizer: PreTrainedTokenizerBase, cfg: TinyModelConfig, **extra: Any) -> PretrainedConfig:
    """The HF config of ``cfg.family`` sized by ``cfg``; ``extra`` (e.g. ``num_labels``) passes through.

    Mistral's sliding window is off (``None``, as in Mistral 7B v0.2 and later): a window shorter
    than the sequence would need the same masking in HF and vLLM, which no test checks here.
    """
    import transformers

    cfg.validate()
    family_extra: dict[str, Any] = {}
    if cfg.family == "mistral":
        family_extra["sliding_window"] = None
    if cfg.family == "qwen2":
        family_extra["use_sliding_window"] = False
    config_cls = getattr(transformers, _FAMILY_CONFIGS[cfg.family])
    return config_cls(
        vocab_size=_round_up(len(tokenizer)),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings,
        dtype="float32",
        **family_extra,
        **extra,
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, cfg: TinyModelConfig, seed: int) -> PreTrainedModel:
    """A randomly initialised causal LM of ``cfg.family`` sized by ``cfg``; same ``seed``, same weights.

    The vocabulary is ``len(tokenizer)`` rounded up to a multiple of 64. The global
    torch RNG is left untouched.
    """
    from transformers import AutoModelForCausalLM

    config = _tiny_config(tokenizer, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.float().eval()


def build_tiny_reward_model(
    tokenizer: PreTrainedTokenizerBase, cfg: TinyModelConfig, seed: int
) -> PreTrainedModel:
    """A random sequence classifier of ``cfg.family`` with one output: a stand-in reward model for tests."""
    from transformers import AutoModelForSequenceClassification

    config = _tiny_config(tokenizer, cfg, num_labels=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
    return model.float().eval()


# --------------------------------------------------------------------------- checkpoint checks
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _load_config(path: str | os.PathLike, role: str) -> PretrainedConfig:
    from transformers import AutoConfig

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{role}: checkpoint path does not exist: {p}")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ConfigError(f"{role}: {p} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(p)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and role
        raise ConfigError(f"{role}: cannot read {p / 'config.json'}: {e}") from e


def _checkpoint_kind(config: PretrainedConfig) -> str:
    """``"causal_lm"``, ``"seq_cls"`` or ``"unknown"``, from ``architectures`` or ``model_type``."""
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "seq_cls"
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        return "causal_lm"
    if not archs:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return "causal_lm"
    return "unknown"


_KIND_NAMES = {
    "causal_lm": ("a causal-LM checkpoint (a policy)", "a causal-LM (policy / SFT) checkpoint"),
    "seq_cls": (
        "a sequence-classification checkpoint (a reward model)",
        "a sequence-classification reward model (num_labels=1; the rm stage trains one)",
    ),
}


def require_checkpoint_kind(path: str | os.PathLike, role: str, kind: str) -> PretrainedConfig:
    """The checkpoint's config; ConfigError naming ``role`` unless it is of ``kind``.

    ``kind`` is ``"causal_lm"`` (a policy: actor, reference, SFT/DPO/best-of-n start) or
    ``"seq_cls"`` (a reward model). Only ``config.json`` is read, so the check costs
    milliseconds and runs before any weights load.
    """
    config = _load_config(path, role)
    found = _checkpoint_kind(config)
    if found == kind:
        return config
    archs = getattr(config, "architectures", None)
    other = "not a causal LM" if kind == "causal_lm" else "not a sequence-classification reward model"
    if found == "unknown":
        raise ConfigError(
            f"{role}: {path} is {other} checkpoint "
            f"(architectures={archs}, model_type={config.model_type!r}); this role needs {_KIND_NAMES[kind][1]}"
        )
    raise ConfigError(
        f"{role}: {path} is {_KIND_NAMES[found][0]}, {other} (architectures={archs}); "
        f"this role needs {_KIND_NAMES[kind][1]}"
    )


def check_tokenizer_matches(tokenizer: PreTrainedTokenizerBase, model_config: PretrainedConfig) -> None:
    """Raise ConfigError if any token id the tokenizer can produce has no embedding row.

    A tokenizer smaller than the embedding is fine (vocabularies are often padded).
    """
    n_tok, n_emb = len(tokenizer), model_config.vocab_size
    if n_tok > n_emb:
        raise ConfigError(
            f"tokenizer has {n_tok} tokens but the model's embedding has vocab_size={n_emb}; "
            "ids >= vocab_size would index past the embedding (wrong tokenizer for this checkpoint?)"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None and not 0 <= tid < n_emb:
            raise ConfigError(f"tokenizer {name}={tid} is outside the model's vocab_size={n_emb}")


# --------------------------------------------------------------------------- policy directory
INIT_POLICY_DIR = "init_policy"
_SPEC_FILE = "tiny_spec.json"


def _tiny_spec(cfg: TinyModelConfig, seed: int, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    return {
        "tiny": asdict(cfg),
        "seed": seed,
        "tokenizer_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
    }


def prepare_policy(cfg: ModelConfig, work_dir: Path, seed: int) -> tuple[Path, PreTrainedTokenizerBase]:
    """Return ``(directory vLLM loads, tokenizer)`` for the policy.

    Empty ``cfg.path``: build the toy tokenizer and a tiny random model and save both
    to ``work_dir/init_policy`` (reused when its recorded spec matches, rebuilt when
    not). Otherwise check that ``cfg.path`` is a causal-LM checkpoint and that the
    tokenizer (``cfg.tokenizer`` or the checkpoint's own) fits its embedding.
    Call on one rank per node, then barrier; the write is atomic (rename).
    """
    if not cfg.path:
        tokenizer = build_tokenizer(family=cfg.tiny.family)
        out = Path(work_dir) / INIT_POLICY_DIR
        spec = _tiny_spec(cfg.tiny, seed, tokenizer)
        spec_file = out / _SPEC_FILE
        if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
            return out, tokenizer
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{INIT_POLICY_DIR}.", dir=out.parent))
        try:
            build_tiny_model(tokenizer, cfg.tiny, seed).save_pretrained(tmp)
            save_tokenizer(tokenizer, tmp)
            (tmp / _SPEC_FILE).write_text(json.dumps(spec, indent=1))
            if out.exists():
                shutil.rmtree(out)
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished first; fine if it built the same thing
                if not (spec_file.is_file() and json.loads(spec_file.read_text()) == spec):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out, tokenizer

    path = Path(cfg.path)
    config = require_checkpoint_kind(path, "model.path", "causal_lm")
    tokenizer = load_tokenizer(
        cfg.tokenizer or path, role="model.tokenizer" if cfg.tokenizer else "model.path"
    )
    check_tokenizer_matches(tokenizer, config)
    return path, tokenizer


def load_tokenizer(path: str | os.PathLike, role: str = "tokenizer") -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` from a directory, left-padded, with a pad token (eos when it has none)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{role}: tokenizer path does not exist: {p}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and role
        raise ConfigError(f"{role}: cannot load a tokenizer from {p} ({e}); set model.tokenizer") from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"{role}: tokenizer at {p} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------- dtype / attention
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _device_type(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def resolve_dtype(name: str, device: str | torch.device | None = None) -> torch.dtype:
    """``"auto"`` -> bf16 on CUDA (fp16 where bf16 is unsupported), fp32 elsewhere; or a named dtype.

    The trained roles run in this dtype with fp32 master weights and optimizer state (DeepSpeed's
    bf16/fp16 mode); fp16 is refused off CUDA, where DeepSpeed cannot train in it.
    """
    key = name.lower().removeprefix("torch.")
    if key == "auto":
        if _device_type(device) == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if key not in _DTYPES:
        raise ConfigError(f"model.dtype must be auto or one of {sorted(_DTYPES)}, got {name!r}")
    if _DTYPES[key] == torch.float16 and _device_type(device) != "cuda":
        raise ConfigError(
            f"model.dtype={name}: DeepSpeed cannot train in fp16 on {_device_type(device)} "
            "('Type fp16 is not supported on your device'); use bf16 (bf16 weights, fp32 master "
            "weights and optimizer state) or fp32"
        )
    return _DTYPES[key]


_ATTN = ("eager", "sdpa", "flash_attention_2")


def resolve_attn_implementation(
    name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> str:
    """``"auto"`` -> flash_attention_2 on CUDA with flash-attn installed (and a 16-bit dtype), else sdpa."""
    if name != "auto":
        if name not in _ATTN:
            raise ConfigError(f"model.attn_implementation must be auto or one of {list(_ATTN)}, got {name!r}")
        if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation=flash_attention_2 but flash_attn is not installed")
        return name
    if (
        _device_type(device) == "cuda"
        and dtype in (None, torch.bfloat16, torch.float16)
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa"


# --------------------------------------------------------------------------- loaders
def load_causal_lm(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "auto",
    device: str | torch.device | None = None,
    *,
    role: str = "model.path",
) -> PreTrainedModel:
    """Load a causal LM (actor, reference) on CPU in ``dtype``; errors if it is not one.

    ``device`` only steers ``attn_implementation="auto"``; the caller moves the model.
    ``role`` (the config key the path came from) leads any error message.
    """
    from transformers import AutoModelForCausalLM

    require_checkpoint_kind(path, role, "causal_lm")
    attn = resolve_attn_implementation(attn_implementation, device, dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)


def load_reward_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "auto",
    device: str | torch.device | None = None,
    *,
    role: str = "reward.model_path",
) -> PreTrainedModel:
    """Load a frozen one-output sequence classifier (``num_labels == 1``) in eval mode.

    A causal-LM checkpoint, or a classifier with several labels, is a ConfigError naming ``role``.
    """
    from transformers import AutoModelForSequenceClassification

    config = require_checkpoint_kind(path, role, "seq_cls")
    if config.num_labels != 1:
        raise ConfigError(f"{role}: {path} has num_labels={config.num_labels}; a reward model needs 1")
    if config.pad_token_id is None:
        # The classifier scores the last non-pad token; it needs to know the pad id.
        eos = config.eos_token_id
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is None:
            raise ConfigError(f"{role}: {path} has no pad_token_id or eos_token_id in config.json")
        config.pad_token_id = eos
    attn = resolve_attn_implementation(attn_implementation, device, dtype)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation=attn
    )
    model.eval().requires_grad_(False)
    return model


# --------------------------------------------------------------------------- RL-time model surgery
# Config keys that scale the output logits after the LM head's matmul, as the HF models apply them:
# key -> (how, neutral value). "mul": logits * v (Cohere's logit_scale); "div": logits / v (Granite).
LOGIT_SCALES = {"logit_scale": ("mul", 1.0), "logits_scaling": ("div", 1.0)}
# Transforms of the final logits that no temperature can express.
LOGIT_REFUSED = ("final_logit_softcapping",)


def logit_multiplier(config: Any) -> float:
    """The factor an HF model applies to ``hidden @ lm_head.T`` before its logits are returned.

    Cohere multiplies the logits by ``logit_scale``; Granite divides them by ``logits_scaling``.
    Log-prob paths that take the LM head's weight directly (``tritonrlhf.kernels.linear_logprobs``) must apply
    the same factor, or their log-probs differ from the model's (and from vLLM's) silently. A
    transform that is not a plain factor (Gemma 2's ``final_logit_softcapping``) raises
    ``ValueError`` naming it.
    """
    name = type(config).__name__
    for key in LOGIT_REFUSED:
        if getattr(config, key, None):
            raise ValueError(
                f"{name}: {key}={getattr(config, key)} (a tanh soft-cap of the final logits) is not "
                f"supported by the fused log-prob path (kernels.linear_logprobs), which would give "
                f"log-probs of the uncapped logits"
            )
    mult = 1.0
    for key, (how, neutral) in LOGIT_SCALES.items():
        v = getattr(config, key, None)
        if v is None or v == neutral:
            continue
        v = float(v)
        if not v > 0:
            raise ValueError(f"{name}: {key}={v} must be > 0")
        mult = mult * v if how == "mul" else mult / v
    return mult


def disable_dropout(model: torch.nn.Module) -> int:
    """Turn off every dropout of ``model`` for RL (as TRL does), so that the training forward equals
    the scoring forward and the first PPO ratio is exactly 1 for any checkpoint.

    Sets ``p = 0`` on ``nn.Dropout`` modules, zeroes the float attributes HF attention layers read
    at forward time (``attention_dropout``, ``dropout``) and the config's ``*dropout*`` fields.
    Returns how many settings were non-zero before.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p != 0
            module.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            v = getattr(module, attr, None)
            if isinstance(v, float) and not isinstance(v, bool):
                changed += v != 0
                setattr(module, attr, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for key, v in config.to_dict().items():
                if "dropout" in key and isinstance(v, float) and v != 0:
                    changed += 1
                    setattr(config, key, 0.0)
    return int(changed)
