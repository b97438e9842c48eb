"""Best-of-n: the selection function on fixed scores, config errors, and tiny real runs (HF and vLLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.best_of_n import BoNConfig, run_bon, select_best
from engine.config import ConfigError, TinyModelConfig, load_config


def test_select_best_is_argmax_per_prompt() -> None:
    scores = torch.tensor([0.1, 0.9, 0.3, 5.0, -1.0, 2.0, 0.0, 0.0, 0.0])
    assert select_best(scores, 3).tolist() == [1, 3, 6]  # ties -> first
    # random groups: agrees with a per-group argmax
    g = torch.Generator().manual_seed(0)
    s = torch.randn(40, generator=g)
    want = [k * 8 + int(s[k * 8 : (k + 1) * 8].argmax()) for k in range(5)]
    assert select_best(s, 8).tolist() == want


def test_select_best_skips_invalid_scores() -> None:
    scores = torch.tensor([9.0, 1.0, 2.0, 7.0, 0.0, 0.0])
    valid = torch.tensor([False, True, True, True, False, False])
    # group 0: the invalid 9.0 never wins; group 1 has only one valid; group 2 none -> left out
    assert select_best(scores, 2, valid).tolist() == [1, 3]
    with pytest.raises(ValueError, match="multiple of n=4"):
        select_best(torch.zeros(6), 4)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bon.batch_size=6 is not divisible"):
        load_config(
            BoNConfig,
            None,
            [
                "model.path=",
                "reward.kind=function",
                "data.prompts=toy",
                "bon.batch_size=6",
                "bon.micro_batch_size=4",
            ],
        ).validate()
    with pytest.raises(ConfigError, match="reward.model_path: path does not exist"):
        load_config(
            BoNConfig, None, ["model.path=", f"reward.model_path={tmp_path}/rm", "data.prompts=toy"]
        ).validate()


def test_bon_refuses_checkpoints_of_the_wrong_kind(tmp_path: Path) -> None:
    """A reward checkpoint as the policy, or a causal LM as the reward, fails before any engine starts."""
    from engine.models import build_tiny_model, build_tiny_reward_model, build_tokenizer

    tok = build_tokenizer()
    for name, model in (("lm", build_tiny_model), ("rm", build_tiny_reward_model)):
        model(tok, TinyModelConfig(), seed=0).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    with pytest.raises(ConfigError, match=r"model.path: .* is a sequence-classification checkpoint"):
        run_bon(_cfg(tmp_path, "hf", 1, f"model.path={tmp_path / 'rm'}"))
    with pytest.raises(
        ConfigError, match=r"reward.model_path: .* is a causal-LM checkpoint .*not a sequence-class"
    ):
        run_bon(_cfg(tmp_path, "hf", 1, "reward.kind=model", f"reward.model_path={tmp_path / 'lm'}"))
    assert not list((tmp_path / "bon").glob("samples_round_*.jsonl"))


def _cfg(tmp_path: Path, backend: str, rounds: int, *extra: str) -> BoNConfig:
    return load_config(
        BoNConfig,
        None,
        [
            f"output_dir={tmp_path}/bon",
            "model.path=",  # tiny random policy
            "reward.kind=function",
            "reward.function=engine.tasks:toy_reward",
            "data.prompts=toy",
            "data.num_prompts=32",
            f"rollout.backend={backend}",
            "rollout.max_new_tokens=8",
            "bon.n=4",
            "bon.prompts_per_round=6",
            "bon.steps_per_round=3",
            "bon.batch_size=4",
            "bon.micro_batch_size=4",
            "optim.lr=3e-3",
            "optim.zero_stage=0",
            f"total_steps={rounds}",
            *extra,
        ],
    )


def _check_run(out: Path, summary: dict, rounds: int) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert summary["rounds"] == rounds
    for k in range(1, rounds + 1):
        rows = [json.loads(line) for line in (out / f"samples_round_{k}.jsonl").read_text().splitlines()]
        assert len(rows) == 6 * 4
        for g in range(6):
            group = [r for r in rows if r["group"] == g]
            kept = [r for r in group if r["kept"]]
            assert len(kept) == 1 and kept[0]["score"] == max(r["score"] for r in group)
            assert kept[0] is group[[r["score"] for r in group].index(kept[0]["score"])]  # first max
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["reward/best_mean"] >= m["reward/mean"] for m in metrics)
    assert all(m["skipped"] == 0 for m in metrics)
    model = AutoModelForCausalLM.from_pretrained(out)
    init = load_file(out / "init_policy" / "model.safetensors")
    changed = any(not torch.equal(init[n], p.detach()) for n, p in model.state_dict().items() if n in init)
    assert changed, "SFT on the kept samples did not change the weights"


@pytest.mark.slow
def test_bon_tiny_run_hf_backend(tmp_path: Path) -> None:
    summary = run_bon(_cfg(tmp_path, "hf", rounds=2))
    _check_run(tmp_path / "bon", summary, 2)


@pytest.mark.slow
def test_bon_tiny_run_vllm(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    summary = run_bon(_cfg(tmp_path, "vllm", rounds=2))
    _check_run(tmp_path / "bon", summary, 2)
    assert summary["sync"].startswith("in-place")
