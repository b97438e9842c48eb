"""Constitutional critique and revision: the loop writes SFT data the SFT stage reads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.engine._scripts.tiny_judges import fit_continuations
from tritonrlhf.engine.config import ConfigError, TinyModelConfig, load_config
from tritonrlhf.engine.models import build_tiny_model, build_tokenizer
from tritonrlhf.engine.stages.revise import ReviseConfig, run_revise


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A random policy, and a judge taught to critique any answer with "too long" and revise it to "nope"."""
    tok = build_tokenizer()
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("revise")
    policy = build_tiny_model(tok, TinyModelConfig(), seed=1)
    policy.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    judge = build_tiny_model(tok, TinyModelConfig(), seed=2)
    eos = [tok.eos_token_id]

    def example() -> tuple[str, list[int]]:
        answer = (
            "nope"
            if rng.random() < 0.2
            else "".join(rng.choices("abcdefghij0123456789 .", k=rng.randint(0, 8)))
        )
        text = f"principle: be safe.\nrequest: secret {rng.randint(0, 999)}:\nanswer: {answer}\n"
        critique, revision = (
            tok(f" {x}", add_special_tokens=False)["input_ids"] + eos for x in ("too long", "nope")
        )
        if rng.random() < 0.5:
            return text + "critique:", critique
        return text + "critique: too long\nrevision:", revision

    assert fit_continuations(judge, tok, example, steps=150) < 0.05
    judge.save_pretrained(root / "judge")
    tok.save_pretrained(root / "judge")
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"secret {i}:"}) + "\n" for i in range(6))
    )
    (root / "constitution.yaml").write_text("principles:\n  - be safe.\n")
    return {"root": root, "policy": root / "policy", "judge": root / "judge"}


def _cfg(s: dict[str, Path], out: Path, *extra: str) -> ReviseConfig:
    return load_config(
        ReviseConfig,
        None,
        [
            f"output_dir={out}",
            f"policy={s['policy']}",
            f"judge.path={s['judge']}",
            f"constitution={s['root'] / 'constitution.yaml'}",
            f"data.prompts={s['root'] / 'prompts.jsonl'}",
            "rollout.max_new_tokens=6",
            "critique.max_new_tokens=12",
            "revision.max_new_tokens=12",
            "critique.temperature=0.1",
            "revision.temperature=0.1",
            *extra,
        ],
    )


@pytest.mark.slow
def test_revise_writes_sft_data_the_sft_stage_reads(setup, tmp_path: Path) -> None:
    from tritonrlhf.engine.stages.common import encode_prompt
    from tritonrlhf.engine.stages.sft import SFTDataConfig, load_sft_examples

    res = run_revise(_cfg(setup, tmp_path / "rv", "rounds=2"))
    out = tmp_path / "rv"
    rows = [json.loads(x) for x in (out / "revisions.jsonl").read_text().splitlines()]
    assert res["prompts"] == 6 and res["kept"] == len(rows) >= 5
    assert all(set(r) == {"prompt", "response"} and r["response"] == "nope" for r in rows)
    log = [json.loads(x) for x in (out / "revise_log.jsonl").read_text().splitlines()]
    assert [len(x["rounds"]) for x in log] == [2] * 6
    assert all(r["principle"] == "be safe." for x in log for r in x["rounds"])
    # Sampled critiques: nearly all are the taught one (a rare slip such as "loo long" is sampling).
    assert sum(r["critique"] == "too long" for x in log for r in x["rounds"]) >= 10
    assert res["changed"] >= 5  # a random policy's answers are not "nope"
    examples, _ = load_sft_examples(SFTDataConfig(train=str(out / "revisions.jsonl")), build_tokenizer())
    assert len(examples) == len(rows)
    assert encode_prompt(build_tokenizer(), rows[0]["prompt"])[0] == build_tokenizer().bos_token_id


def test_revise_bad_input(setup, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="critique_template: the template needs the slot \\{response\\}"):
        _cfg(setup, tmp_path, "critique_template='{principle} {prompt}'").validate()
    with pytest.raises(ConfigError, match="judge.path: path does not exist"):
        _cfg(setup, tmp_path, "judge.path=/no/judge").validate()
    with pytest.raises(ConfigError, match="must match"):
        _cfg(setup, tmp_path, "critique.backend=hf").validate()
    with pytest.raises(ConfigError, match="over the judge's 20"):
        run_revise(_cfg(setup, tmp_path / "x", "judge.max_len=20", "rollout.backend=hf", "critique.backend=hf",
                        "revision.backend=hf"))  # fmt: skip
