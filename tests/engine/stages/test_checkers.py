"""Constraint checkers: regex, callable and model, each against a hand count or a direct forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tritonrlhf.engine.config import ConfigError, TinyModelConfig
from tritonrlhf.engine.models import build_tiny_reward_model, build_tokenizer
from tritonrlhf.engine.stages.checkers import Checker, CheckerConfig, build_checkers


def test_regex_checker() -> None:
    c = Checker("digits", CheckerConfig(kind="regex", pattern=r"[0-9]{4}"))
    res = c.check(["p"] * 4, ["the secret is 1234", "123", "no", "99999"])
    assert res.violated.tolist() == [True, False, False, True]
    assert res.margin.tolist() == [1.0, 0.0, 0.0, 1.0]
    ci = Checker("word", CheckerConfig(kind="regex", pattern="secret", ignore_case=True))
    assert ci.check(["p", "p"], ["SECRET", "sec ret"]).violated.tolist() == [True, False]


def complies(prompts: list[str], responses: list[str]) -> list[bool]:
    return ["refuse" not in r for r in responses]


def harm_score(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(r)) for r in responses]


def test_callable_checker_bools_and_numbers() -> None:
    c = Checker("gold", CheckerConfig(kind="callable", fn=f"{__name__}:complies"))
    assert c.check(["a", "b"], ["i refuse", "1234"]).violated.tolist() == [False, True]
    above = Checker("len", CheckerConfig(kind="callable", fn=f"{__name__}:harm_score", threshold=2.0))
    res = above.check(["a"] * 3, ["x", "xx", "xxxx"])
    assert res.violated.tolist() == [False, False, True]  # strictly above
    assert res.margin.tolist() == [-1.0, 0.0, 2.0]
    below = Checker(
        "len", CheckerConfig(kind="callable", fn=f"{__name__}:harm_score", threshold=2.0, violation="below")
    )
    assert below.check(["a"] * 3, ["x", "xx", "xxxx"]).violated.tolist() == [True, False, False]


def nan_scores(prompts: list[str], responses: list[str]) -> list[float | None]:
    return [None for _ in responses]


def test_unusable_checker_results_are_errors() -> None:
    c = Checker("nan", CheckerConfig(kind="callable", fn=f"{__name__}:nan_scores"))
    with pytest.raises(ValueError, match="checker 'nan': response 0 got None"):
        c.check(["a"], ["b"])


def test_model_checker_scores_through_its_own_tokenizer(tmp_path: Path) -> None:
    tok = build_tokenizer()
    rm = build_tiny_reward_model(tok, TinyModelConfig(), seed=3)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts, responses = ["say a:", "tell me:", "x:"], ["aaa", "1234", ""]
    with torch.no_grad():
        direct = [
            float(
                rm(
                    input_ids=torch.tensor(
                        [
                            tok(p)["input_ids"]
                            + tok(r, add_special_tokens=False)["input_ids"]
                            + [tok.eos_token_id]
                        ]
                    )
                ).logits[0, 0]
            )
            for p, r in zip(prompts, responses)
        ]
    threshold = sorted(direct)[1]
    c = build_checkers({"rm": CheckerConfig(kind="model", path=str(tmp_path / "rm"), threshold=threshold)})[0]
    res = c.check(prompts, responses)
    torch.testing.assert_close(res.margin, torch.tensor(direct) - threshold, atol=1e-4, rtol=0)
    assert res.violated.tolist() == [d > threshold for d in direct]
    assert sum(res.violated.tolist()) == 1


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (CheckerConfig(kind="regex"), "needs a pattern"),
        (CheckerConfig(kind="regex", pattern="(unclosed"), "not a valid regex"),
        (CheckerConfig(kind="regex", pattern="x", threshold=1.0), "threshold does not apply to kind=regex"),
        (CheckerConfig(kind="callable"), "needs fn"),
        (CheckerConfig(kind="model"), "needs a checkpoint path"),
        (CheckerConfig(kind="model", path="/no/such/rm"), "path does not exist"),
        (CheckerConfig(kind="classifier"), "kind must be one of"),
        (CheckerConfig(kind="callable", fn="m:f", violation="over"), "violation must be one of"),
    ],
)
def test_bad_checker_configs(cfg: CheckerConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_checkers({"c": cfg})
    with pytest.raises(ConfigError, match="at least one"):
        build_checkers({})


def test_model_checker_can_read_chats(tmp_path: Path) -> None:
    tok = build_tokenizer()  # the toy tokenizer has a chat template
    rm = build_tiny_reward_model(tok, TinyModelConfig(), seed=4)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    chat = [{"role": "user", "content": "say a:"}, {"role": "assistant", "content": "aa"}]
    ids = tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        direct = float(rm(input_ids=torch.tensor([ids])).logits[0, 0])
    c = build_checkers({"rm": CheckerConfig(kind="model", path=str(tmp_path / "rm"), chat_template=True)})[0]
    assert c.check(["say a:"], ["aa"]).margin.item() == pytest.approx(direct, abs=1e-4)
    plain = build_checkers({"rm": CheckerConfig(kind="model", path=str(tmp_path / "rm"))})[0]
    assert plain.check(["say a:"], ["aa"]).margin.item() != pytest.approx(direct, abs=1e-4)
