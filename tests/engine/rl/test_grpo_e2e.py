"""GRPO end to end through the CLI (``configs/grpo_tiny.yaml``): real vLLM and DeepSpeed on CPU.

Two set-ups, each shared by several tests (module-scoped fixtures):

* ``colocate``: 1 rank. Run A goes uninterrupted for ``STEPS`` steps; beside it run B checkpoints
  every step, is SIGKILLed inside step ``KILL_IN`` (``_scripts/stage_run.py`` pauses it after the
  actor's first update of that step, before it is logged or saved) and resumed with
  ``resume=auto``. A's reward must rise, no critic may be built, and B's steps after the resume
  must equal A's (exact resume, as for PPO).
* ``split_async``: ``deepspeed --num_gpus 2``, 1 trainer + 1 vLLM rank, one-step-off async, with
  DAPO's dynamic sampling (top-up batches requested from the rollout rank) and overlong penalty.

Why the reward margins hold (``first``/``last``: mean reward of the first and last three steps;
the random policy scores about 1/64): colocate was measured at seeds 0-4 on a 2-core AMD EPYC VM
(``COLOCATE_MEASURED``): the smallest rise, 0.109, is 2.7 times the asserted 0.04, and the
smallest ratio 8 times the asserted 2. Split/async (with dynamic sampling) was measured at seeds
0-3 on the same VM (``SPLIT_MEASURED``): the rises spread wider, 0.071-0.258, and the smallest is
2.8 times the asserted 0.025 (a different CPU samples other trajectories: in effect another seed,
so the margin is set by the weakest seed, as in ``tests/engine/demo/test_demo.py``); its
trajectory differs from colocate's by the one-step-off staleness, dynamic sampling (which only
removes zero-advantage groups) and the overlong penalty.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from tests.conftest import GAP_TOL_FP32
from tests.engine._scripts.stage_launch import kill_and_resume, max_weight_diff, metric_diffs, metrics

sys.path.insert(0, str(Path(__file__).parents[1] / "_scripts"))
from ppo_launch import REPO, PPORun, launch, require  # noqa: E402

from tests.engine._scripts.launch import start_reward_server  # noqa: E402

pytestmark = pytest.mark.slow

GRPO = REPO / "configs" / "grpo_tiny.yaml"
# The same run with its reward read from the toy prompts' `target` column by two weighted functions
# in a worker pool (tritonrlhf.engine.rewards): the same reward values as grpo_tiny's toy_reward.
VERIFIABLE = REPO / "configs" / "grpo_verifiable.yaml"
STEPS, KILL_IN = 16, 4
UPDATES_PER_STEP = 2  # 32 samples, mini-batches of 16
COMPARED = ("reward/mean", "kl/mean", "loss/policy", "actor/kl_loss", "actor/grad_norm")
# (seed, first, last) reward of 16 colocate steps of configs/grpo_tiny.yaml (2 threads, AMD EPYC,
# loaded machine, SHA 3d74d46): every rise is at least 0.109, and last >= 8 x first.
COLOCATE_MEASURED = [
    (0, 0.017, 0.162),
    (1, 0.015, 0.124),
    (2, 0.011, 0.142),
    (3, 0.016, 0.201),
    (4, 0.013, 0.162),
]
# The split_async fixture's run at seeds 0-3 (seed=N), 1 thread per process, AMD EPYC, loaded
# 2-core VM, SHA 243c143 (seed 0 repeats SHA 54ed1e5's figures): every rise is at least 0.071.
SPLIT_MEASURED = [
    (0, 0.029, 0.148),
    (1, 0.025, 0.276),
    (2, 0.029, 0.100),
    (3, 0.030, 0.288),
]
QUIET = ["logging.tensorboard=false", "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def colocate(tmp_path_factory):
    require("vllm", "deepspeed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        runs = kill_and_resume(
            "ppo",
            tmp_path_factory.mktemp("grpo_colocate"),
            ["--config", str(VERIFIABLE), "reward.workers=0", *QUIET],  # columns, in-process
            total_steps=STEPS,
            kill_in=UPDATES_PER_STEP * (KILL_IN - 1) + 1,  # the first update of step KILL_IN
            timeout_s=480,
        )
    return runs


def _verifiable_records(path: Path) -> Path:
    """grpo_tiny's toy prompts (the same 256, in order) as a JSONL whose records carry ground truth
    for every ready-made reward: ``target`` (the toy reward's), ``answer`` (math-verify) and ``tests``
    (the code sandbox; an assert the responses' "code" is run against)."""
    import json

    from tritonrlhf.engine.tasks import toy_prompts, toy_target

    rows = []
    for prompt in toy_prompts(256, seed=0):
        c = toy_target(prompt)
        rows.append({"prompt": prompt, "target": c, "answer": c, "tests": [f"assert {c!r} * 2 == {c * 2!r}"]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _ready_made(url: str) -> str:
    """reward.functions: the target column's reward, and at weight 0 the stop flag, math-verify, the
    code sandbox and the same target reward served over HTTP at ``url`` (a remote function)."""
    return (
        "reward.functions=[{fn: tritonrlhf.engine.tasks:target_reward, name: target},"
        " {fn: tritonrlhf.engine.tasks:stopped, weight: 0.0},"
        " {fn: tritonrlhf.engine.rewards.math:math_reward, weight: 0.0, name: math},"
        " {fn: tritonrlhf.engine.rewards.code:code_reward, weight: 0.0, name: code},"
        f" {{fn: '{url}', weight: 0.0, name: remote}}]"
    )


@pytest.fixture(scope="module")
def split_async(tmp_path_factory) -> PPORun:
    require("vllm", "deepspeed")
    data = _verifiable_records(tmp_path_factory.mktemp("data") / "verifiable.jsonl")
    server, url = start_reward_server(
        tmp_path_factory.mktemp("server"), "--function", "tritonrlhf.engine.tasks:target_reward"
    )
    extra = [
        f"total_steps={STEPS}",
        f"data.prompts={data}",  # the same prompts as the toy set, with ground-truth columns
        _ready_made(url),
        "placement.mode=split",
        "placement.scoring=rollout",  # the rollout rank scores, with the records' columns it was sent
        "async.max_staleness=1",
        "placement.timeout_s=120",
        "algo.dynamic_sampling.enabled=true",
        "algo.dynamic_sampling.max_draws=3",
        "algo.overlong.buffer=4",
        *QUIET,
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        try:
            run = launch(
                tmp_path_factory.mktemp("grpo_split"), extra, ranks=2, timeout_s=540, config=VERIFIABLE
            )
        finally:
            server.kill_group()
    print(f"split async: {run.wall_s:.0f}s")
    run.check()
    return run


def _first_last(rows: list[dict]) -> tuple[float, float]:
    reward = [r["reward/mean"] for r in rows]
    print(f"reward by step: {[round(x, 3) for x in reward]}")
    return sum(reward[:3]) / 3, sum(reward[-3:]) / 3


def _check_no_critic(rows: list[dict], summary: dict) -> None:
    assert summary["algo/critic"] is False and summary["algo/advantage"] == "grpo"
    assert summary["algo/loss_agg"] == "seq_mean_token_mean"
    for row in rows:
        no_critic = ("loss/value", "values/mean", "time/score/values_s", "time/train/critic_s")
        assert not [k for k in row if k.startswith("critic/") or k in no_critic], row
        assert row["time/train/actor_s"] > 0
        assert math.isfinite(row["actor/kl_loss"]) and math.isfinite(row["loss/policy"])


# --------------------------------------------------------------------------- colocate
def test_colocate_reward_rises_without_a_critic(colocate) -> None:
    assert colocate.rc["a"] == 0, colocate.output["a"][-6000:]
    rows = [metrics(colocate.a)[s] for s in range(1, STEPS + 1)]
    # configs/grpo_verifiable.yaml in-process: the target column's reward is the reward.
    assert all(r["reward/target"] == pytest.approx(r["reward/mean"], abs=1e-6) for r in rows)
    assert all(r["reward/errors"] == 0 and r["reward/timeouts"] == 0 for r in rows)
    import json

    summary = json.loads((colocate.a / "summary.json").read_text())
    _check_no_critic(rows, summary)
    assert summary["algo/old_logprobs"] == "scoring"  # two updates per step: the second needs them
    first, last = _first_last(rows)
    # Seeds 0-4 (COLOCATE_MEASURED): the smallest rise is several times this margin.
    assert last > first + 0.04 and last > 2 * first, f"reward did not rise: {first:.3f} -> {last:.3f}"
    # The KL term is in the loss: 0 before the first update, then positive and logged by the actor.
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["actor/kl_loss"] > 0 for r in rows[1:]) and all(r["kl_coef"] == 0.04 for r in rows)
    assert all(r["rollout/logprob_gap"] < GAP_TOL_FP32 for r in rows)  # vLLM followed every weight swap


def test_colocate_exact_resume_after_sigkill(colocate) -> None:
    assert colocate.rc["b1"] < 0 and colocate.rc["b2"] == 0, colocate.output["b2"][-6000:]
    assert colocate.logged_when_killed == list(range(1, KILL_IN))
    # The checkpoint holds the actor alone: a critic-free run has no critic engine to save.
    ckpt = colocate.b / "checkpoints" / f"step_{STEPS:06d}"
    assert (ckpt / "COMPLETE").is_file()
    assert [p.name for p in ckpt.iterdir() if "critic" in p.name] == []
    ma, mb = metrics(colocate.a), metrics(colocate.b)
    assert sorted(ma) == sorted(mb) == list(range(1, STEPS + 1))
    diffs = metric_diffs(ma, mb, COMPARED, 1e-6)
    assert not diffs, f"resumed run differs from the uninterrupted one (step, key): (A, B): {diffs}"
    assert max_weight_diff(colocate.a / "final", colocate.b / "final") <= 1e-6


# --------------------------------------------------------------------------- split + async
def test_split_async_reward_rises_without_a_critic(split_async) -> None:
    rows = split_async.metrics
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    (report,) = split_async.ranks  # the trainer rank: it trained the actor and nothing else
    assert set(report) >= {"actor"} and "critic" not in report
    assert report["actor"]["n_changed"] == report["actor"]["n_tensors"]
    _check_no_critic(rows, split_async.summary)
    first, last = _first_last(rows)
    # Seeds 0-3 (SPLIT_MEASURED): the smallest rise, 0.071 (seed 2), is 2.8 times this margin.
    assert last > first + 0.025, f"reward did not rise: {first:.3f} -> {last:.3f}"
    assert all(r["async/staleness_max"] <= 1 for r in rows) and rows[-1]["async/staleness_max"] == 1


def test_split_async_reward_reads_columns_on_the_rollout_rank(split_async) -> None:
    """configs/grpo_verifiable.yaml's worker pool on the rollout rank, with a JSONL of the same
    prompts carrying `target`, `answer` and `tests`: every column reached the ready-made rewards
    (math-verify, the code sandbox, and the target reward served over HTTP) with every prompt
    (dynamic sampling's top-ups included), each function is logged on its own, and the weighted sum
    (target x 1, the others x 0) is the reward."""
    for r in split_async.metrics:
        assert r["reward/target"] == pytest.approx(r["reward/mean"], abs=1e-6), r
        assert 0.0 <= r["reward/stopped"] <= 1.0 and r["rollout/invalid_rewards"] == 0
        assert 0.0 <= r["reward/math"] <= 1.0 and 0.0 <= r["reward/code"] <= 1.0
        assert r["reward/remote"] == pytest.approx(r["reward/target"], abs=1e-6)  # the same, over HTTP
    assert "[reward]" not in split_async.output  # no function failed or timed out


def test_split_dynamic_sampling_tops_up_and_logs(split_async) -> None:
    rows = split_async.metrics
    for r in rows:
        groups = r["dynamic/kept_groups"], r["dynamic/dropped_groups"], r["dynamic/padded_groups"]
        assert 1 <= r["dynamic/draws_max"] <= 3 and min(groups) >= 0
        assert min(r["dynamic/kept_groups"], 8) + r["dynamic/padded_groups"] == 8  # 8 prompts a step
        assert r["dynamic/padded_groups"] <= r["dynamic/dropped_groups"]
        assert r["reward/overlong_penalty"] <= 0
    # The random policy's groups are often all zero: some step dropped groups and drew again.
    assert any(r["dynamic/draws_max"] > 1 for r in rows), [r["dynamic/dropped_groups"] for r in rows]


# --------------------------------------------------------------------------- one update per step
def test_one_update_per_step_takes_old_logprobs_from_the_update(tmp_path, monkeypatch) -> None:
    """64 samples and mini-batches of 64: the old log-probs come from the update's forward, not a
    scoring pass (PPOTrainer.old_from_update). The stats computed from them put each sample back in
    its place: the rollout/trainer gap stays at fp32 noise (a misplaced row would be nats off).
    The reward comes over HTTP (``reward.kind=http``) from ``tritonrlhf.engine.rewards.serve``
    serving ``target_reward`` behind a bearer token read from the environment."""
    require("vllm", "deepspeed")
    token_env, token = "TRITONRLHF_TEST_REWARD_TOKEN", "e2e-secret-7f3a"
    monkeypatch.setenv(token_env, token)
    server, url = start_reward_server(
        tmp_path, "--function", "tritonrlhf.engine.tasks:target_reward", "--auth-env", token_env
    )
    http = ["reward.kind=http", f"reward.url={url}", f"reward.http.auth_env={token_env}"]
    extra = ["total_steps=3", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=64", *http, *QUIET]
    try:
        run = launch(tmp_path / "one_update", extra, timeout_s=300, config=GRPO)
    finally:
        server.kill_group()
    run.check()
    assert all(r["rollout/invalid_rewards"] == 0 and r["reward/errors"] == 0 for r in run.metrics)
    assert token not in (tmp_path / "one_update" / "config.yaml").read_text() and token not in run.output
    assert run.summary["algo/old_logprobs"] == "update"
    assert "old log-probs come from the update's own forward" in run.output
    rows = run.metrics
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference
    assert rows[-1]["kl/mean"] > 0 and all(r["entropy/mean"] > 0.5 for r in rows)
    assert all(r["rollout/logprob_gap"] < GAP_TOL_FP32 for r in rows), [
        r["rollout/logprob_gap"] for r in rows
    ]
    assert all(abs(r["is/mean"] - 1) < 1e-3 and r["is/truncated_frac"] == 0 for r in rows)
    assert all(r["clipfrac"] == 0 for r in rows)  # ratio exactly 1 in the one update


def test_split_with_the_hf_backend_samples_from_the_synced_policy(tmp_path) -> None:
    """``rollout.backend=hf`` on a rollout rank (``tritonrlhf.engine.rl.rollout_server.build_engine``): 1 trainer +
    1 rank generating with transformers, synchronous. Every step's samples come from the weights the
    trainer pushed after the previous update: their log-probs equal the trainer's within fp32 noise
    (a missed or misnamed sync leaves the gap at the size of an update's change, >> 1e-3: checked by
    disabling ``HFRollout.load_weights``). At KL coefficient 0 with ``placement.scoring=rollout``
    neither side builds a reference (``ppo.kl.reference=auto``): the rollout rank sends rewards only."""
    require("deepspeed")
    extra = [
        "total_steps=3",
        "ppo.rollout_batch_size=16",
        "ppo.mini_batch_size=64",
        "placement.mode=split",
        "async.max_staleness=0",
        "placement.scoring=rollout",
        "placement.timeout_s=120",
        "rollout.backend=hf",
        "ppo.kl.coef=0",
        "actor.lr=1e-2",  # updates large enough that a stale policy would show
        *QUIET,
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        run = launch(tmp_path / "split_hf", extra, ranks=2, timeout_s=300, config=GRPO)
    run.check()
    assert "no reference model, no reference forward" in run.output
    rows = run.metrics
    assert [r["step"] for r in rows] == [1, 2, 3]
    (report,) = run.ranks  # the trainer rank
    assert report["actor"]["n_changed"] == report["actor"]["n_tensors"]
    for r in rows:
        assert r["algo/reference"] == "skipped" and math.isfinite(r["reward/mean"])
        assert not [k for k in r if k.startswith("kl/")], r
        assert r["async/staleness_max"] == 0
    assert all(r["rollout/logprob_gap"] < GAP_TOL_FP32 for r in rows), [
        r["rollout/logprob_gap"] for r in rows
    ]
