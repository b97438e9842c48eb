"""Hard constraints at sampling (``rollout.banned_strings`` / ``banned_patterns``).

The token-level ban against brute force, the config checks, both rollout backends on a tiny random
model that does emit the banned text without the ban (never with it, and the log-probs equal
:func:`processed_logprobs` with the ban masks of an fp32 HF forward), and a short GRPO run.
The rollout fixtures (tiny model, byte-level tokenizer, one in-process vLLM engine) are
``test_rollout``'s.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import GAP_TOL_FP32
from tests.engine.rl import test_rollout
from tests.engine.rl.test_rollout import PROMPT, T
from tritonrlhf.engine.config import ConfigError, PPOConfig, RolloutConfig, load_config
from tritonrlhf.engine.rl.constraints import BannedText, kept_logmass
from tritonrlhf.engine.rl.hf_rollout import HFRollout
from tritonrlhf.engine.rl.rollout import processed_logprobs

sys.path.insert(0, str(Path(__file__).parents[1] / "_scripts"))
from rollout_tiny import build_tokenizer  # noqa: E402

# Frequent in the tiny model's unconstrained samples ('7', 'w', '(' and '`' each appear in 10-25%
# of them); 'b(' spans two tokens, 'é' two bytes (two tokens of the byte-level vocabulary).
STRINGS = ["7", "w", "b(", "é"]
PATTERNS = [r"[(`]", r"p\W"]


# test_rollout's module fixtures, instantiated for this module: the tiny checkpoint, its fp32 HF
# model and one in-process vLLM engine (T = 0.7, 12 new tokens, no bans: tests swap its cfg).
tiny_dir, hf_model, vllm_rollout = test_rollout.tiny_dir, test_rollout.hf_model, test_rollout.vllm_rollout


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def names(tok, mask: torch.Tensor) -> set[str]:
    return {tok.decode([i]) for i in mask.nonzero().flatten().tolist()}


# --------------------------------------------------------------------------- the token-level ban
def test_bans_exactly_the_tokens_that_complete_banned_text(tok):
    ban = BannedText(tok, ["ab", "xyz"], [r"q\d"])
    assert names(tok, ban.banned_mask(enc(tok, "hello"))) == set()
    assert names(tok, ban.banned_mask(enc(tok, "cra"))) == {"b"}  # 'ab' spans two tokens
    assert names(tok, ban.banned_mask(enc(tok, "xy"))) == {"z"}  # 'xyz' spans three
    assert names(tok, ban.banned_mask(enc(tok, "x"))) == set()
    assert names(tok, ban.banned_mask(enc(tok, "aq"))) == set("0123456789")
    # A two-byte character: its second byte is banned after its first, and nowhere else.
    e = enc(tok, "é")
    ban_e = BannedText(tok, ["é"])
    assert len(e) == 2 and ban_e.banned_mask(e[:1])[e[1]] and not ban_e.banned_mask(e[:1]).sum() > 1
    assert not ban_e.banned_mask(enc(tok, "a"))[e[1]]
    # Padded vocabulary past the tokenizer: never banned, mask sized to the model's vocabulary.
    assert ban.banned_mask(enc(tok, "a"), 264).shape == (264,)


@pytest.mark.parametrize(
    "strings, patterns",
    [(["ab", "b a", "é", "ü!"], []), ([], [r"[0-9]{2}", r"a.?c", r"(?<=x)y", r"^q", r"\bz\b", r"é+"])],
)
def test_mask_equals_brute_force_decoding(tok, strings, patterns):
    """For random prefixes (ASCII and multi-byte text), token t is banned iff ``decode(prefix + [t])``
    violates and ``decode(prefix)`` does not: the fast path (pieces, tables, windows) is exact."""
    ban = BannedText(tok, strings, patterns)
    rng = random.Random(0)
    alphabet = "ab cxyzq0123é!ü"
    checked = 0
    for _ in range(60):
        ids = enc(tok, "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))))
        if rng.random() < 0.3:
            ids = ids[:-1]  # may end inside a multi-byte character
        if ban.violates(ban.decode(ids)):
            continue
        want = torch.tensor([ban.violates(ban.decode(ids + [t])) for t in range(len(tok))])
        got = ban.banned_mask(ids)
        assert torch.equal(got, want), (ban.decode(ids), names(tok, got ^ want))
        checked += 1
    assert checked > 30


def test_everything_banned_falls_back_to_eos(tok):
    """When no token avoids the ban (here the text so far already matches, so every continuation
    does), EOS stays allowed: the response ends rather than emit more banned text."""
    ban = BannedText(tok, [], [r"x"])
    mask = ban.banned_mask(enc(tok, "ax"))
    assert not mask[tok.eos_token_id] and int(mask.sum()) == len(tok) - 1


def test_processed_logprobs_with_ban_mask_renormalises():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 11, generator=g)
    banned = torch.zeros(4, 11, dtype=torch.bool)
    banned[:, :3] = True
    tok_ids = torch.tensor([5, 6, 7, 0])
    lp = processed_logprobs(logits, tok_ids, 0.7, banned=banned)
    want = (logits[:, 3:] / 0.7).log_softmax(-1).gather(-1, (tok_ids - 3).clamp(min=0)[:, None])[:, 0]
    torch.testing.assert_close(lp[:3], want[:3])
    assert lp[3] == float("-inf")
    # constrained + kept_logmass = unconstrained
    kept = kept_logmass(logits, banned, 0.7)
    torch.testing.assert_close(lp[:3] + kept[:3], processed_logprobs(logits, tok_ids, 0.7)[:3])


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.banned_patterns=['a(b']", r"rollout.banned_patterns\[0\]: 'a\(b' is not a valid regular"),
        ("rollout.banned_patterns=['x', 'a*']", r"rollout.banned_patterns\[1\]: 'a\*' matches the empty"),
        ("rollout.banned_strings=['ok', '']", r"rollout.banned_strings\[1\] must be a non-empty string"),
        ("rollout.banned_strings=abc", r"rollout.banned_strings must be a list of strings"),
    ],
)
def test_config_refuses_bad_bans(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PPOConfig, None, [override]).validate()


def test_config_takes_bans_in_every_stage():
    cfg = load_config(
        PPOConfig, None, ["rollout.banned_strings=[foo, 'b r']", "rollout.banned_patterns=['\\d+']"]
    )
    cfg.validate()
    assert cfg.rollout.banned_strings == ["foo", "b r"] and cfg.rollout.banned_patterns == [r"\d+"]
    from tritonrlhf.engine.stages.revise import ReviseConfig

    with pytest.raises(ConfigError, match=r"critique.banned_patterns\[0\]"):
        load_config(ReviseConfig, None, ["critique.banned_patterns=['[']"]).critique.validate("critique")


# --------------------------------------------------------------------------- rollouts
def _hf_reference(model, ban: BannedText, s) -> torch.Tensor:
    """processed_logprobs with the ban masks, from an fp32 HF forward of prompt + response."""
    ids = torch.tensor([s.prompt_ids + s.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1]
    banned = ban.banned_masks(s.response_ids, logits.shape[-1])
    return processed_logprobs(logits, ids[0, len(s.prompt_ids) :], T, banned=banned), logits, banned


def _hit_rate(tok, ban: BannedText, samples) -> float:
    texts = [tok.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    return sum(ban.violates(t) for t in texts) / len(texts)


def _check_constrained(engine, model, tok, prompts, seed) -> dict[str, float]:
    """Unconstrained vs constrained samples of ``engine`` (a rollout whose cfg is swapped)."""
    ban = BannedText(tok, STRINGS, PATTERNS)
    base = engine.cfg
    free = [s for g in engine.generate(prompts, n=16, seed=seed) for s in g]
    engine.cfg = dataclasses.replace(base, banned_strings=STRINGS, banned_patterns=PATTERNS)
    try:
        held = [s for g in engine.generate(prompts, n=16, seed=seed) for s in g]
        seq = engine.sequence_logprobs(held[0].prompt_ids, held[0].response_ids)
    finally:
        engine.cfg = base
    gaps, kept_gaps = [], []
    for s in held:
        ref, logits, banned = _hf_reference(model, ban, s)
        gaps.append((torch.tensor(s.logprobs) - ref).abs().max().item())
        kept_gaps.append((torch.tensor(s.kept_logmass) - kept_logmass(logits, banned, T)).abs().max().item())
    seq_gap = (torch.tensor(seq) - torch.tensor(held[0].logprobs)).abs().max().item()
    out = {
        "free_hit_rate": _hit_rate(tok, ban, free),
        "held_hit_rate": _hit_rate(tok, ban, held),
        "max_gap": max(gaps),
        "max_kept_gap": max(kept_gaps),
        "seq_gap": seq_gap,
        "constrained_steps": sum(k < -1e-6 for s in held for k in s.kept_logmass)
        / sum(len(s.kept_logmass) for s in held),
    }
    print(out)
    return out


def _assert_constrained(r: dict[str, float]) -> None:
    assert r["free_hit_rate"] > 0.3, "the unconstrained model must emit the banned text often"
    assert r["held_hit_rate"] == 0.0
    assert r["max_gap"] < 1e-4 and r["max_kept_gap"] < 1e-4 and r["seq_gap"] < 1e-4
    assert r["constrained_steps"] > 0.5  # the ban did remove mass at most steps


def test_vllm_constrained_sampling(vllm_rollout, hf_model, tok):
    """Banned text through vLLM's logits processors: never emitted, and vLLM's processed log-probs
    are those of the masked distribution (the reference formula with the ban masks)."""
    r = _check_constrained(vllm_rollout, hf_model, tok, [PROMPT, PROMPT[:3]], seed=1)
    _assert_constrained(r)


def test_vllm_engine_without_the_ban_processor_refuses_bans():
    """An engine opened without bans registers no logits processor (none runs at each decode
    step); a request that bans text is then refused, not sampled unconstrained."""
    pytest.importorskip("vllm")
    from tritonrlhf.engine.rl.rollout import VLLMRollout

    engine = object.__new__(VLLMRollout)  # the guard only: no engine needed
    engine._bans_on, engine._requests = False, 0
    engine.cfg = RolloutConfig(banned_strings=["ab"])
    with pytest.raises(ValueError, match="built without the banned-text processor"):
        engine._params(seed=0)
    engine.cfg = RolloutConfig()
    assert engine._params(seed=0).extra_args is None


@pytest.mark.parametrize("decode", ["static", "generate"])
def test_hf_constrained_sampling(hf_model, tok, decode):
    cfg = RolloutConfig(backend="hf", temperature=T, max_new_tokens=12, hf_decode=decode)
    engine = HFRollout(hf_model, tok, cfg)
    assert (engine.decoder is not None) == (decode == "static")
    r = _check_constrained(engine, hf_model, tok, [PROMPT, PROMPT[:3]], seed=1)
    _assert_constrained(r)


# --------------------------------------------------------------------------- a short RL run
@pytest.mark.slow
def test_grpo_run_never_samples_banned_text(tmp_path):
    """Three GRPO steps (real vLLM, one rank) with bans that cover 6 of the toy vocabulary's 57
    characters: about 9.5% of the mass at each step (constraint_kl measured 0.10-0.12 per token),
    so about 4 in 5 unconstrained 16-token responses would hit one. No logged sample (every sample
    of every step is logged) contains them, the log-prob gap without the ban's renormalisation
    stays at the weight-sync level (measured 2e-7), and the ban's cost is reported."""
    from ppo_launch import REPO, launch, require

    from tritonrlhf.engine.models import build_tokenizer as toy_tokenizer

    require("vllm", "deepspeed")
    strings, patterns = ["e", "7", "x."], [r"[0-3]", r"q.?z"]
    extra = [
        "total_steps=3",
        f"rollout.banned_strings={json.dumps(strings)}",
        f"rollout.banned_patterns={json.dumps(patterns)}",
        "logging.samples_every=1",
        "logging.samples_per_step=64",  # every sample of the step
    ]
    run = launch(tmp_path / "run", extra, timeout_s=420, config=REPO / "configs" / "grpo_tiny.yaml")
    print(f"constrained grpo run: {run.wall_s:.0f}s")
    run.check()
    rows = [json.loads(line) for line in (run.out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 32
    ban = BannedText(toy_tokenizer(), strings, patterns)
    assert not [r["response"] for r in rows if ban.violates(r["response"])]
    assert not any(s in r["response"] for r in rows for s in strings)
    assert not any(re.search(p, r["response"]) for r in rows for p in patterns)
    metrics = run.metrics
    print([(m["rollout/logprob_gap"], m["rollout/constraint_kl"]) for m in metrics])
    assert all(m["rollout/logprob_gap"] < GAP_TOL_FP32 for m in metrics)
    assert all(m["rollout/constraint_kl"] > 1e-3 for m in metrics)


# --------------------------------------------------------------------------- real tokenizers
_WORDS = [
    "hello",
    "world",
    "the",
    "cat",
    "sat",
    "on",
    "bad",
    "word",
    "good",
    "day",
    "über",
    "naïve",
    "42",
    "q1",
]


def _corpus(n: int = 2000) -> list[str]:
    rng = random.Random(0)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10))) + rng.choice(".!? ") for _ in range(n)
    ]


