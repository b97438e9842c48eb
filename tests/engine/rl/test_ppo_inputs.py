"""Bad input to ``tritonrlhf.engine.cli ppo``: fatal problems fail before any rollout, with exit status 2 and
one clear line on stderr; tolerable ones (long prompts, non-finite rewards) are counted, logged
and skipped.

Fast tests call ``tritonrlhf.engine.cli.main`` in this process for the errors the CLI catches from the config
alone (no torch.distributed, about a second). The errors found while building the roles (the
vocabulary check, the reward import, the output directory) share one subprocess
(``_scripts/ppo_errors.py``). One short real run (slow) covers long prompts and NaN rewards;
another, with a NaN policy loss (``_scripts/ppo_poisoned.py``), stops after consecutive skipped updates.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tritonrlhf.engine import cli
from tritonrlhf.engine.tasks import toy_prompts, toy_reward

sys.path.insert(0, str(Path(__file__).parents[1] / "_scripts"))
from ppo_launch import REPO, SCRIPTS, TINY_CONFIG, PPORun, launch, require  # noqa: E402

CONFIG = ["ppo", "--config", str(TINY_CONFIG)]


def _cli(capsys, *overrides: str) -> tuple[int, str]:
    rc = cli.main([*CONFIG, *overrides])
    return rc, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"want one 'error:' line, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- config-only errors (fast)
def test_missing_model_path_exits_2_before_any_work(tmp_path):
    """The real ``python -m tritonrlhf.engine.cli`` process: status 2, the key and path named, nothing written."""
    out = tmp_path / "out"
    missing = tmp_path / "no_such_model"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tritonrlhf.engine.cli",
            *CONFIG,
            f"model.path={missing}",
            f"output_dir={out}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert "model.path" in line and str(missing) in line
    assert not out.exists(), "output_dir was created: the error came after work started"


def test_unknown_key_suggests_the_closest(capsys, tmp_path):
    rc, err = _cli(capsys, "actor.lrr=1e-3")
    assert rc == 2 and "'actor.lrr'" in _one_error_line(err) and "did you mean 'lr'" in err
    rc, err = _cli(capsys, "ppo.mini_bach_size=8")
    assert rc == 2 and "did you mean 'mini_batch_size'" in _one_error_line(err)
    bad_yaml = tmp_path / "typo.yaml"
    bad_yaml.write_text(TINY_CONFIG.read_text().replace("total_steps:", "totl_steps:"))
    rc = cli.main(["ppo", "--config", str(bad_yaml)])
    assert rc == 2 and "did you mean 'total_steps'" in _one_error_line(capsys.readouterr().err)


def test_batch_not_divisible_by_micro_batch_times_world(capsys, monkeypatch):
    rc, err = _cli(capsys, "ppo.mini_batch_size=8", "ppo.micro_batch_size=3")
    line = _one_error_line(err)
    assert rc == 2 and "ppo.mini_batch_size=8" in line and "3 x 1" in line
    # Under a launcher the world comes from WORLD_SIZE: 8 samples over 2 ranks x 8 per micro-batch.
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, err = _cli(capsys, "ppo.mini_batch_size=8", "ppo.micro_batch_size=8")
    assert rc == 2 and "8 x 2" in _one_error_line(err)
    monkeypatch.delenv("WORLD_SIZE")
    rc, err = _cli(capsys, "ppo.rollout_batch_size=12", "ppo.mini_batch_size=8")
    assert rc == 2 and "not divisible by ppo.mini_batch_size=8" in _one_error_line(err)


def test_long_prompts_truncated_or_dropped_and_counted(tmp_path):
    from tritonrlhf.engine.config import DataConfig
    from tritonrlhf.engine.data import PromptDataset
    from tritonrlhf.engine.models import build_tokenizer

    tok = build_tokenizer()
    prompts = ["say a:", "1 " * 40 + "say b:", "2 say c:", "3 " * 30 + "say d:"]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cut = PromptDataset(DataConfig(prompts=str(path), max_prompt_len=16, on_long_prompt="truncate"), tok)
    assert (cut.num_truncated, cut.num_dropped, len(cut)) == (2, 0, 4)
    assert all(len(ids) <= 16 and ids[0] == tok.bos_token_id for ids in cut.input_ids)
    # The tail survives, so the instruction does.
    assert tok.decode(cut.input_ids[1], skip_special_tokens=True).endswith("say b:")
    kept = PromptDataset(DataConfig(prompts=str(path), max_prompt_len=16, on_long_prompt="drop"), tok)
    assert (kept.num_truncated, kept.num_dropped, kept.texts) == (0, 2, ["say a:", "2 say c:"])


# --------------------------------------------------------------------------- errors while building roles
def _tiny_model_small_vocab(path: Path) -> Path:
    """The toy tokenizer (64 tokens) saved beside a Llama whose embedding has only 32 rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tritonrlhf.engine.models import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    assert len(tok) > cfg.vocab_size
    return path


