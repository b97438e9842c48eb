"""The samples log (``logging.samples_every``): ``samples.jsonl`` rows, tensorboard's table, resume
trimming, the config checks, and one short GRPO run on chat prompts that writes them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tritonrlhf.engine.config import ConfigError, PPOConfig, RLLoggingConfig, load_config
from tritonrlhf.engine.metrics import MetricsLogger, drop_rows_after
from tritonrlhf.engine.tasks import toy_reward

ROWS = [
    {
        "prompt": "say a:",
        "response": "aa|b",
        "reward": 0.5,
        "kl": 0.25,
        "response_len": 5,
        "finish_reason": "stop",
    },
    {
        "prompt": "say b:",
        "response": "b\nb",
        "reward": None,
        "kl": 0.0,
        "response_len": 3,
        "finish_reason": "length",
    },
]


def test_log_samples_writes_jsonl_and_tensorboard_and_resume_drops_later_steps(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = RLLoggingConfig(tensorboard=True, progress_bar=False)
    logger = MetricsLogger(tmp_path, cfg, total_steps=3)
    logger.log_samples(1, ROWS)
    logger.log_samples(2, ROWS[:1])
    logger.log_samples(3, [])  # nothing due: nothing written
    logger.close()
    path = tmp_path / "samples.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 1, **ROWS[0]}, {"step": 1, **ROWS[1]}, {"step": 2, **ROWS[0]}]

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    texts = acc.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [1, 2]
    table = texts[0].tensor_proto.string_val[0].decode()
    assert (
        table.splitlines()[0] == "| step | prompt | response | reward | kl | response_len | finish_reason |"
    )
    assert "aa\\|b" in table and "b\\nb" in table and len(table.splitlines()) == 4  # header, rule, 2 rows

    drop_rows_after(path, 1)  # a run resumed at step 1: the killed run's later rows go
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 1]

    MetricsLogger(tmp_path / "other", cfg, 3, enabled=False).log_samples(1, ROWS)  # not rank 0
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    "override, match",
    [
        ("logging.samples_every=-1", "logging.samples_every must be >= 0"),
        ("logging.samples_per_step=0", "logging.samples_per_step >= 1"),
    ],
)
def test_samples_keys_are_checked(override, match) -> None:
    cfg = load_config(PPOConfig, None, [override])
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_offline_stages_do_not_take_the_samples_keys() -> None:
    from tritonrlhf.engine.stages.rm import RMConfig

    with pytest.raises(ConfigError, match="samples_every"):
        load_config(RMConfig, None, ["logging.samples_every=1"])


def test_sample_rows_decode_the_responses_and_carry_raw_reward_and_kl() -> None:
    """``sample_rows`` on a collated batch (toy tokenizer): the response text is the decode of the
    generated ids (special tokens skipped, as the reward function saw it), ``reward`` the raw score
    (None when invalid), ``kl`` the row's summed per-token KL over its own tokens, kept for a row
    whose action mask was zeroed (dropped from the loss)."""
    from types import SimpleNamespace

    import torch

    from tritonrlhf.engine.models import build_tokenizer
    from tritonrlhf.engine.rl.experience import Experience, collate_samples
    from tritonrlhf.engine.rl.experience_maker import ExperienceMixin
    from tritonrlhf.engine.rl.rollout import Sample

    tok = build_tokenizer()
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    user = tok.convert_tokens_to_ids("<|user|>")
    samples = [
        Sample([1, *enc("say a:")], [*enc("aa"), 2], [-0.5] * 3, "stop", 0),
        Sample([1, *enc("say b:")], [*enc("b"), user, *enc("c")], [-1.0] * 3, "length", 0),
        Sample([1, *enc("say c:")], enc("c"), [-0.1], "length", 0),
    ]
    rb = collate_samples(samples, tok, tok.pad_token_id)
    rb.scores, rb.score_valid = torch.tensor([0.5, 0.0, 1.0]), torch.tensor([True, False, True])
    old = -torch.rand(3, rb.action_mask.shape[1])
    ref = -torch.rand(3, rb.action_mask.shape[1])
    dropped = rb.action_mask.clone()
    dropped[1] = False  # invalid reward: out of the loss, but its KL is still the sample's
    exp = Experience(rb.sequences, rb.attention_mask, dropped, old_logprobs=old, ref_logprobs=ref)
    cfg = SimpleNamespace(
        logging=SimpleNamespace(samples_per_step=2),
        ppo=SimpleNamespace(kl=SimpleNamespace(kind="k1", log_ratio_clamp=10.0)),
    )
    rows = ExperienceMixin.sample_rows(SimpleNamespace(cfg=cfg), rb, exp)
    assert [(r["prompt"], r["response"], r["response_len"], r["finish_reason"]) for r in rows] == [
        ("say a:", "aa", 3, "stop"),
        ("say b:", "bc", 3, "length"),  # <|user|> generated, skipped in the text
    ]
    assert [r["reward"] for r in rows] == [0.5, None]
    for i, r in enumerate(rows):
        assert r["kl"] == pytest.approx(float(((old - ref)[i] * rb.action_mask[i]).sum()), rel=1e-6)


# --------------------------------------------------------------------------- a real run
def every_third_invalid(prompts: list[str], responses: list[str]) -> list[float | None]:
    """The toy reward, except None (invalid: the sample is dropped from the loss) for responses whose
    length is a multiple of 3."""
    return [None if len(r) % 3 == 0 else s for r, s in zip(responses, toy_reward(prompts, responses))]


STEPS, EVERY, BATCH = 4, 2, 32  # rollout_batch_size 8 x samples_per_prompt 4 in grpo_tiny.yaml


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """GRPO (real vLLM, real DeepSpeed) on chat prompts, every sample logged every second step;
    some rows dropped by an invalid reward and by ``reward.on_truncated=mask``."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "_scripts"))
    from ppo_launch import REPO, launch, require

    require("vllm", "deepspeed")
    tmp = tmp_path_factory.mktemp("samples")
    targets = "abcdefgh"
    prompts = tmp / "chat.jsonl"
    prompts.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": f"say {c}:"}]}) + "\n" for c in targets)
    )
    extra = [
        f"total_steps={STEPS}",
        f"data.prompts={prompts}",
        f"reward.function={__name__}:{every_third_invalid.__name__}",
        "reward.on_truncated=mask",
        "reward.missing_eos_penalty=0.5",  # applied to the score, never to the logged raw reward
        f"logging.samples_every={EVERY}",
        f"logging.samples_per_step={BATCH + 8}",  # more than a step has: all of them
    ]
    run = launch(tmp / "run", extra, timeout_s=420, config=REPO / "configs" / "grpo_tiny.yaml")
    print(f"samples run: {run.wall_s:.0f}s")
    run.check()
    rows = [json.loads(line) for line in (run.out_dir / "samples.jsonl").read_text().splitlines()]
    return run, rows, targets


