"""SFT stage: response-only labels, packing, bad data, a short real run, a 2-rank DeepSpeed run, kill -9 and resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.engine._scripts.launch import deepspeed_cmd, free_port, run
from tests.engine._scripts.stage_launch import kill_and_resume, max_weight_diff, metric_diffs, metrics
from tritonrlhf.engine.config import ConfigError, TinyModelConfig, load_config
from tritonrlhf.engine.data import DataError
from tritonrlhf.engine.demo.task import make_sft_data, write_jsonl
from tritonrlhf.engine.models import build_tiny_model, build_tiny_reward_model, build_tokenizer
from tritonrlhf.engine.stages.sft import (
    IGNORE,
    SFTConfig,
    SFTDataConfig,
    load_sft_examples,
    pack_examples,
    packed_collate,
    run_sft,
    sft_collate,
    sft_loss_sum,
)

TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _data(tmp_path: Path, records: list, name: str = "d.jsonl") -> SFTDataConfig:
    return SFTDataConfig(train=str(write_jsonl(records, tmp_path / name)), eval_size=0)


def test_labels_mask_prompt_and_pad(tmp_path, tok) -> None:
    cfg = _data(
        tmp_path, [{"prompt": "copy 123:", "response": "123"}, {"prompt": "sort 31:", "response": "13"}]
    )
    examples, _ = load_sft_examples(cfg, tok)
    b = sft_collate(examples, tok.pad_token_id)
    # row 0: <bos> + 9 prompt chars, then "123" + <eos>
    assert b.labels[0, :10].eq(IGNORE).all()
    assert b.labels[0, 10:14].tolist() == tok("123", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    # row 1 is shorter: its pad tail is -100 and masked out of attention
    n1 = len(examples[1].input_ids)
    assert b.labels[1, n1:].eq(IGNORE).all() and b.attention_mask[1, n1:].eq(0).all()
    assert b.num_loss_tokens == 4 + 3


def test_prompt_positions_carry_no_loss(tmp_path, tok) -> None:
    """Changing what the model predicts at prompt positions leaves the loss unchanged; at response positions it does not."""
    cfg = _data(tmp_path, [{"prompt": "reverse 3815:", "response": "5183"}])
    b = sft_collate(load_sft_examples(cfg, tok)[0], tok.pad_token_id)
    P = int((b.labels[0] == IGNORE).sum())  # bos + prompt
    model = build_tiny_model(tok, TINY, seed=0)
    logits = model(input_ids=b.input_ids).logits.detach().requires_grad_(True)
    loss, _, n = sft_loss_sum(logits, b.labels)
    loss.backward()
    # logits at t predict token t+1: positions 0..P-2 predict prompt tokens, P-1.. the response
    assert logits.grad[0, : P - 1].abs().max() == 0
    assert logits.grad[0, P - 1 : P - 1 + n].abs().sum(-1).gt(0).all()
    noisy = logits.detach().clone()
    noisy[0, : P - 1] += 5 * torch.randn_like(noisy[0, : P - 1])
    assert torch.equal(sft_loss_sum(noisy, b.labels)[0], loss.detach())


def test_chat_messages_train_on_assistant_turns_only(tmp_path, tok) -> None:
    msgs = [{"role": "user", "content": "copy 12:"}, {"role": "assistant", "content": "12"}]
    examples, _ = load_sft_examples(_data(tmp_path, [{"messages": msgs}]), tok)
    ex = examples[0]
    trained = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert trained == tok("12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids[0] == tok.bos_token_id


def test_packing_equals_unpacked(tmp_path, tok) -> None:
    """Packed rows give the same summed loss as one example per row: no attention across examples."""
    cfg = _data(tmp_path, make_sft_data(9, seed=1))
    examples, _ = load_sft_examples(cfg, tok)
    model = build_tiny_model(tok, TINY, seed=0)
    bins = pack_examples(examples, max_len=48)
    assert len(bins) < len(examples) and sorted(i for b in bins for i in b) == list(range(9))
    packed = packed_collate([[examples[i] for i in b] for b in bins], tok.pad_token_id, 48)
    assert packed.input_ids.shape == (len(bins), 48)
    with torch.no_grad():
        s_packed, _, n_packed = sft_loss_sum(
            model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits,
            packed.labels,
        )
        plain = sft_collate(examples, tok.pad_token_id)
        s_plain, _, n_plain = sft_loss_sum(
            model(input_ids=plain.input_ids, attention_mask=plain.attention_mask).logits, plain.labels
        )
    assert n_packed == n_plain
    torch.testing.assert_close(s_packed, s_plain, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "copy 1:", "response": "1"', "d.jsonl:2: malformed JSON"),
        ('{"prompt": "copy 1:"}', "d.jsonl:2: missing column 'response'"),
        ('{"prompt": "copy 1:", "response": "  "}', "d.jsonl:2: column 'response' must be a non-empty"),
        ('{"prompt": "", "response": "1"}', "d.jsonl:2: column 'prompt' must be a non-empty"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, tok, line, message) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "copy 2:", "response": "2"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_sft_examples(SFTDataConfig(train=str(path)), tok)


def test_bad_chat_records(tmp_path, tok) -> None:
    with pytest.raises(DataError, match="d.jsonl:1: 'messages' has no assistant turn"):
        load_sft_examples(_data(tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}]), tok)
    with pytest.raises(DataError, match=r"messages\[1\] \(assistant\) has empty content"):
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
        load_sft_examples(_data(tmp_path, [{"messages": msgs}]), tok)


def test_long_prompts_truncated_or_dropped_and_counted(tmp_path, tok) -> None:
    recs = [{"prompt": "copy 1234567890123456789:", "response": "1"}, {"prompt": "copy 1:", "response": "1"}]
    cfg = _data(tmp_path, recs)
    cfg.max_prompt_len, cfg.max_len = 12, 16
    examples, stats = load_sft_examples(cfg, tok)
    assert stats.prompts_truncated == 1 and len(examples) == 2
    assert examples[0].input_ids[0] == tok.bos_token_id and examples[0].loss_mask.index(1) == 12
    cfg.on_long_prompt = "drop"
    examples, stats = load_sft_examples(cfg, tok)
    assert stats.prompts_dropped == 1 and len(examples) == 1


def _tiny_cfg(tmp_path: Path, data: str, *extra: str) -> SFTConfig:
    return load_config(
        SFTConfig,
        overrides=[
            f"output_dir={tmp_path / 'sft'}",
            f"data.train={data}",
            "data.eval_size=32",
            "total_steps=30",
            "train.batch_size=16",
            "train.micro_batch_size=8",
            "train.log_every=5",
            "optim.lr=3e-3",
            "optim.warmup_steps=0",
            *extra,
        ],
    )


def test_sft_run_loss_falls_and_checkpoint_loads(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(make_sft_data(300, seed=0), tmp_path / "sft.jsonl")
    out = run_sft(_tiny_cfg(tmp_path, str(data), "data.packing=true"))
    assert out["train/loss_last"] < 0.75 * out["train/loss_first"], out
    assert out["eval/loss"] < out["train/loss_first"]
    d = tmp_path / "sft"
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30 and (d / "config.yaml").is_file()
    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == 64
    ids = tok("copy 12:", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_sft_refuses_a_reward_checkpoint(tmp_path, tok) -> None:
    rm_dir = tmp_path / "rm"
    build_tiny_reward_model(tok, TINY, seed=0).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    data = write_jsonl(make_sft_data(10, seed=0), tmp_path / "sft.jsonl")
    with pytest.raises(ConfigError, match="sequence-classification checkpoint"):
        run_sft(_tiny_cfg(tmp_path, str(data), f"model.path={rm_dir}"))


# --------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [3])
def test_sft_two_ranks_deepspeed(tmp_path, zero_stage) -> None:
    """``deepspeed --num_gpus 2 --module tritonrlhf.engine.cli sft``: ZeRO-3, loss falls, one checkpoint that transformers loads."""
    from transformers import AutoModelForCausalLM

    data = write_jsonl(make_sft_data(300, seed=0), tmp_path / "sft.jsonl")
    out_dir = tmp_path / "sft"
    port = free_port()
    cmd = deepspeed_cmd(
        2,
        port,
        "--module",
        "tritonrlhf.engine.cli",
        "sft",
        f"output_dir={out_dir}",
        f"data.train={data}",
        "data.eval_size=32",
        "total_steps=20",
        "train.batch_size=16",
        "train.micro_batch_size=8",
        "train.log_every=5",
        "optim.warmup_steps=0",
        f"optim.zero_stage={zero_stage}",
    )
    proc = run(cmd, timeout_s=420, port=port, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout[-6000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["train/loss_last"] < summary["train/loss_first"]
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_sft_kill9_and_sigterm_then_resume_match_uninterrupted(tmp_path) -> None:
    """SIGKILL inside step 5, resume; SIGTERM inside step 7, resume: every step equals an uninterrupted run's.

    40 training rows and 16 per step: step 3 crosses into epoch 1, so the run resumes from
    step 4's checkpoint in the middle of epoch 1 (and crosses into epoch 2 in step 5).
    """
    data = write_jsonl(make_sft_data(48, seed=0), tmp_path / "sft.jsonl")
    args = [
        f"data.train={data}",
        "data.eval_size=8",
        "train.batch_size=16",
        "train.micro_batch_size=8",  # 2 micro-batches per step: gradient accumulation resumes too
        "train.log_every=1",
        "train.eval_every=3",
        "optim.warmup_steps=6",  # the LR schedule is mid-warmup at the kill
    ]
    runs = kill_and_resume("sft", tmp_path, args, total_steps=10, kill_in=5, term_in=7)
    ckpts = runs.b / "checkpoints"
    assert runs.rc == {"b1": -signal.SIGKILL, "b2": 0, "b3": 0, "a": 0}, runs.output
    # Killed inside step 5: step 5 was neither logged nor saved.
    assert runs.logged_when_killed == [1, 2, 3, 4]
    assert runs.checkpoints_when_killed == ["step_000003", "step_000004"]
    sampler = runs.state_when_killed["sampler"]
    assert (sampler["epoch"], sampler["position"], runs.state_when_killed["loop"]["step"]) == (1, 24, 4)
    assert f"[sft] resumed from {ckpts / 'step_000004'} at step 4" in runs.output["b2"]
    assert (
        f"Stopped on SIGTERM after step 7; checkpoint saved to {ckpts / 'step_000007'}" in runs.output["b2"]
    )
    assert f"[sft] resumed from {ckpts / 'step_000007'} at step 7" in runs.output["b3"]

    ma, mb = metrics(runs.a), metrics(runs.b)
    assert sorted(ma) == sorted(mb) == list(range(1, 11))
    keys = ("train/loss", "train/token_accuracy", "grad_norm", "lr", "eval/loss", "eval/token_accuracy")
    diffs = metric_diffs(ma, mb, keys)
    assert not diffs, f"(step, key): (uninterrupted, resumed): {diffs}"
    assert "eval/loss" in mb[9] and mb[10]["train/loss"] < mb[1]["train/loss"]
    assert max_weight_diff(runs.a, runs.b) <= 1e-6
    # keep_last=2; the last checkpoint's HF export is the final model, usable as is.
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000009", "step_000010"]
    assert max_weight_diff(ckpts / "step_000010" / "hf", runs.b) == 0
    assert json.loads((runs.b / "summary.json").read_text())["train/loss_first"] == ma[1]["train/loss"]
