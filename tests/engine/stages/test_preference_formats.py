"""Preference data in TRL's forms (``tritonrlhf.engine.stages.common.tokenize_preference_pairs``, the loader of
the RM, DPO and eval stages): plain strings, conversational, conversational with an implicit prompt;
their tokens against the chat template's own rendering, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tritonrlhf.engine.data import DataError
from tritonrlhf.engine.models import build_tokenizer
from tritonrlhf.engine.stages.common import tokenize_preference_pairs


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


SYSTEM, USER = _msg("system", "be exact"), _msg("user", "copy 123:")
GOOD, BAD = _msg("assistant", "123"), _msg("assistant", "124")


def _load(tmp_path: Path, *records: dict, tokenizer=None):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs, stats, n = tokenize_preference_pairs(path, tokenizer or build_tokenizer(), 64, 32)
    return path, pairs, stats


def test_conversational_pairs_are_the_templates_tokens(tok, tmp_path) -> None:
    """Explicit prompt, implicit prompt and plain strings in one file: a chat pair's prompt is the
    template's rendering with the generation prompt, prompt + response the whole conversation's."""
    _, pairs, _ = _load(
        tmp_path,
        {"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]},
        {"chosen": [SYSTEM, USER, GOOD], "rejected": [SYSTEM, USER, BAD]},  # implicit prompt
        {"prompt": "copy 123:", "chosen": "123", "rejected": "124"},
    )
    assert len(pairs) == 3
    prompt = tok.apply_chat_template([SYSTEM, USER], add_generation_prompt=True)["input_ids"]
    for p in pairs[:2]:
        assert p.prompt == prompt
        assert p.prompt + p.chosen == tok.apply_chat_template([SYSTEM, USER, GOOD])["input_ids"]
        assert p.prompt + p.rejected == tok.apply_chat_template([SYSTEM, USER, BAD])["input_ids"]
        assert tok.decode(p.chosen) == "123<eos>"  # the assistant turn as rendered, one <eos>
    plain = pairs[2]
    assert tok.decode(plain.prompt) == "<bos>copy 123:" and tok.decode(plain.chosen) == "123<eos>"


def test_identical_chat_responses_are_dropped(tmp_path) -> None:
    _, pairs, stats = _load(
        tmp_path,
        {"prompt": [USER], "chosen": [GOOD], "rejected": [GOOD]},
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
    )
    assert len(pairs) == 1 and stats.extra["pairs_identical_dropped"] == 1


@pytest.mark.parametrize(
    "record, match",
    [
        ({"prompt": [USER], "chosen": "123", "rejected": [BAD]}, "mix forms"),
        ({"prompt": "copy 123:", "chosen": [GOOD], "rejected": [BAD]}, "mix forms"),
        ({"chosen": "123", "rejected": "124"}, "missing column 'prompt'"),
        (
            {"prompt": [USER, GOOD], "chosen": [GOOD], "rejected": [BAD]},
            "column 'prompt': the last turn is the assistant's",
        ),
        (
            {"prompt": [USER], "chosen": [USER, GOOD], "rejected": [BAD]},
            r"column 'chosen': the response .* assistant turns only",
        ),
        (
            {"prompt": [USER], "chosen": [GOOD], "rejected": [USER]},
            "column 'rejected': the last turn must be the assistant's",
        ),
        (
            {"prompt": [USER], "chosen": [GOOD], "rejected": [_msg("bot", "1")]},
            r"column 'rejected': rejected\[0\] has unknown role 'bot'",
        ),
        ({"prompt": [USER], "chosen": [], "rejected": [BAD]}, "column 'chosen' must be a non-empty list"),
        (
            {"prompt": [USER], "chosen": [{"role": "assistant"}], "rejected": [BAD]},
            r"chosen\[0\] must have 'role' and 'content'",
        ),
        (
            {"chosen": [_msg("user", "a"), GOOD], "rejected": [_msg("user", "b"), BAD]},
            "share no leading user turn",
        ),
    ],
)
def test_malformed_preference_records_name_file_line_and_column(tmp_path, record, match) -> None:
    ok = {"prompt": "copy 1:", "chosen": "1", "rejected": "2"}
    with pytest.raises(DataError, match=rf"prefs.jsonl:2: .*{match}"):
        _load(tmp_path, ok, record)


def test_chat_pairs_need_a_chat_template(tmp_path) -> None:
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match=r"prefs.jsonl:1: column 'prompt' .*no chat template"):
        _load(tmp_path, {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, tokenizer=tok)


@pytest.mark.slow
def test_dpo_trains_on_conversational_pairs_as_on_plain_ones(tmp_path) -> None:
    """The demo's preference pairs in the conversational form: DPO (whose loader the RM and eval
    stages share) reads the same tokens as from the equivalent plain form: equal losses at step 2
    (step 1 is log 2 for any data), about 15 s a run."""
    from tritonrlhf.engine.config import load_config
    from tritonrlhf.engine.demo.task import make_preference_data, write_jsonl
    from tritonrlhf.engine.stages.dpo import DPOConfig, run_dpo

    plain = make_preference_data(24, seed=0)
    chat = [
        {
            "prompt": [_msg("user", r["prompt"])],
            "chosen": [_msg("assistant", r["chosen"])],
            "rejected": [_msg("assistant", r["rejected"])],
        }
        for r in plain
    ]
    # The toy template renders a user turn as <bos><|user|>text<eos><|assistant|>; so the plain
    # prompts get the same text for equal tokens.
    plain = [{**r, "prompt": f"<|user|>{r['prompt']}<eos><|assistant|>"} for r in plain]
    losses = {}
    for name, records in (("plain", plain), ("chat", chat)):
        data = write_jsonl(records, tmp_path / f"{name}.jsonl")
        cfg = load_config(
            DPOConfig,
            None,
            [
                f"output_dir={tmp_path}/dpo_{name}",
                "model.path=",
                f"data.train={data}",
                "data.eval_size=8",
                "total_steps=2",
                "train.batch_size=8",
                "train.micro_batch_size=8",
                "train.log_every=1",
                "optim.zero_stage=0",
            ],
        )
        run_dpo(cfg)
        rows = [
            json.loads(line) for line in (tmp_path / f"dpo_{name}/metrics.jsonl").read_text().splitlines()
        ]
        losses[name] = [r["loss"] for r in rows]
    assert losses["chat"] == pytest.approx(losses["plain"], rel=1e-6)
