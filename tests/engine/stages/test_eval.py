"""Eval: the pure metrics against hand counts, and a small run checked against direct HF forwards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tritonrlhf.engine.config import ConfigError, TinyModelConfig, load_config
from tritonrlhf.engine.models import build_tiny_model, build_tiny_reward_model, build_tokenizer
from tritonrlhf.engine.stages.evaluate import (
    EvalConfig,
    pairwise_accuracy,
    rm_gold_agreement,
    run_eval,
    sequence_kl,
    win_rate,
)

TINY = TinyModelConfig()


def test_win_rate_hand_count() -> None:
    a = torch.tensor([1.0, 0.5, 0.2, 0.7, 0.0])
    b = torch.tensor([0.0, 0.5, 0.9, 0.1, 0.3])
    # wins: items 0 and 3; tie: item 1; losses: 2 and 4 -> (2 + 0.5) / 5
    assert win_rate(a, b) == pytest.approx(0.5)
    assert win_rate(b, a) == pytest.approx(0.5)
    assert win_rate(torch.ones(4), torch.zeros(4)) == 1.0
    with pytest.raises(ValueError, match="one length"):
        win_rate(torch.ones(3), torch.ones(2))


def test_rm_gold_agreement_hand_count() -> None:
    # items: RM and gold agree; disagree; gold tie (not counted); RM tie where gold differs (a miss)
    acc, n = rm_gold_agreement(
        [2.0, 0.0, 5.0, 1.0], [1.0, 1.0, 0.0, 1.0], [0.9, 0.9, 0.5, 0.2], [0.1, 0.2, 0.5, 0.8]
    )
    assert n == 3 and acc == pytest.approx(1 / 3)
    acc, n = rm_gold_agreement([1.0], [0.0], [0.5], [0.5])
    assert n == 0 and acc != acc  # NaN: nothing to compare
    with pytest.raises(ValueError, match="one length"):
        rm_gold_agreement([1.0, 2.0], [0.0], [0.5], [0.5])


def test_rm_gold_agreement_excludes_items_without_gold() -> None:
    """A missing gold score (NaN) is unknown, not a disagreement: ``nan != nan`` must not count it."""
    nan = float("nan")
    # items: gold unknown on one side; on the other; on both; known, and RM agrees
    acc, n = rm_gold_agreement(
        [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [nan, 0.2, nan, 0.2], [0.5, nan, nan, 0.9]
    )
    assert (n, acc) == (1, 1.0)
    acc, n = rm_gold_agreement([1.0, 0.0], [0.0, 1.0], [nan, nan], [nan, nan])
    assert n == 0 and math.isnan(acc)


def test_sequence_kl_and_pairwise_accuracy() -> None:
    p = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0]])
    r = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    torch.testing.assert_close(sequence_kl(p, r, mask), torch.tensor([0.5 - 1.0, 1.0]))
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])) == 0.5


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    tok = build_tokenizer()
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    sft = build_tiny_model(tok, TINY, seed=0)
    with torch.no_grad():  # peaked, unlike the near-uniform random policy: the two sample apart
        sft.get_output_embeddings().weight.mul_(8.0)
    for name, model in (
        ("sft", sft),
        ("policy", build_tiny_model(tok, TINY, seed=1)),
        ("rm", build_tiny_reward_model(tok, TINY, seed=2)),
    ):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"say {c}:"}) + "\n" for c in "abcdab"))
    pairs = [
        {"prompt": "say a:", "chosen": "aaa", "rejected": "bbb"},
        {"prompt": "say b:", "chosen": "bb", "rejected": "ab"},
        {"prompt": "say c:", "chosen": "c", "rejected": "c"},  # identical: dropped
        {"prompt": "say d:", "chosen": "dd", "rejected": "d"},
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out["prompts"], out["pairs"] = root / "prompts.jsonl", root / "pairs.jsonl"
    return out


def _cfg(ckpts, tmp_path: Path, *extra: str) -> EvalConfig:
    return load_config(
        EvalConfig,
        None,
        [
            f"output_dir={tmp_path}/eval",
            f"models.policy={ckpts['policy']}",
            f"models.baseline={ckpts['sft']}",
            f"models.reward_model={ckpts['rm']}",
            # A gold that sees every character: the toy reward scores most of these random answers 0
            # for both policies alike, and then no pair would differ (rm_gold_agreement NaN).
            "models.gold=tests.engine.rewards.reward_fns:char_mean",
            f"data.prompts={ckpts['prompts']}",
            f"data.pairs={ckpts['pairs']}",
            "rollout.max_new_tokens=6",
            *extra,
        ],
    )


def test_eval_matches_direct_computation(ckpts, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    res = run_eval(_cfg(ckpts, tmp_path, "rollout.backend=hf"))
    assert json.loads((tmp_path / "eval/eval.json").read_text())["kl"] == pytest.approx(res["kl"])
    rows = [json.loads(x) for x in (tmp_path / "eval/eval_samples.jsonl").read_text().splitlines()]
    assert res["num_prompts"] == len(rows) == 6
    tok = build_tokenizer()
    policy = AutoModelForCausalLM.from_pretrained(ckpts["policy"]).eval()
    sft = AutoModelForCausalLM.from_pretrained(ckpts["sft"]).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(ckpts["rm"]).eval()

    def seq_logp(model, prompt_ids, resp_ids) -> float:
        ids = torch.tensor([prompt_ids + resp_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].double()
        return float(logits.log_softmax(-1).gather(-1, ids[0, len(prompt_ids) :, None]).sum())

    def rm_score(prompt: str, response_ids: list[int]) -> float:
        ids = torch.tensor([tok(prompt)["input_ids"] + response_ids])
        with torch.no_grad():
            return float(rm(input_ids=ids).logits[0, 0])

    kls = []
    for row in rows:
        prompt_ids = tok(row["prompt"])["input_ids"]  # <bos> + characters, as PromptDataset encodes
        resp = row["policy_response_ids"]
        kl = seq_logp(policy, prompt_ids, resp) - seq_logp(sft, prompt_ids, resp)
        assert row["kl"] == pytest.approx(kl, abs=1e-4)
        assert row["rm_policy"] == pytest.approx(rm_score(row["prompt"], resp), abs=1e-4)
        kls.append(kl)
    assert res["kl"] == pytest.approx(sum(kls) / len(kls), abs=1e-4)
    for judge in ("rm", "gold"):
        hand = sum(
            1.0
            if r[f"{judge}_policy"] > r[f"{judge}_baseline"]
            else 0.5
            if r[f"{judge}_policy"] == r[f"{judge}_baseline"]
            else 0.0
            for r in rows
        )
        assert res[f"win_rate_{judge}"] == pytest.approx(hand / len(rows))
    assert res["response_len"] == pytest.approx(sum(len(r["policy_response_ids"]) for r in rows) / len(rows))
    differ = [r for r in rows if r["gold_policy"] != r["gold_baseline"]]
    assert res["rm_gold_agreement_pairs"] == len(differ)
    assert differ  # the two tiny policies answer differently somewhere, or this would test nothing
    same_order = [
        (r["rm_policy"] > r["rm_baseline"]) == (r["gold_policy"] > r["gold_baseline"]) for r in differ
    ]
    assert res["rm_gold_agreement"] == pytest.approx(sum(same_order) / len(differ))

    # RM accuracy: 3 usable pairs (one identical pair dropped), scored by direct forwards
    assert res["rm_pairs"] == 3 and res["rm_pairs_identical_dropped"] == 1
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # noqa: E731
    pairs = [json.loads(x) for x in ckpts["pairs"].read_text().splitlines()]
    hits = [
        rm_score(p["prompt"], enc(p["chosen"])) > rm_score(p["prompt"], enc(p["rejected"]))
        for p in pairs
        if p["chosen"] != p["rejected"]
    ]
    assert res["rm_accuracy"] == pytest.approx(sum(hits) / 3)


def test_eval_self_kl_is_zero_and_wrong_kinds_fail(ckpts, tmp_path: Path) -> None:
    res = run_eval(
        _cfg(ckpts, tmp_path, "rollout.backend=hf", f"models.baseline={ckpts['policy']}", "data.pairs=")
    )
    assert res["kl"] == pytest.approx(0.0, abs=1e-5)
    assert res["win_rate_rm"] == 0.5 and res["win_rate_gold"] == 0.5  # same model, same seed
    # A checkpoint of the wrong kind is named with the key it came from.
    with pytest.raises(ConfigError, match="models.reward_model: .* is a causal-LM checkpoint"):
        run_eval(_cfg(ckpts, tmp_path, "rollout.backend=hf", f"models.reward_model={ckpts['sft']}"))
    with pytest.raises(ConfigError, match="models.policy: .* is a sequence-classification checkpoint"):
        run_eval(_cfg(ckpts, tmp_path, "rollout.backend=hf", f"models.policy={ckpts['rm']}"))
    with pytest.raises(ConfigError, match="models.baseline: .* is a sequence-classification checkpoint"):
        run_eval(_cfg(ckpts, tmp_path, "rollout.backend=hf", f"models.baseline={ckpts['rm']}"))
    with pytest.raises(ConfigError, match="models.policies.bad: .* is a sequence-classification checkpoint"):
        run_eval(_cfg(ckpts, tmp_path, "models.policy=", _policies(ok=ckpts["policy"], bad=ckpts["rm"])))
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        load_config(EvalConfig, None, ["models.baseline="]).validate()


def _policies(**paths: Path) -> str:
    return "models.policies=" + json.dumps({k: str(v) for k, v in paths.items()})


def test_eval_config_policies_errors(ckpts) -> None:
    with pytest.raises(ConfigError, match="models.policy or models.policies, not both"):
        load_config(
            EvalConfig, None, [f"models.policy={ckpts['policy']}", _policies(a=ckpts["policy"])]
        ).validate()
    with pytest.raises(ConfigError, match="models.policies must be a mapping"):
        load_config(EvalConfig, None, ["models.policies=runs/ppo"]).validate()
    with pytest.raises(ConfigError, match="models.policies.a: path does not exist"):
        load_config(EvalConfig, None, ["models.policies={a: /no/such/dir}"]).validate()
    with pytest.raises(ConfigError, match="not a usable name"):
        load_config(EvalConfig, None, [_policies(**{"x/y": ckpts["policy"]})]).validate()


def test_eval_several_policies_in_one_run(ckpts, tmp_path: Path) -> None:
    """``models.policies``: each policy's metrics equal its own single-policy run's; shared work once."""
    one = run_eval(_cfg(ckpts, tmp_path / "one", "rollout.backend=hf"))
    many = run_eval(
        _cfg(
            ckpts,
            tmp_path / "many",
            "rollout.backend=hf",
            "models.policy=",
            _policies(policy=ckpts["policy"], sft=ckpts["sft"]),
        )
    )
    per = many["policies"]
    assert list(per) == ["policy", "sft"]
    skip = ("wall_s", "policy")
    assert {k: v for k, v in per["policy"].items() if k not in skip} == pytest.approx(
        {k: v for k, v in one.items() if k in per["policy"] and k not in skip}
    )
    assert per["policy"]["policy"] == str(ckpts["policy"])
    # The baseline evaluated as a policy: its own samples, so zero KL and even win rates.
    assert per["sft"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert per["sft"]["win_rate_rm"] == per["sft"]["win_rate_gold"] == 0.5
    assert per["sft"]["rm_gold_agreement_pairs"] == 0  # identical samples: no comparison to judge
    assert many["rm_accuracy"] == pytest.approx(one["rm_accuracy"]) and "kl" not in many
    top = json.loads((tmp_path / "many/eval/eval.json").read_text())
    assert top["policies"].keys() == per.keys()
    for name in per:
        on_disk = json.loads((tmp_path / f"many/eval/{name}/eval.json").read_text())
        assert on_disk["kl"] == pytest.approx(per[name]["kl"]) and on_disk["baseline"] == str(ckpts["sft"])
        rows = (tmp_path / f"many/eval/{name}/eval_samples.jsonl").read_text().splitlines()
        assert len(rows) == per[name]["num_prompts"] == 6


@pytest.mark.slow
def test_eval_vllm_backend(ckpts, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    res = run_eval(_cfg(ckpts, tmp_path, "rollout.backend=vllm"))
    for key in (
        "kl",
        "rm_reward",
        "gold_reward",
        "win_rate_rm",
        "win_rate_gold",
        "rm_accuracy",
        "response_len",
    ):
        assert key in res and res[key] == res[key], key  # present and not NaN
    rows = [json.loads(x) for x in (tmp_path / "eval/eval_samples.jsonl").read_text().splitlines()]
    assert any(r["baseline_response"] != r["policy_response"] for r in rows)  # the swap took effect


def test_rm_probe_agreement_matches_its_samples(ckpts, tmp_path: Path) -> None:
    """``tritonrlhf.engine.demo.rm_probe``: the reported agreement is the within-prompt pair count over its own samples."""
    import itertools
    import re

    from transformers import AutoModelForSequenceClassification

    from tritonrlhf.engine.config import ConfigError
    from tritonrlhf.engine.demo.rm_probe import main, pair_agreement, probe
    from tritonrlhf.engine.tasks import toy_reward

    summary, rows = probe(
        str(ckpts["policy"]),
        str(ckpts["rm"]),
        "tritonrlhf.engine.tasks:toy_reward",
        str(ckpts["prompts"]),
        samples=3,
    )
    assert len(rows) == 6 * 3 and summary["prompts"] == 6
    tok = build_tokenizer()
    rm = AutoModelForSequenceClassification.from_pretrained(ckpts["rm"]).eval()
    hits = total = 0
    for i in range(0, len(rows), 3):
        group = rows[i : i + 3]
        assert len({r["prompt"] for r in group}) == 1
        for r in group:
            assert r["gold"] == pytest.approx(toy_reward([r["prompt"]], [r["response"]])[0])
            ids = torch.tensor([tok(r["prompt"])["input_ids"] + r["response_ids"]])
            assert tok.decode(r["response_ids"], skip_special_tokens=True) == r["response"]
            with torch.no_grad():
                assert r["rm"] == pytest.approx(float(rm(input_ids=ids).logits[0, 0]), abs=1e-4)
        for a, b in itertools.combinations(group, 2):
            if a["gold"] != b["gold"]:
                total += 1
                hits += (a["rm"] - b["rm"]) * (a["gold"] - b["gold"]) > 0
    assert summary["pairs"] == total > 0
    assert summary["rm_gold_pair_agreement"] == pytest.approx(hits / total)
    # The regex filter keeps only pairs whose two responses both match.
    groups = [[("12", 1.0, 0.5), ("12 ok", 2.0, 0.3), ("13", 0.0, 0.1)]]
    assert pair_agreement(groups) == (pytest.approx(2 / 3), 3)
    assert pair_agreement(groups, re.compile("[0-9]+")) == (1.0, 1)
    with pytest.raises(ConfigError, match="--samples"):
        probe(
            str(ckpts["policy"]),
            str(ckpts["rm"]),
            "tritonrlhf.engine.tasks:toy_reward",
            str(ckpts["prompts"]),
            samples=1,
        )
    assert (
        main(
            [
                "--policy",
                str(tmp_path / "nope"),
                "--reward-model",
                str(ckpts["rm"]),
                "--gold",
                "tritonrlhf.engine.tasks:toy_reward",
                "--prompts",
                str(ckpts["prompts"]),
            ]
        )
        == 2
    )
