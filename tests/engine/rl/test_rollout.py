"""Rollout engines against an fp32 HF forward of the same tiny model.

One in-process vLLM engine serves the whole module (building one costs seconds, and vLLM keeps
process-global parallel state).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import GAP_TOL_FP32
from tritonrlhf.engine.config import RolloutConfig
from tritonrlhf.engine.rl.hf_rollout import HFRollout
from tritonrlhf.engine.rl.rollout import RolloutEngine, Sample, processed_logprobs, truncation_logmass

sys.path.insert(0, str(Path(__file__).parents[1] / "_scripts"))
from rollout_tiny import build_tokenizer, save_tiny_llama  # noqa: E402

T = 0.7
PROMPT = [72, 101, 108, 108, 111, 44, 32]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vllm_rollout(tiny_dir):
    pytest.importorskip("vllm")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from tritonrlhf.engine.rl.rollout import VLLMRollout

    threads = torch.get_num_threads()
    r = VLLMRollout(
        str(tiny_dir),
        RolloutConfig(temperature=T, max_new_tokens=12, kv_cache_gib=1),
        seed=0,
        max_model_len=128,
        bans=True,  # test_constraints shares this engine and swaps in configs that ban text
        truncation=True,  # and the top-k/top-p test below swaps in a truncating config
    )
    r.threads_before = threads
    yield r
    r.close()


def hf_logprobs(
    model, prompt: list[int], response: list[int], temperature=T, top_k=-1, top_p=1.0
) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return processed_logprobs(logits, ids[0, len(prompt) :], temperature, top_k, top_p)


# --------------------------------------------------------------------------- reference
def test_processed_logprobs_matches_explicit_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 37, generator=g, dtype=torch.float64) * 3
    tok = torch.randint(0, 37, (5,), generator=g)
    want = (logits / 0.7).log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    torch.testing.assert_close(processed_logprobs(logits, tok, 0.7).double(), want, atol=1e-5, rtol=0)
    # top-k: tokens outside the k best are impossible, the rest renormalise over k.
    lp = processed_logprobs(logits, logits.argsort(-1)[:, 0], 1.0, top_k=4)
    assert torch.isinf(lp).all()
    top = logits.topk(4, -1)
    want_k = top.values.log_softmax(-1)[:, 0]
    torch.testing.assert_close(
        processed_logprobs(logits, top.indices[:, 0], 1.0, top_k=4).double(), want_k, atol=1e-5, rtol=0
    )
    # top-p tiny: only the argmax survives, with log-prob 0.
    assert torch.allclose(processed_logprobs(logits, logits.argmax(-1), 1.0, top_p=1e-6), torch.zeros(5))


def _brute_truncation_logmass(logits, T, top_k, top_p, banned) -> torch.Tensor:
    """float64, one row at a time, from the definitions: the mass of the kept tokens under the
    banned softmax(logits / T); top-k keeps every token tied with the k-th; top-p then drops the
    least likely tokens (of the top-k renormalised distribution) while their cumulative mass stays
    <= 1 - p, keeping at least the most likely one."""
    out = []
    for x, ban in zip(logits.double() / T, banned):
        p = torch.where(ban, 0.0, (x - x[~ban].max()).exp())
        p = p / p.sum()
        keep = ~ban
        if 0 < top_k < len(x):
            kth = sorted(x[keep].tolist(), reverse=True)[min(top_k, int(keep.sum())) - 1]
            keep = keep & (x >= kth)
        if top_p < 1.0:
            q = torch.where(keep, p, 0.0)
            q = q / q.sum()
            order = sorted(torch.nonzero(keep).flatten().tolist(), key=lambda i: float(q[i]))
            cum = 0.0
            for i in order[:-1]:
                cum += float(q[i])
                if cum > 1.0 - top_p:
                    break
                keep[i] = False
        out.append(float(p[keep].sum()))
    return torch.tensor(out, dtype=torch.float64).log()


@pytest.mark.parametrize(
    "top_k, top_p, T, ties, ban",
    [
        (5, 1.0, 1.0, False, False),
        (-1, 0.8, 1.0, False, False),
        (7, 0.6, 0.7, False, False),
        (3, 0.9, 1.3, True, False),  # logits in steps of 1: ties at the k-th and in the nucleus
        (-1, 0.5, 0.7, True, False),
        (6, 0.7, 0.7, False, True),  # after a ban: the mass kept of the banned distribution
        (500, 1.0, 0.7, False, False),  # k >= V: nothing cut
        (-1, 1.0, 0.7, False, True),  # neither: 0 even with a ban
    ],
)
def test_truncation_logmass_matches_float64_brute_force(top_k, top_p, T, ties, ban):
    g = torch.Generator().manual_seed(top_k + int(100 * top_p))
    L, V = 6, 41
    logits = torch.randn(L, V, generator=g) * 2.5
    if ties:
        logits = logits.round()
    banned = torch.rand(L, V, generator=g) < (0.3 if ban else 0.0)
    got = truncation_logmass(logits, T, top_k, top_p, banned if ban else None)
    want = _brute_truncation_logmass(logits, T, top_k, top_p, banned)
    assert got.dtype == torch.float32 and got.shape == (L,)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    if top_k in (-1, 500) and top_p == 1.0:
        assert (got == 0).all()
    else:
        assert (got < -1e-3).any()
    # The sampled token's processed log-prob minus the kept mass is its untruncated log-prob.
    ban_mask = banned if ban else None
    tok = logits.masked_fill(banned, float("-inf")).argmax(-1)  # always inside the nucleus
    truncated = processed_logprobs(logits, tok, T, top_k, top_p, ban_mask)
    full = processed_logprobs(logits, tok, T, banned=ban_mask)
    torch.testing.assert_close(truncated + got, full, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- vLLM
def test_vllm_generate_logprobs_match_hf_forward(vllm_rollout, hf_model):
    assert isinstance(vllm_rollout, RolloutEngine)
    out = vllm_rollout.generate([PROMPT, PROMPT[:3]], n=3, seed=11)
    assert [len(g) for g in out] == [3, 3]
    samples = [s for g in out for s in g]
    assert all(isinstance(s, Sample) and s.policy_version == vllm_rollout.policy_version for s in samples)
    assert len({tuple(s.response_ids) for s in samples}) > 1, "n samples per prompt must differ"
    for s in samples:
        assert s.finish_reason in ("stop", "length") and len(s.logprobs) == len(s.response_ids) > 0
        ref = hf_logprobs(hf_model, s.prompt_ids, s.response_ids)
        err = (torch.tensor(s.logprobs) - ref).abs().max().item()
        assert err < 1e-4, f"vLLM processed log-probs vs HF log_softmax(logits/T): {err}"
    # T != 1 matters: the untempered log-probs are clearly different.
    s = samples[0]
    assert (
        hf_logprobs(hf_model, s.prompt_ids, s.response_ids, temperature=1.0) - torch.tensor(s.logprobs)
    ).abs().max() > 1e-2


def test_vllm_leaves_the_trainers_torch_threads(vllm_rollout):
    """vLLM drops torch to one thread unless OMP_NUM_THREADS is set; the trainer shares the
    process, so the rollout keeps the count torch had (keep_torch_threads)."""
    assert torch.get_num_threads() == vllm_rollout.threads_before
    assert os.environ["OMP_NUM_THREADS"] == str(vllm_rollout.threads_before)


def test_vllm_deterministic_given_seed(vllm_rollout):
    a = vllm_rollout.generate([PROMPT, PROMPT[:2]], n=2, seed=5)
    b = vllm_rollout.generate([PROMPT[:2]], n=2, seed=5 + 2)  # same per-request seeds, other batch
    c = vllm_rollout.generate([PROMPT, PROMPT[:2]], n=2, seed=5)
    assert [s.response_ids for g in a for s in g] == [s.response_ids for g in c for s in g]
    assert [s.response_ids for s in a[1]] == [s.response_ids for s in b[0]]


def test_vllm_sequence_logprobs_match_hf_forward(vllm_rollout, hf_model):
    response = [119, 111, 114, 108, 100, 33, 10, 65, 256, 3]
    got = torch.tensor(vllm_rollout.sequence_logprobs(PROMPT, response))
    ref = hf_logprobs(hf_model, PROMPT, response)
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-4


def test_vllm_logprob_gap_excludes_top_k_top_p_truncation(vllm_rollout, hf_model):
    """vLLM's truncation recorder (vllm_logits.TruncationLogitsProcessor): with top-k/top-p the
    gap to an untruncated fp32 forward is the engine mismatch alone once ``trunc_logmass`` is
    added back, and the truncation's cost shows as ``rollout/truncation_kl``."""
    import dataclasses

    base = vllm_rollout.cfg
    vllm_rollout.cfg = dataclasses.replace(base, top_k=20, top_p=0.9)
    try:
        samples = [s for g in vllm_rollout.generate([PROMPT, PROMPT[:3]], n=3, seed=4) for s in g]
    finally:
        vllm_rollout.cfg = base
    for s in samples:
        assert len(s.trunc_logmass) == len(s.response_ids) and max(s.trunc_logmass) <= 0
    stats = _gap_stats(samples, hf_model)
    print(stats)
    assert stats["rollout/logprob_gap"] < GAP_TOL_FP32
    assert stats["rollout/truncation_kl"] > 1e-2
    assert stats["mixed_gap"] == pytest.approx(stats["rollout/truncation_kl"], rel=1e-3)
    # Untruncated requests are not tagged: no record, no metric (and nothing left in the table).
    from tritonrlhf.engine.rl.vllm_logits import TRUNC_LOGMASS

    assert vllm_rollout.generate([PROMPT], n=1, seed=4)[0][0].trunc_logmass is None and not TRUNC_LOGMASS


