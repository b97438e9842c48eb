"""Reward functions with record columns, several weighted functions, the worker pool and its timeout,
and the plumbing that carries columns from a prompt record to the reward (data, samples, scorer)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from tritonrlhf.engine.config import ConfigError, DataConfig, PPOConfig, load_config
from tritonrlhf.engine.data import DataError, PromptDataset
from tritonrlhf.engine.models import build_tokenizer
from tritonrlhf.engine.rewards.functions import RewardFunctions, RewardTerm, call_reward, reward_functions
from tritonrlhf.engine.rl.experience import collate_samples
from tritonrlhf.engine.rl.generation import with_columns
from tritonrlhf.engine.rl.rollout import Sample
from tritonrlhf.engine.rl.scoring import RewardScorer
from tritonrlhf.engine.tasks import target_reward, toy_reward

FNS = "tests.engine.rewards.reward_fns"
PROMPTS = ["add 1 2:", "add 2 2:", "add 1 2:"]
RESPONSES = ["3", "5", ""]
COLUMNS = {"answer": ["3", "4", "3"], "source": ["a", "b", "a"]}


def test_columns_reach_a_function_by_name_or_through_kwargs():
    from tests.engine.rewards import reward_fns as f

    assert call_reward(f.answer_match, PROMPTS, RESPONSES, COLUMNS)[0] == [1.0, 0.0, 0.0]
    # **kwargs takes every column and finish_reasons; a function naming none gets none.
    got, _ = call_reward(f.sees_everything, PROMPTS, RESPONSES, {**COLUMNS, "finish_reasons": ["stop"] * 3})
    assert got == [3.0, 3.0, 3.0]
    assert call_reward(toy_reward, ["say a:"], ["aa"], COLUMNS | {"answer": ["x"]})[0] == [1.0]


def test_weighted_functions_skip_none_and_log_their_parts():
    fns = RewardFunctions(
        [RewardTerm("match", f"{FNS}:answer_match", 2.0), RewardTerm("len", f"{FNS}:length", 0.5)]
    )
    out = fns(PROMPTS, RESPONSES, COLUMNS)
    assert out.parts["match"] == [1.0, 0.0, 0.0]
    assert out.parts["len"][:2] == [1.0, 1.0] and math.isnan(out.parts["len"][2])
    # sum of weight x score over the functions that scored the sample (None = does not apply).
    assert out.scores == [2.0 + 0.5, 0.5, 0.0]
    only_none = RewardFunctions([RewardTerm("len", f"{FNS}:length")])(PROMPTS, RESPONSES)
    assert math.isnan(only_none.scores[2])  # no function scored it: invalid


@pytest.mark.parametrize("bad", ["broken", "too_few"])
def test_a_failing_function_costs_the_batch_not_the_run(bad, capsys):
    fns = RewardFunctions([RewardTerm("ok", f"{FNS}:answer_match"), RewardTerm(bad, f"{FNS}:{bad}")])
    out = fns(PROMPTS, RESPONSES, COLUMNS)
    assert all(math.isnan(s) for s in out.scores) and out.errors == 1 and out.timeouts == 0
    assert f"[reward] {bad} failed" in capsys.readouterr().err


def test_required_columns_are_checked_at_start_up():
    fns = RewardFunctions([RewardTerm("match", f"{FNS}:answer_match")])
    fns.check_columns(["answer"])
    with pytest.raises(ConfigError, match=r"'match' requires \['answer'\].*columns: none"):
        fns.check_columns([])
    RewardFunctions([RewardTerm("t", target_reward)]).check_columns(["target"])


def test_worker_pool_matches_in_process_and_times_out_one_batch():
    terms = [RewardTerm("match", f"{FNS}:answer_match", 2.0), RewardTerm("len", f"{FNS}:length", 0.5)]
    local = RewardFunctions(terms)(PROMPTS, RESPONSES, COLUMNS)
    pool = RewardFunctions(terms, workers=2, timeout_s=60)
    try:
        pending = pool.submit(PROMPTS, RESPONSES, COLUMNS)  # returns at once; the pool works meanwhile
        got = pending.result()
        assert got.scores == local.scores and got.parts["match"] == local.parts["match"]
    finally:
        pool.close()
    slow = RewardFunctions([RewardTerm("sleepy", f"{FNS}:sleepy")], workers=1, timeout_s=3)
    try:
        t0 = time.monotonic()
        out = slow(PROMPTS, RESPONSES)
        assert time.monotonic() - t0 < 25  # the 30 s sleep was cut at the timeout
        assert out.timeouts == 1 and all(math.isnan(s) for s in out.scores)
        slow.terms[0].fn = f"{FNS}:answer_match"  # the stuck worker was killed: a new pool serves
        assert slow(PROMPTS, RESPONSES, COLUMNS).scores == [1.0, 0.0, 0.0]
    finally:
        slow.close()
    with pytest.raises(ConfigError, match="needs a 'module:function' spec"):
        RewardFunctions([RewardTerm("lambda", lambda p, r: [1.0] * len(p))], workers=1)


def test_scorer_returns_parts_info_and_counts():
    scorer = RewardScorer(
        functions=RewardFunctions(
            [RewardTerm("match", f"{FNS}:with_info"), RewardTerm("len", f"{FNS}:length", 0.0)]
        ),
        clip=10.0,
    )
    out = scorer.score_detailed(PROMPTS, RESPONSES, columns=COLUMNS)
    assert out.valid.tolist() == [True, True, True] and out.scores.tolist() == [1.0, 0.0, 0.0]
    assert out.info[0] is None and out.info[1] == {"expected": "4", "got": "5"}
    stats = out.stats()
    assert stats["reward/match"] == pytest.approx(1 / 3) and stats["reward/len"] == pytest.approx(1.0)
    assert stats["reward/errors"] == 0
    # A single function: the old interface, and no per-function parts.
    plain = RewardScorer.from_function(toy_reward).score_detailed(["say a:"], ["ab"])
    assert plain.parts is None and plain.scores.tolist() == [0.5]


def test_columns_travel_from_the_record_to_the_samples_and_the_reward(tmp_path):
    tok = build_tokenizer()
    path = tmp_path / "p.jsonl"
    records = [{"prompt": "add 1 2:", "answer": "3"}, {"prompt": "add 2 2:", "answer": "4", "level": 2}]
    path.write_text("\n".join(json.dumps(r) for r in records))
    ds = PromptDataset(DataConfig(prompts=str(path)), tok)
    assert ds.column_names() == ["answer", "level"]
    batch = ds.batch([1, 0])
    assert batch.columns == [{"answer": "4", "level": 2}, {"answer": "3"}]
    # Two samples per prompt (a GRPO group): both carry their record's columns.
    groups = [
        [
            Sample(ids, tok.encode(r, add_special_tokens=False) + [tok.eos_token_id], [0.0] * 2, "stop", 0)
            for r in rs
        ]
        for ids, rs in zip(batch.input_ids, (["4", "5"], ["3", "3"]))
    ]
    samples = with_columns(groups, batch.columns)
    rb = collate_samples(samples, tok, tok.pad_token_id)
    assert rb.columns == {"answer": ["4", "4", "3", "3"], "level": [2, 2, None, None]}
    scorer = RewardScorer(functions=RewardFunctions([RewardTerm("match", f"{FNS}:answer_match")]))
    scores, valid = scorer.score(rb.prompts, rb.responses, columns=rb.columns)
    assert scores.tolist() == [1.0, 0.0, 1.0, 1.0] and bool(valid.all())
    # The toy prompts carry their target: target_reward equals toy_reward on them.
    toy = PromptDataset(DataConfig(prompts="toy", num_prompts=8), tok, seed=1)
    texts, targets = toy.texts, [c["target"] for c in toy.columns]
    responses = ["abcd", "aaaa", "", "db"] * 2
    assert target_reward(texts, responses, targets) == toy_reward(texts, responses)


def test_reserved_column_names_are_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "responses": "x"}))
    with pytest.raises(DataError, match=r"column\(s\) \['responses'\] cannot reach a reward function"):
        PromptDataset(DataConfig(prompts=str(path)), build_tokenizer())


def test_reward_config_keys():
    cfg = load_config(
        PPOConfig,
        None,
        [f"reward.functions=[{{fn: '{FNS}:answer_match', weight: 2}}, {{fn: '{FNS}:length', name: n}}]"],
    )
    assert cfg.reward.terms() == [("answer_match", f"{FNS}:answer_match", 2.0), ("n", f"{FNS}:length", 1.0)]
    fns = reward_functions(cfg.reward)
    assert [t.name for t in fns.terms] == ["answer_match", "n"]
    with pytest.raises(ConfigError, match="reward.function and reward.functions are both set"):
        load_config(PPOConfig, None, ["reward.function=a:b", "reward.functions=[{fn: c:d}]"]).validate()
    with pytest.raises(ConfigError, match="reward.kind=http needs reward.url"):
        load_config(PPOConfig, None, ["reward.kind=http"]).validate()
    with pytest.raises(ConfigError, match="did you mean 'weight'"):
        load_config(PPOConfig, None, ["reward.functions=[{fn: a:b, wieght: 1}]"])


def test_score_samples_sets_parts_and_info_on_the_samples():
    tok = build_tokenizer()
    ids = tok.encode("add 1 2:", add_special_tokens=False)
    samples = [
        Sample(ids, tok.encode(r, add_special_tokens=False), [0.0], "stop", 0, columns={"answer": "3"})
        for r in "34"
    ]
    scorer = RewardScorer(
        functions=RewardFunctions([RewardTerm("m", f"{FNS}:with_info"), RewardTerm("l", f"{FNS}:length")])
    )
    scorer.score_samples(samples, tok)
    assert [s.score for s in samples] == [2.0, 1.0]
    assert samples[0].reward_parts == {"m": 1.0, "l": 1.0} and samples[1].reward_info == {
        "expected": "3",
        "got": "4",
    }
    rb = collate_samples(samples, tok, tok.pad_token_id)
    assert torch.equal(rb.reward_parts["m"], torch.tensor([1.0, 0.0])) and rb.reward_info[1]["got"] == "4"


def test_an_http_endpoint_is_one_of_the_functions(tmp_path):
    """``reward.functions`` mixes a local function (in the worker pool) with a remote one
    (``http://...``, called from a thread beside it): each is logged, and they add up."""
    from tests.engine._scripts.launch import start_reward_server

    server, url = start_reward_server(tmp_path, "--function", f"{FNS}:answer_match")
    try:
        cfg = load_config(
            PPOConfig,
            None,
            [
                f"reward.functions=[{{fn: '{FNS}:length', weight: 0.5}}, {{fn: '{url}', weight: 2, name: remote}}]",
                "reward.workers=1",
                "reward.http.retries=0",
            ],  # fmt: skip
        )
        cfg.reward.validate()
        fns = reward_functions(cfg.reward)
        try:
            out = fns(PROMPTS, RESPONSES, COLUMNS)
        finally:
            fns.close()
        assert out.parts["remote"] == [1.0, 0.0, 0.0] and out.parts["length"][:2] == [1.0, 1.0]
        assert out.scores == [2.0 + 0.5, 0.5, 0.0] and out.errors == 0
    finally:
        server.kill_group()
    dead = RewardFunctions([RewardTerm("remote", url)], http={"retries": 0, "timeout_s": 2})
    assert dead(PROMPTS, RESPONSES).errors == 1  # the server is gone: that batch is invalid, no crash
