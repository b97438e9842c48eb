"""The demo's teacher-judge data (``tritonrlhf.engine.demo.rlaif``): labelled by gold, rendered as the label stage renders."""

from __future__ import annotations

import pytest

from tritonrlhf.engine.demo import rlaif
from tritonrlhf.engine.demo.pipeline import CONSTITUTION, JUDGE_LEN
from tritonrlhf.engine.demo.task import gold_score
from tritonrlhf.engine.models import build_tokenizer
from tritonrlhf.engine.stages.label import DEFAULT_TEMPLATE, LabelConfig, load_constitution, pick_principles


def test_judge_data_names_the_gold_better_answer_in_the_label_stages_layout() -> None:
    principles = load_constitution(CONSTITUTION)
    records = rlaif.make_judge_data(600, 5, principles)
    assert records == rlaif.make_judge_data(600, 5, principles)  # deterministic
    firsts = 0
    for r in records:
        head, body = r["prompt"].split("\n", 1)
        assert head.removeprefix("- ") in principles
        prompt, rest = body.split(" a: ", 1)
        first, rest = rest.split(" b: ", 1)
        second = rest.removesuffix(" better:")
        g1, g2 = gold_score(prompt, first), gold_score(prompt, second)
        assert g1 != g2 and r["response"] == ("a" if g1 > g2 else "b")
        # The label stage renders the same text from the same pieces (one principle quoted).
        cfg = LabelConfig(template=rlaif.JUDGE_TEMPLATE, principles_per_pair=1)
        picked = pick_principles([head.removeprefix("- ")], cfg.principles_per_pair, 0, 0)
        quoted = "\n".join(f"- {p}" for p in picked)
        assert (
            cfg.template.format(principles=quoted, prompt=prompt, response_a=first, response_b=second)
            == (r["prompt"])
        )
        firsts += r["response"] == "a"
    assert 0.4 < firsts / len(records) < 0.6  # the better answer shown first about half the time
    # Every judging prompt fits the teacher's SFT and the label stage's lengths (one token per character).
    tok = build_tokenizer()
    max_len = int(dict(o.split("=") for o in JUDGE_LEN)["data.max_prompt_len"])
    assert max(len(tok(r["prompt"])["input_ids"]) + 1 for r in records) <= max_len
    assert tok.unk_token_id not in {i for r in records for i in tok(r["prompt"])["input_ids"]}
    assert rlaif.JUDGE_TEMPLATE != DEFAULT_TEMPLATE  # shorter: the judge is character-level
    with pytest.raises(ValueError, match="principle"):
        rlaif.make_judge_data(4, 0, [])
