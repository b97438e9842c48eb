"""JSONL checks, the prompt dataset, the resumable sampler, and the toy task."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tritonrlhf.engine.config import ConfigError, DataConfig
from tritonrlhf.engine.data import DataError, PromptDataset, PromptSampler, read_jsonl
from tritonrlhf.engine.models import build_tokenizer
from tritonrlhf.engine.tasks import TOY_TARGETS, load_callable, toy_prompts, toy_reward


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _jsonl(path: Path, prompts: list[str]) -> Path:
    return _write(path, [json.dumps({"prompt": p}) for p in prompts])


# --------------------------------------------------------------------------- read_jsonl
def test_read_jsonl_ok_and_blank_lines(tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"prompt": "a", "x": 1}', "", '{"prompt": "b"}'])
    assert [r["prompt"] for r in read_jsonl(path, ["prompt"])] == ["a", "b"]


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl", ["prompt"])


def test_read_jsonl_malformed_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"prompt": "a"}', '{"prompt": "b"', '{"prompt": "c"}'])
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        read_jsonl(path, ["prompt"])
    _write(path, ['{"prompt": "a"}', '["prompt"]'])
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object"):
        read_jsonl(path, ["prompt"])


def test_read_jsonl_missing_column(tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"prompt": "a"}', '{"promt": "b"}'])
    with pytest.raises(DataError, match=rf"{path}:2: missing column 'prompt'"):
        read_jsonl(path, ["prompt"])


@pytest.mark.parametrize("value", ['""', '"   "', "null", "3", '["a"]'])
def test_read_jsonl_bad_text_value(tmp_path, value):
    path = _write(tmp_path / "d.jsonl", ['{"prompt": "ok"}', f'{{"prompt": {value}}}'])
    with pytest.raises(DataError, match=rf"{path}:2: column 'prompt' (is empty|must be a string)"):
        read_jsonl(path, ["prompt"])


def test_read_jsonl_non_text_required_column(tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"messages": [{"role": "user", "content": "hi"}]}'])
    assert read_jsonl(path, ["messages"], text=[])[0]["messages"][0]["content"] == "hi"


def test_read_jsonl_empty_file(tmp_path):
    with pytest.raises(DataError, match="no records"):
        read_jsonl(_write(tmp_path / "d.jsonl", [""]), ["prompt"])


# --------------------------------------------------------------------------- PromptDataset
def test_prompt_dataset_toy(tok):
    ds = PromptDataset(DataConfig(prompts="toy", num_prompts=32), tok, seed=3)
    assert len(ds) == 32 and ds.num_truncated == ds.num_dropped == 0
    text, ids = ds[0]
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == text
    assert ds.texts == toy_prompts(32, seed=3)


def test_truncate_vs_drop(tok, tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", ["abc", "x" * 20 + " say a:", "hello", "y" * 30])
    trunc = PromptDataset(DataConfig(prompts=str(path), max_prompt_len=10, on_long_prompt="truncate"), tok)
    assert len(trunc) == 4 and trunc.num_truncated == 2 and trunc.num_dropped == 0
    text, ids = trunc[1]
    assert text == "x" * 20 + " say a:"  # the original text is kept for the reward
    assert len(ids) == 10 and ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == "xx say a:"  # the last tokens survive
    drop = PromptDataset(DataConfig(prompts=str(path), max_prompt_len=10, on_long_prompt="drop"), tok)
    assert drop.texts == ["abc", "hello"] and drop.num_dropped == 2 and drop.num_truncated == 0
    batch = drop.batch([1, 0])
    assert batch.indices == [1, 0] and batch.texts == ["hello", "abc"]
    assert batch.input_ids[0] == [tok.bos_token_id, *tok("hello", add_special_tokens=False)["input_ids"]]


def test_chat_rendered_prompt_keeps_one_bos(tok, tmp_path):
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "say a:"}], tokenize=False, add_generation_prompt=True
    )
    ds = PromptDataset(DataConfig(prompts=str(_jsonl(tmp_path / "p.jsonl", [chat]))), tok)
    assert (
        ds[0][1]
        == tok.apply_chat_template([{"role": "user", "content": "say a:"}], add_generation_prompt=True)[
            "input_ids"
        ]
    )
    assert ds[0][1].count(tok.bos_token_id) == 1


def test_messages_prompts_are_rendered_with_the_generation_prompt(tok, tmp_path):
    """``{"messages": [...]}`` beside plain ``{"prompt": ...}`` in one file: the chat is rendered by the
    tokenizer's template with the generation prompt; ids are the template's own tokenization."""
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say a:"}]
    path = _write(tmp_path / "p.jsonl", [json.dumps({"messages": chat}), json.dumps({"prompt": "say b:"})])
    ds = PromptDataset(DataConfig(prompts=str(path)), tok)
    ids = tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert ds[0] == (tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), ids)
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>") and ids.count(tok.bos_token_id) == 1
    assert ds[1][1] == [tok.bos_token_id, *tok("say b:", add_special_tokens=False)["input_ids"]]


def _user(text: str = "say a:") -> dict:
    return {"role": "user", "content": text}


@pytest.mark.parametrize(
    "record, match",
    [
        ({"messages": "say a:"}, "column 'messages' must be a non-empty list"),
        ({"messages": []}, "column 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] must have 'role' and 'content'"),
        ({"messages": [_user(), {"content": "x"}]}, r"messages\[1\] must have 'role' and 'content'"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, r"messages\[0\] has unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "  "}]}, r"messages\[0\] \(user\) has empty"),
        ({"messages": [{"role": "user", "content": 3}]}, "content must be a string, got int"),
        ({"messages": [_user(), {"role": "assistant", "content": "a"}]}, "last turn is the assistant's"),
        ({"prompt": "say a:", "messages": [_user()]}, "exactly one of 'prompt'"),
        ({"text": "say a:"}, "exactly one of 'prompt'"),
        ({"prompt": [_user()]}, "column 'prompt' must be a string.*'messages' column"),
    ],
)
def test_malformed_messages_name_file_line_and_column(tok, tmp_path, record, match):
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "say b:"}), json.dumps(record)])
    with pytest.raises(DataError, match=rf"{path}:2: .*{match}"):
        PromptDataset(DataConfig(prompts=str(path)), tok)


def test_messages_need_a_chat_template(tmp_path):
    tok = build_tokenizer()
    tok.chat_template = None
    path = _write(
        tmp_path / "p.jsonl", [json.dumps({"prompt": "say b:"}), json.dumps({"messages": [_user()]})]
    )
    with pytest.raises(DataError, match=rf"{path}:2: column 'messages' .*no chat template"):
        PromptDataset(DataConfig(prompts=str(path)), tok)
    assert len(PromptDataset(DataConfig(prompts=str(_jsonl(tmp_path / "q.jsonl", ["say b:"]))), tok)) == 1


def test_empty_after_filter(tok, tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", ["a long prompt", "another long one"])
    with pytest.raises(DataError, match="all 2 prompts are longer than data.max_prompt_len=4"):
        PromptDataset(DataConfig(prompts=str(path), max_prompt_len=4, on_long_prompt="drop"), tok)


def test_prompt_dataset_bad_option(tok):
    with pytest.raises(ConfigError, match="on_long_prompt"):
        PromptDataset(DataConfig(on_long_prompt="skip"), tok)


# --------------------------------------------------------------------------- PromptSampler
def _take(sampler: PromptSampler, n: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_deterministic_and_covers_each_epoch():
    a, b = PromptSampler(10, 5, seed=7, shuffle=True), PromptSampler(10, 5, seed=7, shuffle=True)
    batches = _take(a, 6)
    assert batches == _take(b, 6)
    for epoch in range(3):
        assert sorted(batches[2 * epoch] + batches[2 * epoch + 1]) == list(range(10))
    assert batches[:2] != batches[2:4]  # each epoch has its own order
    assert _take(PromptSampler(10, 5, seed=8), 2) != batches[:2]
    assert _take(PromptSampler(10, 4, seed=0, shuffle=False), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_sampler_rank_shards_are_disjoint():
    world = 4
    ranks = [PromptSampler(37, 8, seed=1, rank=r, world_size=world) for r in range(world)]
    glob = PromptSampler(37, 8, seed=1)
    for _ in range(9):  # crosses an epoch boundary (37 is not a multiple of 8)
        shares = [s.next_batch() for s in ranks]
        assert all(len(s) == 2 for s in shares)
        assert sum(shares, []) == glob.next_global_batch()
        assert len(set(sum(shares, []))) == 8
    assert len({str(s.state_dict()) for s in ranks}) == 1
    with pytest.raises(ValueError, match="multiple of world_size=4"):
        PromptSampler(37, 6, seed=1, world_size=4)


def test_sampler_resume_across_epoch_boundary():
    full = PromptSampler(10, 4, seed=5)
    expected = _take(full, 8)  # 32 samples: epochs 0-3
    first = PromptSampler(10, 4, seed=5)
    got = _take(first, 2)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    assert state == {"epoch": 0, "position": 8, "seed": 5, "dataset_len": 10, "batch_size": 4}
    resumed = PromptSampler(10, 4, seed=5)
    resumed.load_state_dict(state)
    got += _take(resumed, 6)  # batch 3 straddles epochs 0 and 1
    assert got == expected
    assert resumed.state_dict()["epoch"] == 3


def test_sampler_resume_mismatch():
    state = PromptSampler(10, 4, seed=5).state_dict()
    with pytest.raises(ValueError, match="seed=5 but this run has 6"):
        PromptSampler(10, 4, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_len=10 but this run has 11"):
        PromptSampler(11, 4, seed=5).load_state_dict(state)


# --------------------------------------------------------------------------- toy task
def test_toy_prompts_deterministic():
    prompts = toy_prompts(50, seed=0)
    assert prompts == toy_prompts(50, seed=0) and prompts != toy_prompts(50, seed=1)
    assert all(p.endswith(":") and p[-2] in TOY_TARGETS for p in prompts)
    assert {p[-2] for p in prompts} == set(TOY_TARGETS)


def test_toy_reward_rewards_the_target():
    prompts = ["say a:", "1 2 say b:", "say c:", "say a:", "say d:"]
    responses = ["aaaa", "bxbx", "xyz", "", "ddd!"]
    assert toy_reward(prompts, responses) == [1.0, 0.5, 0.0, 0.0, 0.75]
    assert toy_reward(["say a:"], ["AAA"]) == [1.0]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        toy_reward(["say a:", "say b:"], ["a"])


def test_toy_reward_bounded_and_random_baseline_low(tok):
    rng = random.Random(0)
    chars = [c for c in tok.get_vocab() if len(c) == 1]
    prompts = toy_prompts(200, seed=0)
    responses = ["".join(rng.choice(chars) for _ in range(rng.randint(0, 16))) for _ in prompts]
    scores = toy_reward(prompts, responses)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert sum(scores) / len(scores) < 0.05  # a random policy starts near 1/64
    assert sum(toy_reward(prompts, [p[-2] * 8 for p in prompts])) == len(prompts)


def test_load_callable(tmp_path):
    assert load_callable("tritonrlhf.engine.tasks:toy_reward") is toy_reward
    with pytest.raises(ConfigError, match="cannot import module 'tritonrlhf.engine.nope'"):
        load_callable("tritonrlhf.engine.nope:fn")
    with pytest.raises(ConfigError, match="has no 'toy_rewrd'.*toy_reward"):
        load_callable("tritonrlhf.engine.tasks:toy_rewrd")
    with pytest.raises(ConfigError, match="is not callable"):
        load_callable("tritonrlhf.engine.tasks:TOY_TARGETS")
    with pytest.raises(ConfigError, match="must look like 'module:function'"):
        load_callable("tritonrlhf.engine.tasks.toy_reward")
    script = tmp_path / "my_reward.py"
    script.write_text("def score(prompts, responses):\n    return [1.0] * len(responses)\n")
    assert load_callable(f"{script}:score")(["p"], ["r"]) == [1.0]