@pytest.fixture(scope="module", params=["sentencepiece", "byte_level_bpe"])
def real_tok(request, tmp_path_factory):
    """A SentencePiece BPE model (byte fallback; loaded as transformers' Llama tokenizer, whose
    decode drops the first piece's leading space) and a byte-level BPE (GPT-2 style, which keeps
    it), both trained here on generated text in well under a second."""
    if request.param == "sentencepiece":
        import io

        spm = pytest.importorskip("sentencepiece")
        from transformers import LlamaTokenizer

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=400, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
            minloglevel=2,
        )  # fmt: skip
        d = tmp_path_factory.mktemp("sp")
        (d / "tokenizer.model").write_bytes(buf.getvalue())
        tok = LlamaTokenizer.from_pretrained(str(d))
        assert tok.convert_ids_to_tokens(enc(tok, "hello world"))[0] == "\u2581hello"
        return tok
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=320, min_frequency=2, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def _brute(ban: BannedText, tok, ids: list[int]) -> torch.Tensor:
    return torch.tensor([ban.violates(ban.decode(ids + [t])) for t in range(len(tok))])


def test_first_token_anchor_and_leading_space_on_real_tokenizers(real_tok):
    """The response's first token decodes alone: SentencePiece drops its leading space ('▁hello'
    -> 'hello'), a byte-level BPE keeps it ('Ġhello' -> ' hello'). So on the first token ``^hello``
    must ban '▁hello', and the string ' hello' must not (it cannot appear there); later, ' hello'
    is banned after text and ``^hello`` no longer applies."""
    tok = real_tok
    sp = "\u2581hello" in tok.get_vocab()
    hello = tok.convert_tokens_to_ids("\u2581hello" if sp else "\u0120hello")  # the word with its space
    bare = tok.convert_tokens_to_ids("hello")
    anchored, spaced = BannedText(tok, [], [r"^hello"]), BannedText(tok, [" hello"])
    first = tok.decode([hello], skip_special_tokens=True)
    assert first == ("hello" if sp else " hello")
    assert bool(anchored.banned_mask([])[hello]) is sp  # '^hello' matches 'hello', not ' hello'
    assert bool(spaced.banned_mask([])[hello]) is not sp
    if bare != tok.unk_token_id and bare is not None:
        assert anchored.banned_mask([])[bare] and not spaced.banned_mask([])[bare]
    for ban in (anchored, spaced):
        assert torch.equal(ban.banned_mask([]), _brute(ban, tok, []))
    after = enc(tok, "the cat")
    assert spaced.banned_mask(after)[hello] and not anchored.banned_mask(after)[hello]


@pytest.mark.parametrize(
    "strings, patterns",
    [
        ([" hello", "d w", "über", "t."], []),
        ([], [r"^hel", r"^\s", r"\bcat\b", r"ü", r"[0-9]{2}", r"^the c"]),
    ],
)
def test_mask_equals_brute_force_decoding_on_real_tokenizers(real_tok, strings, patterns):
    """As test_mask_equals_brute_force_decoding, on the two trained tokenizers, from the empty
    response on (where SentencePiece's first piece loses its space)."""
    tok = real_tok
    ban = BannedText(tok, strings, patterns)
    rng = random.Random(1)
    checked = 0
    for i in range(25):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(0, 4))]
        ids = [] if i < 3 else enc(tok, " ".join(words))[: rng.randint(0, 6)]
        if ban.violates(ban.decode(ids)):
            continue
        got = ban.banned_mask(ids)
        want = _brute(ban, tok, ids)
        assert torch.equal(got, want), (ban.decode(ids), names(tok, got ^ want))
        checked += 1
    assert checked > 12