@pytest.mark.slow
def test_run_writes_every_sample_with_raw_reward_and_decoded_text(chat_run) -> None:
    from tritonrlhf.engine.models import build_tokenizer

    run, rows, targets = chat_run
    assert [r["step"] for r in rows] == [s for s in range(EVERY, STEPS + 1, EVERY) for _ in range(BATCH)]
    tok = build_tokenizer()
    for r in rows:
        assert set(r) == {"step", "prompt", "response", "reward", "kl", "response_len", "finish_reason"}
        assert isinstance(r["prompt"], str) and isinstance(r["response"], str)
        assert isinstance(r["kl"], float) and isinstance(r["response_len"], int)
        assert r["finish_reason"] in ("stop", "length")
        # The chat prompt, decoded without its special tokens, is the user's turn.
        assert r["prompt"] in {f"say {c}:" for c in targets}
        # The raw score: the reward function's value (no missing-EOS penalty, no normalisation).
        assert r["reward"] == pytest.approx(every_third_invalid([r["prompt"]], [r["response"]])[0])
        # The response is the decode of the generated tokens (one character each) without the
        # special ones (a stop's <eos>; a random policy also emits role markers now and then).
        ids = tok(r["response"], add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and set(ids).isdisjoint(tok.all_special_ids), r
        assert len(ids) + (r["finish_reason"] == "stop") <= r["response_len"] <= 16, r
    assert any(r["reward"] is None for r in rows) and any(r["finish_reason"] == "length" for r in rows)
    assert max(r["kl"] for r in rows if r["step"] == STEPS) > 0  # the policy moved off the reference

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.out_dir / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert [t.step for t in acc.Tensors("samples/text_summary")] == list(range(EVERY, STEPS + 1, EVERY))


@pytest.mark.slow
def test_kl_mean_is_over_the_rows_that_train(chat_run) -> None:
    """``kl/mean`` equals the mean of the logged per-sample KLs over the samples that train (valid
    reward, not truncated under on_truncated=mask), not over the whole batch."""
    run, rows, _ = chat_run
    metrics = {m["step"]: m for m in run.metrics}
    compared = 0
    for step in range(EVERY, STEPS + 1, EVERY):
        mine = [r for r in rows if r["step"] == step]
        trained = [r["kl"] for r in mine if r["reward"] is not None and r["finish_reason"] == "stop"]
        assert len(trained) < len(mine)  # some rows were dropped
        if not trained:  # every row dropped (rare: about 4 of 32 train): no KL to report, where
            assert metrics[step]["kl/mean"] is None  # the mean over every row would be a number
            compared += 1
            continue
        expected = sum(trained) / len(trained)
        assert metrics[step]["kl/mean"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        everyone = sum(r["kl"] for r in mine) / len(mine)
        compared += not math.isclose(everyone, expected, rel_tol=1e-3, abs_tol=1e-6)
    # At least one step where the two means differ (the old kl/mean was the latter), counting a step
    # whose every row was dropped: it fails only if both logged steps' means coincide.
    assert compared
