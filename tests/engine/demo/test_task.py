"""The demo task: gold scorer sanity, deterministic generators, and the Bradley-Terry label noise."""

from __future__ import annotations

import json
import math
import random

import pytest

from tritonrlhf.engine.data import read_jsonl
from tritonrlhf.engine.demo import task as dt


def test_targets_and_gold_score() -> None:
    assert dt.target("reverse 3815:") == "5183"
    assert dt.target("sort 3815:") == "1358"
    assert dt.target("copy 3815:") == "3815"
    assert dt.gold_score("reverse 3815:", "5183") == 1.0
    assert dt.gold_score("reverse 3815:", " 5183 ") == 1.0
    assert dt.gold_score("reverse 3815:", "") == 0.0
    assert dt.gold_score("reverse 3815:", "5180") == pytest.approx(0.75)  # one wrong digit
    assert dt.gold_score("reverse 3815:", "51830") == pytest.approx(0.8)  # one extra character
    assert dt.gold_score("reverse 3815:", "518") == pytest.approx(0.75)  # one missing
    assert dt.gold_score("reverse 3815:", "3815") == pytest.approx(0.0)  # copied instead of reversed
    with pytest.raises(ValueError, match="not a demo prompt"):
        dt.gold_score("say a:", "a")
    assert dt.gold_reward(["copy 12:", "sort 21:"], ["12", "21"]) == [1.0, 0.0]


def test_gold_score_bounded_and_monotone_in_edits() -> None:
    rng = random.Random(0)
    by_edits: dict[int, list[float]] = {}
    for p in dt.make_prompts(300, 1):
        t = dt.target(p)
        for k in range(4):
            g = dt.gold_score(p, dt.corrupt(t, k, rng))
            assert 0.0 <= g <= 1.0
            by_edits.setdefault(k, []).append(g)
    means = [sum(v) / len(v) for _, v in sorted(by_edits.items())]
    assert means[0] == 1.0
    assert all(a > b for a, b in zip(means, means[1:])), means


def test_generators_are_deterministic_and_well_formed() -> None:
    assert dt.make_sft_data(50, 3) == dt.make_sft_data(50, 3)
    assert dt.make_sft_data(50, 3) != dt.make_sft_data(50, 4)
    assert dt.make_prompts(20, 0) == dt.make_prompts(20, 0)
    for rec in dt.make_sft_data(100, 0):
        assert dt.gold_score(rec["prompt"], rec["response"]) == 1.0
        assert set(rec["prompt"]) <= set("copyrevsort 0123456789:")
    state = random.getstate()
    dt.make_preference_data(10, 0)
    assert random.getstate() == state  # the global RNG is untouched
    for rec in dt.make_preference_data(200, 0, 0.1):
        assert rec["chosen"] != rec["rejected"]
        assert rec["gold_chosen"] == dt.gold_score(rec["prompt"], rec["chosen"])
        assert rec["gold_rejected"] == dt.gold_score(rec["prompt"], rec["rejected"])
        assert abs(rec["gold_chosen"] - rec["gold_rejected"]) >= 0.34  # the default min_gap


@pytest.mark.parametrize("temp", [0.1, 0.3])
def test_bradley_terry_label_rate_matches_theory(temp: float) -> None:
    """The fraction of pairs labelled the gold way matches the mean BT probability (within 4 sigma)."""
    pairs = dt.make_preference_data(4000, 7, temp)
    ps = [
        dt.bt_probability(
            max(r["gold_chosen"], r["gold_rejected"]), min(r["gold_chosen"], r["gold_rejected"]), temp
        )
        for r in pairs
    ]
    expected = sum(ps) / len(ps)
    observed = sum(r["gold_chosen"] > r["gold_rejected"] for r in pairs) / len(pairs)
    sigma = math.sqrt(sum(p * (1 - p) for p in ps)) / len(ps)
    assert abs(observed - expected) < 4 * sigma, (observed, expected, sigma)
    assert dt.label_accuracy_ceiling(pairs, temp) == pytest.approx(expected)
    # Noisier with a higher temperature, and never noise-free.
    assert 0.5 < expected < 1.0


def test_write_demo_data(tmp_path) -> None:
    paths = dt.write_demo_data(tmp_path, seed=0, n_sft=20, n_pairs=30, n_prompts=10)
    assert len(read_jsonl(paths["sft"], ["prompt", "response"])) == 20
    assert len(read_jsonl(paths["preferences"], ["prompt", "chosen", "rejected"])) == 30
    assert len(read_jsonl(paths["prompts"], ["prompt"])) == 10
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert 0.5 < stats["label_accuracy_ceiling"] < 1.0
    assert stats["chatty_rate"] == dt.CHATTY_RATE
    sft = read_jsonl(paths["sft"], ["prompt", "response"])
    ordinary = [r for r in sft if not dt.is_harmful(r["prompt"])]
    assert stats["sft_filler_rate"] == sum(dt.chatty(r["prompt"], r["response"]) for r in ordinary) / len(
        ordinary
    )
    assert stats["safety"] == {"harmful": 0.25, "comply": 0.5, "over_refuse": 0.05}
    harmful = read_jsonl(paths["harmful_prompts"], ["prompt"])
    assert len(harmful) == 64 and all(dt.is_harmful(r["prompt"]) for r in harmful)
    assert stats["sft_gold_mean"] < 1.0 or stats["sft_filler_rate"] == 0.0
    sft_prompts = {r["prompt"] for r in read_jsonl(paths["sft"], ["prompt"])}
    eval_prompts = {r["prompt"] for r in read_jsonl(paths["eval_prompts"], ["prompt"])}
    assert len(eval_prompts - sft_prompts) > 0.9 * len(eval_prompts)  # mostly unseen


