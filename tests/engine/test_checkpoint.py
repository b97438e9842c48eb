"""Checkpoints: exact save/load of a DeepSpeed engine, RNGs and state; atomicity under kill -9; signals.

Fast tests run a ZeRO-2 DeepSpeed engine in this process (a world of one, gloo on
CPU) and two small subprocesses (kill -9 mid-save, then SIGTERM on the resumed run).
The slow test round-trips ZeRO-3 on 2 ranks under ``deepspeed --num_gpus 2``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.engine._scripts.ckpt_common import build_engine, build_torch_engine, param_digest, train_step
from tests.engine._scripts.launch import run_two_rank_script
from tritonrlhf.engine.checkpoint import (
    CheckpointManager,
    GracefulShutdown,
    capture_rng_state,
    engines_fingerprint,
    hf_exporter,
    restore_rng_state,
)
from tritonrlhf.engine.config import ConfigError, TinyModelConfig
from tritonrlhf.engine.data import PromptSampler
from tritonrlhf.engine.models import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests/engine/_scripts"
# Subprocesses cache their bytecode outside the tree (the environment may set PYTHONDONTWRITEBYTECODE,
# which makes every interpreter recompile torch on start: ~5 s on a busy 2-core machine).
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
ENV.pop("PYTHONDONTWRITEBYTECODE", None)
ENV["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "tritonrlhf-pycache")


@pytest.fixture(scope="module")
def actor():
    """(ZeRO-2 DeepSpeed engine, tokenizer), trained two steps."""
    torch.manual_seed(0)
    engine, tok = build_engine(zero_stage=2)
    for _ in range(2):
        train_step(engine)
    return engine, tok


def snapshot(engine) -> dict:
    """Everything a resume must restore: parameters, Adam moments, LR schedule, step counters."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
    moments = [
        {k: (v.clone() if torch.is_tensor(v) else v) for k, v in base.state[p].items()}
        for group in base.param_groups
        for p in group["params"]
    ]
    return {
        "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
        "moments": moments,
        "lr": engine.lr_scheduler.state_dict(),
        "lr_now": engine.get_lr(),
        "global_steps": engine.global_steps,
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), f"parameter {n} differs"
    assert len(a["moments"]) == len(b["moments"]) > 0
    for ma, mb in zip(a["moments"], b["moments"]):
        assert ma.keys() == mb.keys() and {"exp_avg", "exp_avg_sq"} <= ma.keys()
        for k in ma:
            assert torch.equal(torch.as_tensor(ma[k]), torch.as_tensor(mb[k])), f"optimizer state {k} differs"
    assert a["lr"] == b["lr"] and a["lr_now"] == b["lr_now"]
    assert a["global_steps"] == b["global_steps"]


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(4)


