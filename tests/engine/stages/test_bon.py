"""Best-of-n: the selection function on fixed scores, config errors, and tiny real runs (HF and vLLM)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tritonrlhf.engine.config import ConfigError, TinyModelConfig, load_config
from tritonrlhf.engine.stages.best_of_n import BoNConfig, run_bon, select_best


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
    toy = ["model.path=", "reward.kind=function", "data.prompts=toy"]
    with pytest.raises(ConfigError, match="resume: checkpoint path does not exist"):
        load_config(BoNConfig, None, [*toy, f"resume={tmp_path}/nope"]).validate()
    with pytest.raises(ConfigError, match="keep_last must be >= 0"):
        load_config(BoNConfig, None, [*toy, "keep_last=-1"]).validate()
    load_config(BoNConfig, None, [*toy, "resume=auto", "save_every=1"]).validate()
    with pytest.raises(ConfigError, match="reward.model_path: path does not exist"):
        load_config(
            BoNConfig, None, ["model.path=", f"reward.model_path={tmp_path}/rm", "data.prompts=toy"]
        ).validate()


def test_bon_refuses_checkpoints_of_the_wrong_kind(tmp_path: Path) -> None:
    """A reward checkpoint as the policy, or a causal LM as the reward, fails before any engine starts."""
    from tritonrlhf.engine.models import build_tiny_model, build_tiny_reward_model, build_tokenizer

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


def _overrides(backend: str, *extra: str) -> list[str]:
    """A tiny run: 6 prompts x 4 samples a round, 3 SFT steps of 4 kept samples (``extra`` wins)."""
    return [
        "model.path=",  # tiny random policy
        "reward.kind=function",
        "reward.function=tritonrlhf.engine.tasks:toy_reward",
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
        *extra,
    ]


def _cfg(tmp_path: Path, backend: str, rounds: int, *extra: str) -> BoNConfig:
    return load_config(
        BoNConfig, None, _overrides(backend, f"output_dir={tmp_path}/bon", f"total_steps={rounds}", *extra)
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


ROUND_KEYS = (
    "reward/mean",
    "reward/best_mean",
    "reward/gain",
    "reward/invalid",
    "response_len/mean",
    "response_len/kept_mean",
    "sft/loss",
    "kept",
    "grad_norm",
    "lr",
    "skipped",
    "sync/bytes",
)


@pytest.mark.slow
def test_bon_kill9_and_sigterm_then_resume_match_uninterrupted(tmp_path: Path) -> None:
    """vLLM rollouts. SIGKILL inside round 2, resume; SIGTERM inside round 2, resume: as uninterrupted.

    2 SFT steps a round, so the pause hook's update N falls in round ceil(N / 2): B1 dies in round
    2's first update and resumes from round 1's checkpoint; B2 is signalled in round 2's last
    update, finishes and saves the round, and exits 0; B3 runs round 3. Every round's samples
    (vLLM, seeded per request) are compared as text: round 2's match only if the resumed run
    pushed the checkpoint's weights into vLLM before sampling, as vLLM starts from the initial
    policy. Then the per-round metrics and the final weights, within 1e-6.
    """
    pytest.importorskip("vllm")
    from tests.engine._scripts.stage_launch import kill_and_resume, max_weight_diff, metric_diffs, metrics

    args = _overrides("vllm", "bon.steps_per_round=2", "optim.warmup_steps=8")
    runs = kill_and_resume("bon", tmp_path, args, total_steps=3, kill_in=3, term_in=4)
    ckpts = runs.b / "checkpoints"
    assert runs.rc == {"b1": -signal.SIGKILL, "b2": 0, "b3": 0, "a": 0}, runs.output
    # Killed inside round 2: round 2 was neither logged nor saved.
    assert runs.logged_when_killed == [1]
    assert runs.checkpoints_when_killed == ["step_000001"]
    state = runs.state_when_killed
    assert (state["sampler"]["position"], state["loop"]["step"], state["counters"]["steps"]) == (6, 1, 2)
    assert f"[bon] resumed from {ckpts / 'step_000001'} at step 1" in runs.output["b2"]
    assert (
        f"Stopped on SIGTERM after step 2; checkpoint saved to {ckpts / 'step_000002'}" in runs.output["b2"]
    )
    assert f"[bon] resumed from {ckpts / 'step_000002'} at step 2" in runs.output["b3"]

    for k in (1, 2, 3):
        name = f"samples_round_{k}.jsonl"
        assert (runs.a / name).read_text() == (runs.b / name).read_text(), f"{name} differs"
    ma, mb = metrics(runs.a), metrics(runs.b)
    assert sorted(ma) == sorted(mb) == [1, 2, 3]
    diffs = metric_diffs(ma, mb, ROUND_KEYS)
    assert not diffs, f"(round, key): (uninterrupted, resumed): {diffs}"
    assert ma[1]["lr"] < ma[2]["lr"] < ma[3]["lr"]  # mid-warmup across the kill: the schedule resumed
    assert max_weight_diff(runs.a, runs.b) <= 1e-6
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000003"]
    assert max_weight_diff(ckpts / "step_000003" / "hf", runs.b) == 0
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (runs.a, runs.b))
    assert sb["rounds"] == 3
    # B3 ran round 3 only: the first round's row came through two checkpoints
    assert sb["reward/mean_first"] == sa["reward/mean_first"] == ma[1]["reward/mean"]
    assert sb["rewards/invalid"] == sa["rewards/invalid"]