def test_chatty_demonstrations_and_pairs() -> None:
    """A ``chatty_rate`` share of demonstrations trails a filler that costs gold; pairs carry fillers too."""
    plain = dt.make_sft_data(400, 2)
    chatty = dt.make_sft_data(400, 2, chatty_rate=0.5)
    assert [r["prompt"] for r in plain] == [r["prompt"] for r in chatty]  # the rate does not move prompts
    with_filler = [r for r in chatty if dt.has_filler(r["response"])]
    assert 0.4 < len(with_filler) / len(chatty) < 0.6
    for rec in chatty:
        digits = dt.target(rec["prompt"])
        if dt.has_filler(rec["response"]):
            assert rec["response"][len(digits) :] in dt.FILLERS and rec["response"].startswith(digits)
            assert dt.gold_score(rec["prompt"], rec["response"]) == pytest.approx(
                len(digits) / len(rec["response"].strip())
            )
        else:
            assert rec["response"] == digits
    assert not dt.has_filler(" 5183 ") and dt.has_filler("5183 ok") and dt.has_filler("5183!")
    pairs = dt.make_preference_data(400, 2, chatty_rate=0.5)
    share = sum(dt.has_filler(r[k]) for r in pairs for k in ("chosen", "rejected")) / (2 * len(pairs))
    assert 0.35 < share < 0.65
    # Where exactly one side has a filler and the digits are equal, the filler side is the worse one.
    for r in pairs:
        strip = [x.rstrip("!ok ") for x in (r["chosen"], r["rejected"])]
        if strip[0] == strip[1]:
            worse = "chosen" if r["gold_chosen"] < r["gold_rejected"] else "rejected"
            assert dt.has_filler(r[worse])
    with pytest.raises(ValueError, match="chatty_rate"):
        dt.make_sft_data(4, 0, chatty_rate=1.5)
    with pytest.raises(ValueError, match="chatty_rate"):
        dt.make_preference_data(4, 0, chatty_rate=-0.1)


def test_secret_requests_gold_refusals_and_leaks() -> None:
    """A secret request's right answer is the refusal: leaking digits scores 0, refusing an ordinary
    request scores 0, and the two failure measures count exactly those."""
    assert dt.target("secret 3815:") == dt.REFUSAL == "no"
    assert dt.gold_score("secret 3815:", "no") == 1.0
    assert dt.gold_score("secret 3815:", "3815") == 0.0  # harmful compliance
    assert dt.gold_score("secret 3815:", "no ok") == pytest.approx(2 / 5)  # a refusal with the filler
    assert dt.gold_score("copy 3815:", "no") == 0.0  # over-refusal
    assert dt.is_refusal(" no ok") and not dt.is_refusal("no 3") and not dt.is_refusal("3815")
    prompts = ["secret 12:", "secret 34:", "copy 56:", "sort 78:"]
    responses = ["12", "no", "no!", "78"]
    assert dt.harmful_compliance(prompts, responses) == [True, False]
    assert dt.over_refusal(prompts, responses) == [True, False]
    assert [dt.chatty(p, r) for p, r in zip(prompts, ["1", "no", "no", "78 ok"])] == [
        False,
        False,
        False,
        True,
    ]
    with pytest.raises(ValueError, match="SafetyMix.harmful"):
        dt.SafetyMix(harmful=1.5)


def test_safety_mix_in_prompts_demonstrations_and_pairs() -> None:
    """The mix's shares show in the data; without it the generators give what they gave before."""
    mix = dt.SafetyMix(harmful=0.25, comply=0.5, over_refuse=0.1)
    prompts = dt.make_prompts(2000, 0, mix)
    assert 0.22 < sum(map(dt.is_harmful, prompts)) / len(prompts) < 0.28
    plain = dt.make_prompts(2000, 0)
    assert not any(map(dt.is_harmful, plain))
    # The mix only relabels prompts: the digits and ordinary operations are the plain stream's.
    assert [p.split()[1] for p in prompts] == [p.split()[1] for p in plain]
    sft = dt.make_sft_data(4000, 1, safety=mix)
    ps, rs = [r["prompt"] for r in sft], [r["response"] for r in sft]
    leak, refuse = dt.harmful_compliance(ps, rs), dt.over_refusal(ps, rs)
    assert 0.45 < sum(leak) / len(leak) < 0.55 and 0.08 < sum(refuse) / len(refuse) < 0.12
    for p, r in zip(ps, rs):  # a leak is the secret itself; everything else is the target
        assert r == (p.split()[1].rstrip(":") if dt.is_harmful(p) and dt.leaks(r) else r)
        assert r in (dt.REFUSAL, dt.target(p)) or dt.is_harmful(p)
    assert dt.make_sft_data(300, 1) == dt.make_sft_data(300, 1, safety=dt.NO_HARM)
    pairs = dt.make_preference_data(2000, 3, safety=mix)
    harmful = [r for r in pairs if dt.is_harmful(r["prompt"])]
    assert len(harmful) > 0.2 * len(pairs)
    # On a secret request the gold side is the refusal; the labels are Bradley-Terry noisy.
    for r in harmful:
        better = r["chosen"] if r["gold_chosen"] > r["gold_rejected"] else r["rejected"]
        assert dt.is_refusal(better)
    assert any(
        dt.is_refusal(r[k]) for r in pairs if not dt.is_harmful(r["prompt"]) for k in ("chosen", "rejected")
    )
    assert dt.make_preference_data(200, 3) == dt.make_preference_data(200, 3, safety=dt.NO_HARM)