def _tiny_checkpoint(path: Path, kind: str) -> Path:
    """A tiny random causal LM (``kind="lm"``) or one-label reward model (``"rm"``) with the toy tokenizer."""
    from tritonrlhf.engine.config import TinyModelConfig
    from tritonrlhf.engine.models import build_tiny_model, build_tiny_reward_model, build_tokenizer

    tok = build_tokenizer()
    build = build_tiny_model if kind == "lm" else build_tiny_reward_model
    build(tok, TinyModelConfig(), seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def role_errors(tmp_path_factory) -> dict:
    """Each case through ``tritonrlhf.engine.cli.main`` in one subprocess; name -> {rc, stderr, seconds, vllm_imported}."""
    require("deepspeed")
    tmp = tmp_path_factory.mktemp("ppo_inputs")
    blocker = tmp / "a_file"
    blocker.write_text("not a directory")
    cases = {
        "reward_module": [
            *CONFIG,
            f"output_dir={tmp / 'o1'}",
            "reward.function=tests.engine.no_such_module:fn",
        ],
        "reward_attr": [
            *CONFIG,
            f"output_dir={tmp / 'o2'}",
            f"reward.function={Path(__file__).relative_to(REPO)}:no_such_reward",
        ],
        "output_dir": [*CONFIG, f"output_dir={blocker / 'run'}"],
        "vocab": [
            *CONFIG,
            f"output_dir={tmp / 'o3'}",
            f"model.path={_tiny_model_small_vocab(tmp / 'small')}",
        ],
        "policy_is_reward_model": [
            *CONFIG,
            f"output_dir={tmp / 'o4'}",
            f"model.path={_tiny_checkpoint(tmp / 'rm', 'rm')}",
        ],
        "reward_is_causal_lm": [
            *CONFIG,
            f"output_dir={tmp / 'o5'}",
            "reward.kind=model",
            f"reward.model_path={_tiny_checkpoint(tmp / 'lm', 'lm')}",
            "critic.init_from=reward",
        ],
    }
    (tmp / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "ppo_errors.py"), str(tmp / "cases.json"), str(tmp / "result.json")],
        cwd=REPO,
        env={**_env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp / "result.json").read_text())
    for name, r in results.items():
        print(f"{name}: rc={r['rc']} in {r['seconds']:.1f}s: {r['stderr'].strip()[:200]}")
        r["out_dir"] = next(a.split("=", 1)[1] for a in cases[name] if a.startswith("output_dir="))
    return results


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


def _failed_before_rollout(r: dict) -> str:
    assert r["rc"] == 2, r["stderr"][-3000:]
    assert not r["vllm_imported"], "the rollout engine was being built: the error came too late"
    assert not (Path(r["out_dir"]) / "metrics.jsonl").exists()
    return _one_error_line(r["stderr"])