def same_draws(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# --------------------------------------------------------------------------- in-process
def test_save_load_restores_engine_rng_and_state_exactly(actor, tmp_path: Path) -> None:
    engine, tok = actor
    sampler = PromptSampler(50, 8, seed=3)
    for _ in range(8):  # into epoch 1
        sampler.next_global_batch()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    path = mgr.save(7, {"actor": engine}, {"step": 7, "sampler": sampler.state_dict()}, policy_version=7)
    assert path == tmp_path / "checkpoints/step_000007" and mgr.latest() == path
    at_save, draw_at_save = snapshot(engine), draws()
    loss_next = train_step(engine)
    after_next = snapshot(engine)
    expected_batch = sampler.next_global_batch()

    for _ in range(2):  # move everything on: weights, moments, LR schedule, RNGs
        train_step(engine)
    state = mgr.load(path, {"actor": engine})

    assert_same(snapshot(engine), at_save)
    assert same_draws(draws(), draw_at_save), "RNG streams do not continue from the save"
    resumed = PromptSampler(50, 8, seed=3)
    resumed.load_state_dict(state["sampler"])
    assert state["step"] == 7 and resumed.next_global_batch() == expected_batch
    # The next step after loading is the very step the original run took after saving.
    assert train_step(engine) == loss_next
    assert_same(snapshot(engine), after_next)


def test_hf_export_meta_and_rng_neutral_save(actor, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine, tok = actor
    mgr = CheckpointManager(tmp_path)
    before = capture_rng_state()
    expected = draws()
    restore_rng_state(before)
    path = mgr.save(
        3, {"actor": engine}, {}, hf_exporter(engine.module, tok), policy_version=5, config={"seed": 1}
    )
    assert same_draws(draws(), expected), "save must not consume or change the RNG streams"

    hf = AutoModelForCausalLM.from_pretrained(path / "hf")
    for (n, p), (n2, q) in zip(engine.module.named_parameters(), hf.named_parameters()):
        assert n == n2 and torch.equal(p.detach(), q.detach()), n
    assert AutoTokenizer.from_pretrained(path / "hf")("ab")["input_ids"] == tok("ab")["input_ids"]
    meta = mgr.read_meta(path)
    assert meta["step"] == 3 and meta["policy_version"] == 5 and meta["config"] == {"seed": 1}
    assert meta["world_size"] == 1 and meta["fingerprint"] == engines_fingerprint({"actor": engine})
    manifest = json.loads((path / "COMPLETE").read_text())
    assert "meta.json" in manifest and "hf/model.safetensors" in manifest


def test_keep_last_prunes_and_same_step_resave(actor, tmp_path: Path) -> None:
    engine, _ = actor
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        mgr.save(step, {"actor": engine}, {"step": step})
    names = sorted(p.name for p in mgr.root.iterdir())
    assert names == ["step_000003", "step_000004"]
    mgr.save(4, {"actor": engine}, {"step": 44})  # e.g. stopped right after resuming at step 4
    assert sorted(p.name for p in mgr.root.iterdir()) == names
    assert torch.load(mgr.latest() / "rank_0.pt", weights_only=False)["state"]["step"] == 44
    with pytest.raises(ConfigError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=-1)


def test_fingerprint_and_world_size_mismatch_fail_before_loading(actor, tmp_path: Path) -> None:
    engine, tok = actor
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(1, {"actor": engine}, {})
    wider = build_tiny_model(tok, TinyModelConfig(hidden_size=96, num_heads=3, num_kv_heads=3), seed=0)
    with pytest.raises(
        ConfigError,
        match=r"was written for a model with actor: 90,432 parameters .* but this run has actor: 160,224",
    ):
        mgr.load(path, {"actor": engine}, engines_fingerprint({"actor": wider}))
    # The check runs before DeepSpeed touches the engine: passing the plain model is enough.
    with pytest.raises(
        ConfigError, match="first differences: .*embed_tokens.weight: checkpoint \\[64, 64\\]"
    ):
        mgr.load(path, {"actor": wider})
    with pytest.raises(ConfigError, match="no 'critic' model"):
        mgr.load(path, {"critic": engine})
    with pytest.raises(ConfigError, match="written by 1 ranks but this run has 2"):
        CheckpointManager(tmp_path, world_size=2).load(path, {"actor": engine})


def test_resolve(actor, tmp_path: Path) -> None:
    engine, _ = actor
    mgr = CheckpointManager(tmp_path / "run")
    assert mgr.resolve("never") is None and mgr.resolve("auto") is None and mgr.latest() is None
    p1 = mgr.save(1, {"actor": engine}, {})
    p2 = mgr.save(2, {"actor": engine}, {})
    assert mgr.resolve("auto") == p2 and mgr.resolve(str(p1)) == p1
    assert mgr.resolve(str(tmp_path / "run")) == p2 and mgr.resolve(str(mgr.root)) == p2
    with pytest.raises(ConfigError, match="does not exist"):
        mgr.resolve(str(tmp_path / "nope"))
    # A truncated file (torn copy, full disk) makes a checkpoint incomplete; auto falls back.
    rank_file = p2 / "rank_0.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:10])
    assert mgr.latest() == p1 and mgr.resolve("auto") == p1
    with pytest.raises(
        ConfigError,
        match=r"not a complete checkpoint: rank_0.pt has 10 bytes.*newest complete checkpoint there is .*step_000001",
    ):
        mgr.resolve(str(p2))
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        mgr.load(p2, {"actor": engine})
    (p1 / "COMPLETE").unlink()
    with pytest.raises(ConfigError, match="no COMPLETE marker"):
        mgr.resolve(str(p1))
    tmp = mgr.root / "step_000003.tmp-abc123"
    tmp.mkdir()
    with pytest.raises(ConfigError, match="unfinished save"):
        mgr.resolve(str(tmp))
    with pytest.raises(ConfigError, match="neither a checkpoint"):
        mgr.resolve(str(tmp_path))


def test_graceful_shutdown_in_process_restores_handlers() -> None:
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    for sig in (signal.SIGTERM, signal.SIGINT):
        with GracefulShutdown() as stop:
            assert not stop.should_stop and not stop.should_stop_all()
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
            assert stop.should_stop and stop.should_stop_all() and stop.received == sig
            assert signal.getsignal(sig) == signal.SIG_DFL  # a second signal kills at once
            assert f"Stopped on {signal.Signals(sig).name} after step 3" in stop.stop_message(3, "x")
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == old


def test_export_raising_mid_save_keeps_previous_checkpoint(actor, tmp_path: Path) -> None:
    engine, _ = actor
    mgr = CheckpointManager(tmp_path)
    p1 = mgr.save(1, {"actor": engine}, {"step": 1})

    def broken_export(path: Path) -> None:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        mgr.save(2, {"actor": engine}, {"step": 2}, broken_export)
    assert mgr.latest() == p1 and mgr.resolve("auto") == p1
    assert len(list(mgr.root.glob("step_000002.tmp-*"))) == 1
    assert mgr.load(mgr.resolve("auto"), {"actor": engine})["step"] == 1
    mgr.save(3, {"actor": engine}, {"step": 3})
    assert sorted(p.name for p in mgr.root.iterdir()) == ["step_000001", "step_000003"]


# --------------------------------------------------------------------------- subprocesses
def _wait_for(cond, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"worker exited ({proc.returncode}) before {what}:\n{out[-3000:]}\n{err[-3000:]}"
            )
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _progress(out: Path) -> list[dict]:
    f = out / "progress.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def _worker(out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPTS / "ckpt_worker.py"), "--out", str(out), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("engine_kind", ["torch", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_kill9_mid_save_then_resume_auto_and_sigterm(engine_kind: str, tmp_path: Path, request) -> None:
    """kill -9 during step 3's save; resume=auto takes step 2, replays step 3 exactly; SIGTERM saves, exits 0."""
    out = tmp_path / "run"
    out.mkdir()
    kind = ("--engine", engine_kind)
    proc = _worker(out, *kind, "--save-every", "1", "--hang-export-at", "3", "--step-seconds", "0")
    _wait_for(lambda: (out / "exporting").exists(), proc, 120, "the hanging save")
    proc.kill()  # kill -9 in the middle of writing checkpoint 3
    proc.communicate(timeout=30)
    first_run = _progress(out)
    mgr = CheckpointManager(out, keep_last=3)
    assert [p.name for p in mgr.complete()] == ["step_000001", "step_000002"]
    assert [p.name for p in mgr.root.glob("step_000003.tmp-*")], "expected the interrupted save's tmp folder"
    assert mgr.resolve("auto") == mgr.root / "step_000002"

    (out / "progress.jsonl").unlink()
    proc = _worker(out, *kind, "--resume", "auto", "--step-seconds", "0.3")
    _wait_for(lambda: len(_progress(out)) >= 2, proc, 120, "two resumed steps")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"resumed from {mgr.root / 'step_000002'} at step 2" in stdout
    resumed = _progress(out)
    # The resumed run's step 3 is the crashed run's step 3: weights, optimizer, LR and RNGs all came back.
    assert resumed[0]["step"] == 3 and resumed[0]["digest"] == first_run[2]["digest"]
    last = resumed[-1]["step"]  # the step the signal landed in was finished, then saved
    assert (
        f"Stopped on SIGTERM after step {last}; checkpoint saved to {mgr.root / f'step_{last:06d}'}" in stdout
    )
    assert "received SIGTERM: saving a checkpoint after this step" in stderr
    assert mgr.latest() == mgr.root / f"step_{last:06d}"
    assert not list(mgr.root.glob("*.tmp-*")), "the stale tmp folder should have been cleaned"
    engine = request.getfixturevalue("actor")[0] if engine_kind == "deepspeed" else build_torch_engine(seed=1)
    assert mgr.load(mgr.latest(), {"actor": engine})["step"] == last
    assert param_digest(engine.module) == resumed[-1]["digest"]


def test_second_signal_exits_at_once() -> None:
    """The first SIGTERM lets the (60 s) step run on; a second, sent once the first was handled,
    kills the process inside the step. Ordered on the handler's message, bounded far below the
    step, so a loaded machine cannot make it fail."""
    step_s = 60
    cmd = [sys.executable, str(SCRIPTS / "ckpt_signals.py"), str(step_s)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert "send SIGTERM again to exit now" in proc.stderr.readline()  # the first was handled
        assert proc.poll() is None, "the first signal must let the step finish"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=step_s / 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM
    assert "stopped after step" not in proc.stdout.read(), "the second signal must not wait for the step"


# --------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_zero3_two_ranks_save_load_round_trip(tmp_path: Path) -> None:
    r0, r1 = run_two_rank_script(SCRIPTS / "ckpt_zero3.py", tmp_path)
    for r in (r0, r1):
        assert r["digest_after_load"] == r["digest_at_save"] != r["digest_moved_on"]
        assert r["digest_next_after_load"] == r["digest_next"]
        assert r["draw_after_load"] == r["draw_at_save"]
        assert r["state"] == {"rank": r["rank"], "step": 2}
    assert r0["digest_at_save"] == r1["digest_at_save"]
    assert r0["hf_matches"] and r0["files"] == sorted(r0["files"])
    assert {"rank_0.pt", "rank_1.pt", "hf/model.safetensors", "meta.json"} <= set(r0["files"])
    assert r0["mismatch_error"].startswith("resume: checkpoint")
