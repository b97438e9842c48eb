"""AI labels from a judge: the two-order average, and a judge trained to a known preference."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.engine._scripts.tiny_judges import fit_continuations
from tritonrlhf.engine.config import ConfigError, TinyModelConfig, load_config
from tritonrlhf.engine.models import build_tiny_model, build_tokenizer
from tritonrlhf.engine.stages.label import (
    LabelConfig,
    choice_ids,
    load_constitution,
    pick_principles,
    preference,
    run_label,
)


def test_preference_averages_both_orders_and_cancels_position_bias() -> None:
    l9, l1 = torch.tensor(0.9).log(), torch.tensor(0.1).log()
    # A judge that says "A" with probability 0.9 whatever it is shown: no preference left.
    p, p1, p2 = preference(torch.stack([l9, l1])[None], torch.stack([l9, l1])[None])
    assert (
        p1.item() == pytest.approx(0.9) and p2.item() == pytest.approx(0.1) and p.item() == pytest.approx(0.5)
    )
    # A judge that prefers response_a in both positions, more strongly when it is shown first.
    l7, l3 = torch.tensor(0.7).log(), torch.tensor(0.3).log()
    p, p1, p2 = preference(torch.stack([l9, l1])[None], torch.stack([l3, l7])[None])
    assert p.item() == pytest.approx((0.9 + 0.7) / 2)
    # Only the two choices' probabilities count (renormalised), not the rest of the vocabulary.
    p, _, _ = preference(torch.tensor([[-5.0, -6.0]]), torch.tensor([[-6.0, -5.0]]))
    assert p.item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())


def test_constitution_and_principle_sampling(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "principles:\n  - refuse to reveal secrets.\n  - {name: help, text: answer ordinary requests.}\n"
    )
    assert load_constitution(path) == ["refuse to reveal secrets.", "answer ordinary requests."]
    path.write_text("principles: []\n")
    with pytest.raises(ConfigError, match="non-empty 'principles' list"):
        load_constitution(path)
    many = [f"p{i}" for i in range(10)]
    one = pick_principles(many, 3, seed=0, index=5)
    assert len(one) == 3 and one == pick_principles(many, 3, 0, 5) and one == sorted(one, key=many.index)
    assert pick_principles(many, 0, 0, 5) == many
    assert len({tuple(pick_principles(many, 3, 0, i)) for i in range(20)}) > 5


def test_choices_must_be_single_known_tokens() -> None:
    tok = build_tokenizer()
    assert choice_ids(tok, ("a", "b")) == [tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")]
    with pytest.raises(ConfigError, match="'ab' is 2 tokens"):
        choice_ids(tok, ("ab", "b"))
    with pytest.raises(ConfigError, match="two known, different tokens"):
        choice_ids(tok, ("a", "\u00e9"))  # not in the toy alphabet: <unk>


TEMPLATE = "{principles}|{prompt}\na:{response_a}\nb:{response_b}\nbetter:"
GOOD = "nope"


def _render(prompt: str, first: str, second: str) -> str:
    return TEMPLATE.format(principles="- refuse secrets.", prompt=prompt, response_a=first, response_b=second)


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> dict[str, Path]:
    """A tiny judge trained to prefer the refusal ("nope") over a digit string, in either position."""
    tok = build_tokenizer()
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("judge")
    model = build_tiny_model(tok, TinyModelConfig(), seed=0)
    a_id, b_id = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")

    def example() -> tuple[str, list[int]]:
        prompt, bad = f"secret {rng.randint(10, 99999)}:", f"{rng.randint(1000, 9999)}"
        if rng.random() < 0.5:
            return _render(prompt, GOOD, bad), [a_id]
        return _render(prompt, bad, GOOD), [b_id]

    loss = fit_continuations(model, tok, example)  # about 80 steps reach a loss of 0.02
    assert loss < 0.05, f"the test judge did not learn its preference (loss {loss:.3f})"
    model.save_pretrained(root / "judge")
    tok.save_pretrained(root / "judge")
    pairs = []
    for i in range(12):
        bad = f"{rng.randint(1000, 9999)}"
        a, b = (GOOD, bad) if i % 2 else (bad, GOOD)
        pairs.append({"prompt": f"secret {rng.randint(10, 99999)}:", "response_a": a, "response_b": b,
                      "gold_a": float(a == GOOD), "gold_b": float(b == GOOD)})  # fmt: skip
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "constitution.yaml").write_text("principles:\n  - refuse secrets.\n")
    return {
        "judge": root / "judge",
        "pairs": root / "pairs.jsonl",
        "constitution": root / "constitution.yaml",
    }


def _cfg(j: dict[str, Path], out: Path, *extra: str) -> LabelConfig:
    path = j["judge"].parent / "label.yaml"  # the template's braces need YAML quoting, not an override
    path.write_text(f"template: {json.dumps(TEMPLATE)}\n")
    overrides = [f"output_dir={out}", f"judge.path={j['judge']}", f"data.pairs={j['pairs']}"]
    return load_config(LabelConfig, str(path), [*overrides, f"constitution={j['constitution']}", *extra])


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_label_gets_the_order_right_in_both_positions(judge, tmp_path: Path) -> None:
    res = run_label(_cfg(judge, tmp_path / "vllm"))
    assert res["pairs"] == res["labelled"] == 12 and res["ties_dropped"] == 0
    rows = _rows(tmp_path / "vllm")
    for r in rows:
        assert r["chosen"] == GOOD and r["rejected"] != GOOD
        # Right when the refusal is shown first and when it is shown second.
        assert r["judge_p_shown_first"] > 0.5 and r["judge_p_shown_second"] > 0.5
        assert r["gold_chosen"] == 1.0 and r["gold_rejected"] == 0.0
    assert res["agreement_with_gold"] == 1.0 and res["gold_pairs"] == 12
    # The HF backend reads the same judge: the same labels and probabilities.
    hf = run_label(_cfg(judge, tmp_path / "hf", "judge.backend=hf"))
    assert hf["labelled"] == 12
    for a, b in zip(rows, _rows(tmp_path / "hf")):
        assert a["chosen"] == b["chosen"]
        assert a["judge_p"] == pytest.approx(b["judge_p"], abs=1e-4)


def test_label_writes_what_the_rm_stage_reads(judge, tmp_path: Path) -> None:
    from tritonrlhf.engine.stages.common import tokenize_preference_pairs

    run_label(_cfg(judge, tmp_path / "hf", "judge.backend=hf", "data.num_pairs=4"))
    pairs, _, n = tokenize_preference_pairs(tmp_path / "hf" / "preferences.jsonl", build_tokenizer(), 64, 48)
    assert n == 4 and len(pairs) == 4


def test_label_bad_input(judge, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the slot \\{response_b\\}"):
        _cfg(judge, tmp_path, "template='{principles} {prompt} {response_a}'").validate()
    with pytest.raises(ConfigError, match="choices must be two different"):
        _cfg(judge, tmp_path, "choices=[a, a]").validate()
    with pytest.raises(ConfigError, match="constitution: file does not exist"):
        _cfg(judge, tmp_path, "constitution=/no/such.yaml").validate()
    with pytest.raises(ConfigError, match="over the judge's 16 \\(judge.max_len\\)"):
        run_label(_cfg(judge, tmp_path / "x", "judge.max_len=16", "judge.backend=hf"))
    with pytest.raises(ConfigError, match="exceeds the judge's max_position_embeddings=256"):
        run_label(_cfg(judge, tmp_path / "x", "judge.max_len=512", "judge.backend=hf"))
