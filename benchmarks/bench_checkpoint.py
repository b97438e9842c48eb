"""Checkpoint save and load time and size, for the tiny model and a ~100M-parameter Llama.

Run: ``python benchmarks/bench_checkpoint.py [--models tiny,100m] [--zero-stage 2] [--repeats 2]``.
One process (a DeepSpeed world of one), fp32, AdamW + WarmupLR, after one training step so
the optimizer moments exist. A save writes the DeepSpeed engine state (fp32 weights and
two Adam moments, plus the module weights: about 16 bytes per parameter in fp32), the per-rank RNG
and extra state, and the HF export (4 bytes per parameter in fp32 safetensors); the
columns split the save time into those parts and the commit (fsync of every file,
COMPLETE, rename). Load restores the engine (weights, optimizer, scheduler) and the RNGs.
Checkpoints go to a temporary folder next to ``--workdir`` (default: the system temp folder)
and are removed afterwards. Rows are appended to ``benchmarks/results/checkpoint.csv``
with the device, versions and git SHA.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import (  # noqa: E402
    append_rows,  # noqa: E402
    device_name,
    git_sha,
)
from tritonrlhf.engine import distributed as D  # noqa: E402
from tritonrlhf.engine.checkpoint import CheckpointManager, hf_exporter  # noqa: E402
from tritonrlhf.engine.models import build_tokenizer  # noqa: E402

# name -> LlamaConfig keywords
MODELS = {
    "tiny": dict(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
    ),
    "100m": dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12
    ),
    "1b": dict(  # 1.06B parameters: needs > 24 GiB (OOM-killed at 24 GB RSS with --dtype bf16 on the 2-core VM)
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=18,
        num_attention_heads=16,
    ),
}
FIELDS = [
    "timestamp", "device", "cpu_threads", "torch", "deepspeed", "transformers", "python", "git_sha",
    "model", "params", "zero_stage", "world_size", "repeat", "save_s", "save_engine_s", "save_hf_s",
    "commit_s", "load_s", "engine_state_mb", "hf_mb", "total_mb", "save_mb_per_s", "load_mb_per_s", "dtype",
]  # fmt: skip


def build(name: str, zero_stage: int, dtype: str = "fp32"):
    """(DeepSpeed engine around a random LlamaForCausalLM of size ``name``, number of parameters)."""
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**MODELS[name], max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().train()
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-4, "warmup_num_steps": 10}},
        "bf16": {"enabled": dtype == "bf16"},  # bf16 weights and grads, fp32 master copy and Adam moments
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    return engine, n


def _mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,100m")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/checkpoint.csv"))
    args = ap.parse_args(argv)
    import deepspeed
    import transformers

    D.ensure_single_process_env()
    env = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(torch.device("cpu")),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_sha": git_sha(),
    }
    tok = build_tokenizer()
    rows = []
    for name in args.models.split(","):
        engine, n = build(name, args.zero_stage, args.dtype)
        work = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.workdir))
        try:
            mgr = CheckpointManager(work, keep_last=1)
            for r in range(args.repeats):
                path = mgr.save(r + 1, {"actor": engine}, {"step": r + 1}, hf_exporter(engine.module, tok))
                t = mgr.last_save_seconds
                t0 = time.perf_counter()
                mgr.load(path, {"actor": engine})
                load_s = time.perf_counter() - t0
                state_mb, hf_mb = _mb(path / "actor"), _mb(path / "hf")
                total = _mb(path)
                row = {
                    **env,
                    "model": name,
                    "params": n,
                    "zero_stage": args.zero_stage,
                    "world_size": 1,
                    "repeat": r,
                    "save_s": round(t["total"], 3),
                    "save_engine_s": round(t["state"], 3),
                    "save_hf_s": round(t["hf_export"], 3),
                    "commit_s": round(t["commit"], 3),
                    "load_s": round(load_s, 3),
                    "engine_state_mb": round(state_mb, 2),
                    "hf_mb": round(hf_mb, 2),
                    "total_mb": round(total, 2),
                    "save_mb_per_s": round(total / t["total"], 1),
                    "load_mb_per_s": round(state_mb / load_s, 1),
                    "dtype": args.dtype,
                }
                rows.append(row)
                print(
                    f"{name:>5} ({n / 1e6:.1f}M params) save {row['save_s']:.2f}s "
                    f"[engine {row['save_engine_s']:.2f} hf {row['save_hf_s']:.2f} commit {row['commit_s']:.2f}] "
                    f"load {row['load_s']:.2f}s  size {total:.1f} MB (engine {state_mb:.1f}, hf {hf_mb:.1f})",
                    flush=True,
                )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        del engine
    out = Path(args.out)
    append_rows(out, rows, FIELDS)
    print(f"appended {len(rows)} rows to {out}")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