# --------------------------------------------------------------------------- HF fallback
@pytest.mark.parametrize("decode", ["static", "generate"])
def test_hf_rollout_matches_forward_and_stops_at_eos(hf_model, decode):
    tok = build_tokenizer()
    cfg = RolloutConfig(backend="hf", temperature=T, top_k=20, max_new_tokens=10, hf_decode=decode)
    r = HFRollout(hf_model, tok, cfg)
    assert (r.decoder is not None) == (decode == "static")
    out = r.generate([PROMPT, PROMPT[:2]], n=2, seed=3)
    again = r.generate([PROMPT, PROMPT[:2]], n=2, seed=3)
    assert [s.response_ids for g in out for s in g] == [s.response_ids for g in again for s in g]
    for s in (s for g in out for s in g):
        ref = hf_logprobs(hf_model, s.prompt_ids, s.response_ids, top_k=20)
        assert torch.isfinite(ref).all(), "sampled a token outside the top-k"
        assert (torch.tensor(s.logprobs) - ref).abs().max() < 1e-4
        assert (tok.eos_token_id in s.response_ids) == (s.finish_reason == "stop")
        if s.finish_reason == "stop":
            assert s.response_ids[-1] == tok.eos_token_id
    seq = torch.tensor(r.sequence_logprobs(PROMPT, out[0][0].response_ids))
    assert (seq - torch.tensor(out[0][0].logprobs)).abs().max() < 1e-4


