"""The static loop's decode step as a CUDA graph (engine.rl.static_decode, ``rollout.cuda_graph``).

On CPU: the fixed-shape step that the graph captures, run eagerly (``step="fixed"``), decodes
what the shrinking loop decodes (same tokens, log-probs within fp32 noise) for every family, as
rows stop at different steps; ``rollout.cuda_graph`` picks the step (auto -> eager off CUDA, with
the reason printed; on -> an error off CUDA); a capture that fails under auto falls back to the
eager loop from the same seed. On CUDA (the GPU check): the graph decodes what the eager fixed
step decodes.
"""

from __future__ import annotations

import pytest
import torch

from tritonrlhf.engine.config import ConfigError, RolloutConfig
from tritonrlhf.engine.models import build_tokenizer
from tritonrlhf.engine.rl import static_decode
from tritonrlhf.engine.rl.hf_rollout import HFRollout
from tritonrlhf.engine.rl.static_decode import StaticDecoder, decode_step

from .test_packing import FAMILIES
from .test_static_decode import PROMPTS, left_padded, peaked_lm

STOPS = [1, 2, 3, 4, 5, 6]


def race(seed: int, batch: int):
    """A sampler whose draws depend on the seed, the row and the step only (the HF rollout's)."""
    gen = torch.Generator().manual_seed(seed)

    def choose(logits, rows, t, tokens):
        lp = logits.log_softmax(-1)
        noise = torch.empty((batch, lp.shape[-1])).exponential_(generator=gen).to(lp.device)
        tok = (lp.exp() / noise[rows]).argmax(-1)
        return tok, lp.gather(-1, tok[:, None])[:, 0]

    return choose


def decode(dec: StaticDecoder, step: str, device: str = "cpu"):
    prompts = PROMPTS * 3
    ids, mask = left_padded(prompts)
    return dec.generate(ids.to(device), mask.to(device), 12, race(5, len(prompts)), STOPS, 0, step=step)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_fixed_step_decodes_what_the_loop_decodes(family: str) -> None:
    dec = StaticDecoder(peaked_lm(family))
    loop_tokens, loop_logps = decode(dec, "loop")
    tokens, logps = decode(dec, "fixed")
    lengths = [(row != 0).sum() for row in loop_tokens]  # rows stopped at different steps
    assert min(lengths) < max(lengths), lengths
    assert torch.equal(tokens, loop_tokens)
    assert (logps - loop_logps).abs().max() < 1e-5  # measured ~1e-6: the masked keys weigh 0


def test_cuda_graph_setting_picks_the_step() -> None:
    assert decode_step("auto", torch.device("cuda", 0))[0] == "graph"
    assert decode_step("on", torch.device("cuda", 0))[0] == "graph"
    step, why = decode_step("auto", torch.device("cpu"))
    assert step == "loop" and "the model is on cpu" in why and "CUDA graphs need a CUDA device" in why
    assert decode_step("off", torch.device("cuda", 0)) == ("loop", "rollout.cuda_graph=off")
    with pytest.raises(ValueError, match="rollout.cuda_graph=on: the model is on cpu"):
        decode_step("on", torch.device("cpu"))
    with pytest.raises(ValueError, match="step must be one of"):
        StaticDecoder(peaked_lm("llama")).generate(*left_padded(PROMPTS), 2, race(0, 4), [], 0, step="cuda")
    RolloutConfig(backend="hf", cuda_graph="on").validate()
    with pytest.raises(ConfigError, match="rollout.cuda_graph"):
        RolloutConfig(backend="hf", cuda_graph="yes").validate()


def test_auto_on_cpu_decodes_eagerly_and_says_why(capsys: pytest.CaptureFixture) -> None:
    r = HFRollout(peaked_lm("qwen2"), build_tokenizer(), RolloutConfig(backend="hf", max_new_tokens=4))
    r.generate(PROMPTS, n=1, seed=0)
    r.generate(PROMPTS, n=1, seed=1)
    out = capsys.readouterr().out
    line = "the static-cache decode step runs eagerly (the model is on cpu, and CUDA graphs need"
    assert out.count(line) == 1, out  # said once, not per call


def test_a_failed_capture_falls_back_to_the_loop(monkeypatch, capsys) -> None:
    model, tok = peaked_lm("llama"), build_tokenizer()
    cfg = RolloutConfig(backend="hf", max_new_tokens=6)
    want = [s.response_ids for g in HFRollout(model, tok, cfg).generate(PROMPTS, n=2, seed=3) for s in g]

    def fail(fn):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(static_decode, "_capture", fail)
    monkeypatch.setattr(static_decode, "decode_step", lambda setting, device: ("graph", "pretend CUDA"))
    r = HFRollout(model, tok, cfg)
    got = [s.response_ids for g in r.generate(PROMPTS, n=2, seed=3) for s in g]
    assert got == want  # the same seed, decoded again eagerly
    out = capsys.readouterr().out
    assert "runs as a CUDA graph (pretend CUDA)" in out
    assert "runs eagerly (the CUDA graph is off: its capture failed (RuntimeError: CUDA error" in out
    cfg.cuda_graph = "on"
    with pytest.raises(RuntimeError, match="operation not permitted"):
        HFRollout(model, tok, cfg).generate(PROMPTS, n=1, seed=3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh there)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_graph_decodes_what_the_fixed_step_decodes(dtype: torch.dtype) -> None:
    dec = StaticDecoder(peaked_lm("qwen2").cuda().to(dtype))
    eager_tokens, eager_logps = decode(dec, "fixed", "cuda")
    tokens, logps = decode(dec, "graph", "cuda")
    assert torch.equal(tokens, eager_tokens)
    assert (logps - eager_logps).abs().max() < (1e-5 if dtype == torch.float32 else 1e-2)
