"""What the SFT, RM and DPO stages share (``tritonrlhf.engine.stages.common``): bad input, checkpoints, the skip limit.

Bad input, case by case, through ``tritonrlhf.engine.cli.main`` in this process (the function ``python -m
engine.cli`` exits with): status 2, one ``error:`` line naming the problem and where it is, and
no ``metrics.jsonl`` -- not one step was trained. A ``resume`` checkpoint of another model shape
is refused the same way. An update that is non-finite every step is skipped, counted, and after
``max_consecutive_skips`` the run saves a checkpoint and stops with an error naming the step.
The kill -9 / SIGTERM / exact-resume runs are in ``test_sft.py``, ``test_rm.py`` and ``test_dpo.py`` (slow).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tritonrlhf.engine import cli
from tritonrlhf.engine.checkpoint import verify_checkpoint
from tritonrlhf.engine.config import TinyModelConfig, load_config
from tritonrlhf.engine.demo.task import make_preference_data, make_sft_data, write_jsonl
from tritonrlhf.engine.models import build_tiny_model, build_tokenizer
from tritonrlhf.engine.rl.train_engine import NonFiniteError
from tritonrlhf.engine.stages.dpo import DPOConfig, run_dpo
from tritonrlhf.engine.stages.rm import RMConfig, run_rm
from tritonrlhf.engine.stages.sft import SFTConfig, run_sft

STAGES = {"sft": (SFTConfig, run_sft), "rm": (RMConfig, run_rm), "dpo": (DPOConfig, run_dpo)}  # config, run
ONE_LAYER = TinyModelConfig(num_layers=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Data for every stage (good and bad), SFT-like checkpoints, and a file to block an output_dir."""
    d = tmp_path_factory.mktemp("inputs")
    tok = build_tokenizer()
    f = {
        "sft": write_jsonl(make_sft_data(24, seed=0), d / "sft.jsonl"),
        "rm": write_jsonl(make_preference_data(24, seed=0), d / "pairs.jsonl"),
        "dpo": d / "pairs.jsonl",  # the same preference pairs
        "blocker": d / "a_file",
    }
    f["blocker"].write_text("not a directory")
    for name, tiny, vocab in (
        ("policy", TinyModelConfig(), None),
        ("policy_1l", ONE_LAYER, None),
        ("small", None, 32),
    ):
        model = build_tiny_model(tok, tiny or TinyModelConfig(), seed=0)
        if vocab:
            model.resize_token_embeddings(vocab)  # smaller than the tokenizer's 64 tokens
        model.save_pretrained(d / name)
        tok.save_pretrained(d / name)
        f[name] = d / name
    good = {
        "sft": {"prompt": "copy 1:", "response": "1"},
        "rm": {"prompt": "copy 1:", "chosen": "1", "rejected": "2"},
        "dpo": {"prompt": "copy 1:", "chosen": "1", "rejected": "2"},
    }
    for stage, rec in good.items():
        line = json.dumps(rec) + "\n"
        (d / f"{stage}_malformed.jsonl").write_text(line + line[:-3] + "\n")
        (d / f"{stage}_missing.jsonl").write_text(line + json.dumps({"prompt": "copy 2:"}) + "\n")
        f[f"{stage}_malformed"], f[f"{stage}_missing"] = (
            d / f"{stage}_malformed.jsonl",
            d / f"{stage}_missing.jsonl",
        )
    return f


def _argv(stage: str, files: dict[str, Path], out: Path, *overrides: str) -> list[str]:
    """A small valid run of ``stage`` (RM and DPO start from the tiny policy), then ``overrides``."""
    start = [f"model.path={files['policy']}"] if stage != "sft" else []
    return [
        stage,
        f"output_dir={out}",
        f"data.train={files[stage]}",
        "data.eval_size=4",
        "total_steps=2",
        "train.batch_size=8",
        "train.micro_batch_size=8",
        "optim.warmup_steps=0",
        *start,
        *overrides,
    ]


def _fails_before_training(capsys, argv: list[str], out: Path) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]  # others: library logs
    assert rc == 2 and len(lines) == 1, f"rc={rc}:\n{err[-4000:]}"
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists(), "a step was trained"
    return lines[0]