@pytest.mark.parametrize("decode", ["static", "generate"])
def test_hf_rollout_ignores_generation_config_sampling_defaults_and_stops_on_its_eos_list(
    hf_model, tmp_path, decode
):
    """A checkpoint whose generation_config carries repetition_penalty=1.5, no_repeat_ngram_size
    and its own temperature/top-k, plus an extra EOS id in a list (as Llama 3 and Qwen2 ship).
    The HF rollout must sample from softmax(logits / T) with the configured top-k only -- its
    log-probs, taken from the scores generate sampled with, equal a fresh forward's -- and stop on
    the extra id, as vLLM does."""
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    cfg = RolloutConfig(backend="hf", temperature=T, top_k=20, max_new_tokens=16, hf_decode=decode)
    prompts = [PROMPT, PROMPT[:3]]
    plain = HFRollout(hf_model, tok, cfg).generate(prompts, n=3, seed=5)
    emitted = [t for g in plain for s in g for t in s.response_ids[1:]]
    counts = torch.bincount(torch.tensor(emitted), minlength=len(tok))
    counts[tok.eos_token_id] = 0
    extra = int(counts.argmax())  # a token the samples emit after their first position
    assert counts[extra] >= 2

    hf_model.save_pretrained(tmp_path)
    gen = copy.deepcopy(hf_model.generation_config)  # the fixture model stays as it was
    gen.eos_token_id = [tok.eos_token_id, extra]
    gen.repetition_penalty, gen.no_repeat_ngram_size, gen.temperature, gen.top_k = 1.5, 2, 1.3, 5
    gen.do_sample = True
    gen.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert model.generation_config.repetition_penalty == 1.5  # the checkpoint does carry them
    r = HFRollout(model, tok, cfg)
    assert r.stop_ids == [tok.eos_token_id, extra]
    out = r.generate(prompts, n=3, seed=5)
    assert model.generation_config.repetition_penalty == 1.5  # restored after the call
    stopped_on_extra = 0
    for s, p in zip((s for g in out for s in g), (s for g in plain for s in g)):
        ref = hf_logprobs(model, s.prompt_ids, s.response_ids, top_k=20)
        assert (torch.tensor(s.logprobs) - ref).abs().max() < 1e-5
        # Same seed, same distribution: the same tokens as without the extra id, cut at its first use.
        cut = next((k + 1 for k, t in enumerate(p.response_ids) if t in (extra, tok.eos_token_id)), None)
        assert s.response_ids == p.response_ids[:cut]
        assert s.finish_reason == ("stop" if cut else "length")
        stopped_on_extra += s.response_ids[-1] == extra
    assert stopped_on_extra >= 1


