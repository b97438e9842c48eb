"""PPO checkpoint/resume through the CLI: a run SIGKILLed mid-step and resumed equals the uninterrupted run.

Runs of ``python -m tritonrlhf.engine.cli ppo`` on the tiny config (1 rank, real vLLM and DeepSpeed on CPU):

* A: 6 steps, uninterrupted.
* B1: 6 steps, checkpointing every step, SIGKILLed -- its whole process group -- during step 4:
  ``_scripts/stage_run.py`` holds the run right after the actor's update of step 4 (before the
  critic's, before the step is logged or saved), and the test kills it there.
* B2: the same output folder, ``resume=auto``: continues from step 3's checkpoint.

Steps 4-6 of B (after the resume) must log the same reward, KL and losses as A's steps 4-6 within
1e-6, and B's final actor must equal A's: the checkpoint carries the DeepSpeed state, the sampler,
KL controller, reward normalizer, the trainer's generator (from which the per-request vLLM seeds
are drawn) and the RNGs. A ``resume`` path that does not exist, or a checkpoint of another model
shape, fails with exit 2 before any step.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from tests.engine._scripts.launch import Launch, run
from tests.engine._scripts.stage_launch import STAGE_RUN, hf_weights, max_weight_diff, metric_diffs, metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
TINY_CONFIG = REPO / "configs" / "ppo_tiny.yaml"
SMALL = [
    "ppo.rollout_batch_size=8",
    "ppo.mini_batch_size=8",  # one actor and one critic update per step
    "ppo.micro_batch_size=4",
    "rollout.max_new_tokens=8",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
]
STEPS, KILL_IN = 6, 4
COMPARED = ("reward/mean", "kl/mean", "loss/policy", "loss/value")
TOL = 1e-6
VLLM_IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _cli(out_dir: Path, *overrides: str, pause_at: int = 0) -> list[str]:
    """``python -m tritonrlhf.engine.cli ppo`` on the small tiny config; through ``stage_run.py`` to pause in a step."""
    head = [sys.executable, "-m", "tritonrlhf.engine.cli"]
    if pause_at:
        head = [
            sys.executable,
            str(STAGE_RUN),
            "--pause-at",
            str(pause_at),
            "--marker",
            str(_marker(out_dir)),
        ]
    return [*head, "ppo", "--config", str(TINY_CONFIG), f"output_dir={out_dir}", *SMALL, *overrides]


def _ppo(out_dir: Path, *overrides: str, pause_at: int = 0) -> Launch:
    return Launch(
        _cli(out_dir, *overrides, pause_at=pause_at), out_dir.with_suffix(".log"), **VLLM_IN_PROCESS
    )


def _marker(out_dir: Path) -> Path:
    return out_dir.with_suffix(".paused")


def _done(launch: Launch, timeout_s: float = 240) -> int:
    rc = launch.wait(timeout_s)
    print(f"{launch.log.stem}: exit {rc} after {launch.seconds:.0f}s")
    return rc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    pytest.importorskip("vllm")
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("ppo_resume")
    a, b = root / "a", root / "b"
    every = [f"total_steps={STEPS}", "save_every=1", "keep_last=2"]
    res: dict = {"a_dir": a, "b_dir": b}
    a_run = _ppo(a, f"total_steps={STEPS}")  # beside B1: most of a launch is single-threaded start-up
    b1 = _ppo(b, *every, pause_at=KILL_IN)
    try:
        b1.wait_for(_marker(b), 300)
        b1.kill_group()
        res["b1"] = (_done(b1, 10), b1.output)
        res["logged_when_killed"] = sorted(metrics(b))
        res["checkpoints_when_killed"] = sorted(p.name for p in (b / "checkpoints").iterdir())
        b2 = _ppo(b, *every, "resume=auto")
        res["b2"] = (_done(b2), b2.output)
        res["a"] = (_done(a_run), a_run.output)
    finally:
        a_run.kill_group()
        b1.kill_group()
    return res


def test_sigkill_during_step_4_then_resume_matches_uninterrupted(runs) -> None:
    a, b = runs["a_dir"], runs["b_dir"]
    assert runs["a"][0] == 0, runs["a"][1][-6000:]
    assert runs["b1"][0] == -signal.SIGKILL, runs["b1"][1][-6000:]
    assert runs["b2"][0] == 0, runs["b2"][1][-6000:]
    # Killed inside step 4: step 4 was neither logged nor saved; step 3's checkpoint is complete.
    assert runs["logged_when_killed"] == [1, 2, 3]
    assert runs["checkpoints_when_killed"] == ["step_000002", "step_000003"]
    assert f"[ppo] resumed from {b / 'checkpoints' / 'step_000003'} at step 3" in runs["b2"][1]

    ma, mb = metrics(a), metrics(b)
    assert sorted(ma) == sorted(mb) == list(range(1, STEPS + 1))
    diffs = metric_diffs(ma, mb, COMPARED, TOL)
    assert not diffs, f"resumed run differs from the uninterrupted one (step, key): (A, B): {diffs}"
    assert mb[STEPS]["policy_version"] == STEPS
    # The samples log (ppo_tiny.yaml: 4 rows every step) of the resumed run is the uninterrupted one's.
    sa, sb = ([json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()] for d in (a, b))
    assert (
        [r["step"] for r in sb]
        == [r["step"] for r in sa]
        == [s for s in range(1, STEPS + 1) for _ in range(4)]
    )
    for ra, rb in zip(sa, sb):
        assert (rb["prompt"], rb["response"]) == (ra["prompt"], ra["response"]), ra["step"]
        assert rb["kl"] == pytest.approx(ra["kl"], abs=TOL) and rb["reward"] == pytest.approx(
            ra["reward"], abs=TOL
        )

    assert (worst := max_weight_diff(a / "final", b / "final")) <= TOL, f"final actors differ by {worst:.3g}"
    # The run actually learned: the final actor is not the initial policy.
    assert max_weight_diff(a / "final", a / "init_policy") > 1e-4
    # keep_last=2: the last two checkpoints survive, complete, with the final actor's HF export.
    ckpts = b / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000005", "step_000006"]
    assert (ckpts / "step_000006" / "COMPLETE").is_file()
    assert hf_weights(ckpts / "step_000006" / "hf").keys() == hf_weights(b / "final").keys()
    assert max_weight_diff(ckpts / "step_000006" / "hf", b / "final") == 0


def _fails_before_any_step(out: Path, *overrides: str) -> str:
    res = run(_cli(out, *overrides), timeout_s=180, **VLLM_IN_PROCESS)
    assert res.returncode == 2, res.stdout[-4000:]
    assert not (out / "metrics.jsonl").exists()
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("error: ")]
    return line


def test_resume_from_missing_path_fails_fast(tmp_path) -> None:
    pytest.importorskip("deepspeed")
    missing = tmp_path / "no" / "such" / "checkpoint"
    line = _fails_before_any_step(tmp_path / "out", "total_steps=4", f"resume={missing}")
    assert f"resume: checkpoint path does not exist: {missing}" in line
    assert not (tmp_path / "out" / "init_policy").exists()  # failed before building any role


def test_resume_from_another_model_shape_fails_before_any_step(tmp_path) -> None:
    """A real checkpoint of a one-layer policy, resumed by the two-layer tiny config (HF rollout: no vLLM)."""
    pytest.importorskip("deepspeed")
    hf = ["rollout.backend=hf", "total_steps=1"]
    one = run(_cli(tmp_path / "one", *hf, "save_every=1", "model.tiny.num_layers=1"), timeout_s=180)
    assert one.returncode == 0, one.stdout[-4000:]
    ckpt = tmp_path / "one" / "checkpoints" / "step_000001"
    line = _fails_before_any_step(tmp_path / "two", *hf, f"resume={ckpt}")
    assert f"resume: checkpoint {ckpt} was written for a model with actor: " in line
    assert "lm.model.layers.1.self_attn.q_proj.weight: only in this run" in line