# (case, overrides with {name} for a file from ``files``, message regex with {name} likewise)
CASES = [
    ("unknown key", ["optim.lrr=1e-3"], r"unknown config key 'optim.lrr'.*did you mean 'lr'"),
    ("unknown top-level key", ["save_evry=1"], r"unknown config key 'save_evry'.*did you mean 'save_every'"),
    ("negative lr", ["optim.lr=-1e-3"], r"optim.lr must be > 0, got -0.001"),
    ("infinite lr", ["optim.lr=.inf"], r"optim.lr must be finite"),
    (
        "batch not divisible",
        ["train.batch_size=12"],
        r"train.batch_size=12 is not divisible by micro_batch_size x world_size = 8 x 1",
    ),
    ("negative skip limit", ["max_consecutive_skips=-1"], r"max_consecutive_skips must be >= 0"),
    ("bad resume", ["resume=sometimes"], r"resume: checkpoint path does not exist: sometimes"),
    ("model path", ["model.path=/no/such/model"], r"model.path: path does not exist: /no/such/model"),
    ("data path", ["data.train=/no/such.jsonl"], r"data.train: file does not exist: /no/such.jsonl"),
    ("malformed jsonl", ["data.train={malformed}"], r"_malformed.jsonl:2: malformed JSON"),
    ("missing column", ["data.train={missing}"], r"_missing.jsonl:2: missing column '(response|chosen)'"),
    (
        "empty after filtering",
        ["data.max_prompt_len=2", "data.on_long_prompt=drop"],
        r"(all 24 records were dropped|only 0 usable pairs of 24|no usable pairs among 24 records)",
    ),
    ("output dir not writable", ["output_dir={blocker}/run"], r"output_dir is not writable: .*a_file/run"),
    ("tokenizer larger than model", ["model.path={small}"], r"tokenizer has 64 tokens.*vocab_size=32"),
]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("case", "overrides", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_before_training(capsys, tmp_path, files, stage, case, overrides, message) -> None:
    named = {k: str(v) for k, v in files.items()}
    named.update(malformed=str(files[f"{stage}_malformed"]), missing=str(files[f"{stage}_missing"]))
    overrides = [o.format(**named) for o in overrides]
    out = tmp_path / "out"
    if case == "output dir not writable":
        out = files["blocker"] / "run"
    line = _fails_before_training(capsys, _argv(stage, files, tmp_path / "out", *overrides), out)
    assert re.search(message, line), line


# --------------------------------------------------------------------------- checkpoints
def _cfg(stage: str, files: dict[str, Path], out: Path, *overrides: str) -> SFTConfig | RMConfig | DPOConfig:
    return load_config(STAGES[stage][0], None, _argv(stage, files, out, *overrides)[1:])


@pytest.mark.parametrize("stage", STAGES)
def test_resume_from_another_model_shape_fails_before_training(capsys, tmp_path, files, stage) -> None:
    """A checkpoint of a one-layer model, resumed by a two-layer run: refused, naming both shapes."""
    small = ["model.tiny.num_layers=1"] if stage == "sft" else [f"model.path={files['policy_1l']}"]
    STAGES[stage][1](_cfg(stage, files, tmp_path / "one_layer", *small, "total_steps=1", "save_every=1"))
    ckpt = tmp_path / "one_layer" / "checkpoints" / "step_000001"
    assert verify_checkpoint(ckpt) is None

    out = tmp_path / "two_layers"
    line = _fails_before_training(capsys, _argv(stage, files, out, f"resume={ckpt}"), out)
    assert f"resume: checkpoint {ckpt} was written for a model with {stage}: " in line
    assert "layers.1.self_attn.q_proj.weight: only in this run" in line
    # The other stage's checkpoint is refused too: it holds another role.
    other = "rm" if stage == "sft" else "sft"
    line = _fails_before_training(capsys, _argv(other, files, out, f"resume={ckpt}"), out)
    assert f"has no '{other}' model (it has ['{stage}'])" in line


def _poison(monkeypatch, stage: str) -> None:
    """Make every loss NaN: SFT's token NLL sum, RM's Bradley-Terry loss, DPO's per-pair losses."""
    import tritonrlhf.engine.stages.dpo as dpo_mod
    import tritonrlhf.engine.stages.rm as rm_mod
    import tritonrlhf.engine.stages.sft as sft_mod

    mod, name = {
        "sft": (sft_mod, "sft_loss_sum"),
        "rm": (rm_mod, "bradley_terry_loss"),
        "dpo": (dpo_mod, "dpo_loss"),
    }[stage]
    real = getattr(mod, name)

    def poisoned(*args, **kwargs):
        loss, *rest = real(*args, **kwargs)
        return (loss * float("nan"), *rest)

    monkeypatch.setattr(mod, name, poisoned)


@pytest.mark.parametrize("stage", STAGES)
def test_consecutive_nonfinite_updates_stop_the_run(monkeypatch, tmp_path, files, stage) -> None:
    """Every update non-finite: each is skipped and logged; after 3 in a row a checkpoint, then the error."""
    _poison(monkeypatch, stage)
    out = tmp_path / "run"
    cfg = _cfg(stage, files, out, "total_steps=10", "max_consecutive_skips=3", "train.log_every=1")
    with pytest.raises(NonFiniteError) as err:
        STAGES[stage][1](cfg)
    ckpt = out / "checkpoints" / "step_000003"
    assert str(err.value) == (
        "step 3: 3 updates in a row were skipped for a non-finite loss or gradient "
        f"(max_consecutive_skips=3); checkpoint saved to {ckpt}. "
        "Lower the learning rate or fix the data, then resume."
    )
    assert verify_checkpoint(ckpt) is None
    state = torch.load(ckpt / "rank_0.pt", weights_only=False)["state"]
    assert state["counters"] == {"steps": 3, "skipped": 3, "consecutive_skips": 3}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"], r["grad_norm"]) for r in rows] == [(s, 1.0, None) for s in (1, 2, 3)]
    assert not (out / "summary.json").exists()
    if stage == "sft":  # no update was applied: the checkpoint holds the initial weights
        from safetensors.torch import load_file

        init = build_tiny_model(build_tokenizer(), TinyModelConfig(), seed=0).state_dict()
        saved = load_file(ckpt / "hf" / "model.safetensors")
        assert saved and all(torch.equal(saved[k], init[k]) for k in saved)