def _gap_stats(samples, model) -> dict[str, float]:
    """``logprob_stats`` of ``samples`` collated as the trainer does, against the trainer's
    log-probs (an untruncated fp32 forward at temperature T)."""
    from types import SimpleNamespace

    from tritonrlhf.engine.rl.experience import Experience, collate_samples
    from tritonrlhf.engine.rl.experience_maker import ExperienceMixin

    rb = collate_samples(samples, build_tokenizer(), pad_id=257)
    old = torch.zeros_like(rb.rollout_logprobs)
    for i, s in enumerate(samples):
        old[i, : len(s.response_ids)] = hf_logprobs(model, s.prompt_ids, s.response_ids)
    exp = Experience(
        rb.sequences,
        rb.attention_mask,
        rb.action_mask,
        old_logprobs=old,
        rollout_logprobs=rb.rollout_logprobs,
        kept_logmass=rb.kept_logmass,
        trunc_logmass=rb.trunc_logmass,
    )
    trainer = SimpleNamespace(cfg=None)
    with_trunc = ExperienceMixin.logprob_stats(trainer, exp, torch.zeros_like(old))
    exp.trunc_logmass = None  # what the gap was before the truncation had its own metric
    mixed = ExperienceMixin.logprob_stats(trainer, exp, torch.zeros_like(old))["rollout/logprob_gap"]
    return with_trunc | {"mixed_gap": mixed}


@pytest.mark.parametrize("decode", ["static", "generate"])
def test_hf_rollout_logprob_gap_excludes_top_k_top_p_truncation(hf_model, decode):
    """With top-k/top-p the rollout's log-probs are those of the truncated, renormalised
    distribution, the trainer's are not: ``rollout/logprob_gap`` adds the recorded
    ``trunc_logmass`` back and is the engine mismatch alone (fp32 noise here, the same model),
    ``rollout/truncation_kl`` is the truncation's cost."""
    cfg = RolloutConfig(backend="hf", temperature=T, top_k=20, top_p=0.9, max_new_tokens=10, hf_decode=decode)
    r = HFRollout(hf_model, build_tokenizer(), cfg)
    samples = [s for g in r.generate([PROMPT, PROMPT[:2]], n=3, seed=4) for s in g]
    for s in samples:
        assert len(s.trunc_logmass) == len(s.response_ids) and max(s.trunc_logmass) <= 0
    stats = _gap_stats(samples, hf_model)
    print(decode, stats)
    assert stats["rollout/logprob_gap"] < 1e-5
    assert stats["rollout/truncation_kl"] > 1e-2
    assert stats["mixed_gap"] == pytest.approx(stats["rollout/truncation_kl"], rel=1e-3)
    # Without truncation there is nothing to record, and no metric.
    plain = HFRollout(
        hf_model, build_tokenizer(), RolloutConfig(backend="hf", temperature=T, hf_decode=decode)
    )
    s = plain.generate([PROMPT], n=1, seed=4)[0][0]
    assert s.trunc_logmass is None and "rollout/truncation_kl" not in _gap_stats([s], hf_model)