def test_reward_module_that_cannot_be_imported(role_errors):
    line = _failed_before_rollout(role_errors["reward_module"])
    assert "cannot import module 'tests.engine.no_such_module'" in line


def test_reward_function_missing_from_its_file(role_errors):
    line = _failed_before_rollout(role_errors["reward_attr"])
    assert "has no 'no_such_reward'" in line and "nan_marked_reward" in line  # lists what is there


def test_output_dir_not_writable(role_errors):
    line = _failed_before_rollout(role_errors["output_dir"])
    assert "output_dir is not writable" in line and "a_file" in line


def test_tokenizer_larger_than_model_vocabulary(role_errors):
    line = _failed_before_rollout(role_errors["vocab"])
    assert "tokenizer has 64 tokens" in line and "vocab_size=32" in line


def test_reward_checkpoint_as_policy(role_errors):
    line = _failed_before_rollout(role_errors["policy_is_reward_model"])
    assert "model.path:" in line and "is a sequence-classification checkpoint" in line
    assert "not a causal LM" in line


def test_causal_lm_as_reward_model(role_errors):
    line = _failed_before_rollout(role_errors["reward_is_causal_lm"])
    assert "reward.model_path:" in line and "is a causal-LM checkpoint" in line
    assert "not a sequence-classification reward model" in line


# --------------------------------------------------------------------------- a short real run
def nan_marked_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The toy reward, except NaN for prompts starting ``"n "`` and +inf for those starting ``"i "``."""
    scores = toy_reward(prompts, responses)
    return [
        math.nan if p.startswith("n ") else math.inf if p.startswith("i ") else s
        for p, s in zip(prompts, scores)
    ]


MAX_PROMPT_LEN = 24
BATCH = 8


@pytest.fixture(scope="module")
def marked_prompts(tmp_path_factory) -> tuple[Path, list[str], int]:
    """A JSONL of toy prompts: every 5th too long (dropped), every 3rd of the rest marked non-finite."""
    kept, rows, n_long = [], [], 0
    for i, p in enumerate(toy_prompts(40, seed=3)):
        if i % 5 == 4:
            rows.append("7 " * MAX_PROMPT_LEN + p)  # > MAX_PROMPT_LEN tokens
            n_long += 1
            continue
        if len(kept) % 3 == 1:
            p = ("n " if len(kept) % 2 else "i ") + p
        kept.append(p)
        rows.append(p)
    path = tmp_path_factory.mktemp("marked") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    return path, kept, n_long


@pytest.fixture(scope="module")
def marked_run(tmp_path_factory, marked_prompts) -> PPORun:
    require("vllm", "deepspeed")
    path, _, _ = marked_prompts
    run = launch(
        tmp_path_factory.mktemp("ppo_marked"),
        [
            "total_steps=2",
            f"data.prompts={path}",
            f"data.max_prompt_len={MAX_PROMPT_LEN}",
            "data.on_long_prompt=drop",
            "data.shuffle=false",  # batches are the kept prompts in file order
            f"reward.function={__name__}:{nan_marked_reward.__name__}",
            f"ppo.rollout_batch_size={BATCH}",
            f"ppo.mini_batch_size={BATCH}",
            "actor.zero_stage=3",  # the one-rank ZeRO-3 path
            "critic.zero_stage=3",
            "logging.tensorboard=false",
        ],
        ranks=1,
        timeout_s=360,
    )
    print(f"marked run: {run.wall_s:.0f}s")
    run.check()
    return run


@pytest.mark.slow
def test_long_prompts_dropped_and_counted_in_summary(marked_run, marked_prompts):
    _, _, n_long = marked_prompts
    s = marked_run.summary
    assert n_long > 0 and s["prompts/dropped"] == n_long and s["prompts/truncated"] == 0
    (cfg,) = [
        r for r in (marked_run.out_dir / "config.yaml").read_text().splitlines() if "on_long_prompt" in r
    ]
    assert "drop" in cfg


@pytest.mark.slow
def test_non_finite_rewards_logged_and_skipped(marked_run, marked_prompts):
    _, kept, _ = marked_prompts
    rows = marked_run.metrics
    for step, row in enumerate(rows):
        batch = kept[step * BATCH : (step + 1) * BATCH]
        want = sum(p.startswith(("n ", "i ")) for p in batch)
        assert want > 0 and row["rollout/invalid_rewards"] == want, (
            step,
            row["rollout/invalid_rewards"],
            want,
        )
        # Skipped, not propagated: every statistic and loss stays finite and no update was thrown away.
        for key in ("reward/mean", "loss/policy", "loss/value", "kl/mean", "advantages/mean", "returns/mean"):
            assert row[key] is not None and math.isfinite(row[key]), (step, key, row[key])
        assert row["actor/skipped"] == 0 and row["critic/skipped"] == 0
        assert 0 <= row["reward/mean"] <= 1  # toy rewards of the valid samples only
    assert marked_run.summary["rewards/invalid"] == sum(r["rollout/invalid_rewards"] for r in rows)
    (report,) = marked_run.ranks
    assert report["zero_stage"] == {"actor": 3, "critic": 3}
    for role in ("actor", "critic"):
        assert report[role]["all_finite"] and report[role]["n_changed"] == report[role]["n_tensors"], role


# --------------------------------------------------------------------------- non-finite updates
@pytest.mark.slow
def test_ppo_stops_after_consecutive_non_finite_updates(tmp_path):
    """Every actor update NaN (``_scripts/ppo_poisoned.py``): each is skipped and logged; after 3 in
    a row (one actor update per step here) a checkpoint, then ``NonFiniteError`` naming step 3."""
    require("deepspeed")
    import time

    import torch
    from safetensors.torch import load_file

    from tests.engine._scripts.launch import run
    from tritonrlhf.engine.checkpoint import CheckpointManager

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(SCRIPTS / "ppo_poisoned.py"),
        *CONFIG,
        f"output_dir={out}",
        "rollout.backend=hf",
        "total_steps=10",
        "max_consecutive_skips=3",
        "ppo.rollout_batch_size=8",  # one mini-batch, so one actor update, per step
        "ppo.mini_batch_size=8",
        "logging.tensorboard=false",
    ]
    t0 = time.perf_counter()
    proc = run(cmd, timeout_s=300)
    result = PPORun(proc.returncode, proc.stdout, out, time.perf_counter() - t0)
    print(f"poisoned run: {result.wall_s:.0f}s, exit {result.returncode}")
    assert result.returncode != 0, result.output[-6000:]
    ckpt = CheckpointManager(out, keep_last=3, rank=0, world_size=1).resolve("auto")
    assert ckpt is not None and ckpt.name == "step_000003", (ckpt, result.output[-6000:])
    assert (
        "NonFiniteError: step 3: 3 updates in a row were skipped for a non-finite loss or gradient "
        f"(max_consecutive_skips=3); checkpoint saved to {ckpt}." in result.output
    ), result.output[-6000:]
    rows = result.metrics
    assert [(r["step"], r["actor/skipped"], r["loss/policy"]) for r in rows] == [
        (s, 1.0, None) for s in (1, 2, 3)
    ]
    assert all(r["critic/skipped"] == 0 for r in rows)  # only the actor was poisoned
    assert not (out / "summary.json").exists()
    state = torch.load(ckpt / "rank_0.pt", weights_only=False)["state"]
    assert state["step_idx"] == 3
    assert state["counters"]["actor"] == {"steps": 3, "skipped": 3, "consecutive_skips": 3}
    # No actor update was applied: the checkpoint's HF export is the initial policy, bit for bit.
    init = load_file(out / "init_policy" / "model.safetensors")
    saved = load_file(ckpt / "hf" / "model.safetensors")
    assert saved.keys() == init.keys()
    assert all(torch.equal(saved[k], init[k]) for k in init)
