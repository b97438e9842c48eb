"""The engine on one GPU: PPO and GRPO at Qwen2-0.5B's shape, and the decode loop with and without
a CUDA graph; the engine part of ``scripts/gpu_check.sh``.

Usage::

    python benchmarks/bench_engine_gpu.py --runs decode,ppo,grpo,ppo-reference,grpo-reference
    python benchmarks/bench_engine_gpu.py --dry-run            # the same on CPU at tiny shapes

The model is a random Qwen2 of Qwen2-0.5B's shape, built from its config (no download): hidden
896, 24 layers, 14 heads, 2 key/value heads, intermediate 4864, vocabulary 151936, tied
embeddings, saved in bf16 with the toy tokenizer (``build_tokenizer(merges=676, family="qwen2")``,
740 tokens) under ``--work``. The embedding keeps Qwen2's 151936 rows -- the LM head's matmul and
the log-prob kernels' vocabulary are what the benchmark measures -- and the engine accepts a
tokenizer smaller than the embedding (a padded vocabulary, ``check_tokenizer_matches``); ids at or
past the tokenizer's size, which the random model samples freely, decode to no text, so rewards
stay near 0 and nearly every response runs to ``--new-tokens`` (the full-length batch we want).

Each engine run is one process (``python -m tritonrlhf.engine.cli``, MASTER_ADDR/MASTER_PORT set:
a world of one), colocated, with the HF rollout backend (the static-KV-cache loop, its decode
step a CUDA graph: ``rollout.cuda_graph=auto``), bf16 (``model.dtype=auto``), DeepSpeed ZeRO-2 on
NCCL, ``--prompts`` x ``--samples`` samples of ``--new-tokens`` per step for ``--steps`` steps,
the first ``--warmup`` left out of the means. ``ppo`` trains actor and critic with GAE; ``grpo``
the actor with group advantages and the k3 KL in the loss. ``*-reference`` is the same run with
``TRITONRLHF_KERNELS=reference`` (every kernel op on its PyTorch reference): the kernels'
in-engine speed-up is the ratio of the two rows' step times. ``decode`` times the static loop in
this process on the same batch: the eager loop against the CUDA-graph step (tokens/s).

Per run a row goes to ``--out`` (default ``benchmarks/results/engine_gpu.csv``) with the device,
versions and git SHA: samples/s, response tokens/s, the mean seconds of each phase (``time/*``),
the peak GPU memory of each phase's roles (``memory/*``), the training passes' TFLOP/s and MFU
against ``--peak-tflops`` (default: 989, the H100/H200 SXM bf16 dense peak), counted as 6 x the
matmul weights x the batch's real tokens per trained model and epoch (attention's own FLOPs left
out: under 10% at these lengths), and the largest ``rollout/logprob_gap`` (rollout vs trainer
log-probs of the same tokens: bf16 rounding on GPU).

``--dry-run`` runs everything on CPU at tiny shapes (gloo, fp32, the eager decode; the ``decode``
row compares the loop with the eager fixed-shape step) into a temporary CSV, so the script is
tested by the suite (tests/benchmarks/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import append_rows, fmt, package_version, run_env  # noqa: E402

RUNS = ("decode", "ppo", "grpo", "ppo-reference", "grpo-reference")
COLUMNS = [
    "timestamp", "git_sha", "device", "python", "torch", "triton", "transformers", "deepspeed", "run",
    "kernels", "decode_step", "model", "model_params", "prompts", "samples_per_prompt",
    "max_new_tokens", "steps", "warmup", "samples_per_s", "tokens_per_s", "generate_s", "score_s",
    "train_s", "sync_s", "step_s", "train_tflops", "mfu_train_pct", "generate_peak_gib",
    "score_peak_gib", "train_peak_gib", "logprob_gap_max", "decode_tokens_per_s", "wall_s", "note",
]  # fmt: skip
PHASES = {
    f"{p}_s": f"time/{'rollout' if p == 'generate' else p}_s"
    for p in ("generate", "score", "train", "sync", "step")
}
# Qwen2-0.5B's shape (its config.json), and the dry run's tiny stand-in (head size 32, GQA, tied).
QWEN2_05B = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
TINY = dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=1024)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense


def build_model(work: Path, shape: dict, dtype: torch.dtype) -> Path:
    """A random Qwen2 of ``shape`` with the toy tokenizer saved under ``work`` (reused when there)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tritonrlhf.engine.models import build_tokenizer

    path = work / f"qwen2_{shape['hidden']}x{shape['layers']}_v{shape['vocab']}_{str(dtype)[6:]}"
    if (path / "config.json").exists():
        return path
    tok = build_tokenizer(merges=676, family="qwen2")
    assert len(tok) <= shape["vocab"], (len(tok), shape)
    config = Qwen2Config(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(path)
    return path


def matmul_params(shape: dict, head: bool) -> int:
    """Weights a token multiplies through: every layer's projections, plus the LM head (``head``;
    a critic's value head is 1 column)."""
    h, hd = shape["hidden"], shape["hidden"] // shape["heads"]
    attn = h * shape["heads"] * hd * 2 + h * shape["kv_heads"] * hd * 2
    per_layer = attn + 3 * h * shape["intermediate"]
    return shape["layers"] * per_layer + (h * shape["vocab"] if head else h)


def engine_overrides(args: argparse.Namespace, model: Path, run: str, out_dir: Path) -> list[str]:
    algo = run.split("-")[0]
    batch = args.prompts * args.samples
    o = [
        f"model.path={model}",
        f"output_dir={out_dir}",
        f"total_steps={args.steps}",
        "resume=never",
        "save_every=0",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.samples_every=0",
        "rollout.backend=hf",
        "rollout.hf_decode=static",
        "rollout.cuda_graph=auto",
        f"rollout.max_new_tokens={args.new_tokens}",
        "rollout.sleep_during_train=false",
        f"ppo.rollout_batch_size={args.prompts}",
        f"ppo.samples_per_prompt={args.samples}",
        f"ppo.mini_batch_size={min(batch, args.mini_batch)}",
        f"ppo.micro_batch_size={min(batch, args.micro_batch)}",
        "actor.zero_stage=2",
        "actor.lr=1e-6",
        f"data.num_prompts={max(256, 4 * args.prompts)}",
    ]
    if algo == "ppo":
        o += ["critic.zero_stage=2", "critic.lr=1e-6"]
    return o


def run_engine(args: argparse.Namespace, model: Path, run: str, out_dir: Path) -> tuple[float, str]:
    """One engine run in its own process: (wall seconds, its output); raises with the output tail."""
    algo, kernels = run.split("-")[0], ("reference" if run.endswith("-reference") else "auto")
    config = ROOT / "configs" / f"{algo}_tiny.yaml"
    cmd = [sys.executable, "-m", "tritonrlhf.engine.cli", "ppo", "--config", str(config)]  # grpo: its config
    cmd += engine_overrides(args, model, run, out_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), TRITONRLHF_KERNELS=kernels)
    env.pop("TRITON_INTERPRET", None)  # CPU runs the references; CUDA the kernels (or not)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (out_dir / "run.log").write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(f"{run} failed ({proc.returncode}):\n{log[-4000:]}")
    for line in log.splitlines():
        if "decode step runs" in line or "decodes with" in line:
            print(f"  {line.strip()}")
    return time.perf_counter() - t0, log


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(out_dir: Path, warmup: int) -> dict[str, float]:
    """Means over the steps after ``warmup`` from the run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    timed = rows[warmup:] or rows
    mean = lambda key: statistics.fmean(r.get(key, float("nan")) for r in timed)  # noqa: E731
    stats = {col: mean(key) for col, key in PHASES.items()}
    stats["samples_per_s"] = mean("throughput/samples_per_s")
    stats["tokens_per_s"] = mean("throughput/tokens_per_s")
    stats["tokens"] = mean("rollout/tokens")
    stats["logprob_gap_max"] = max(r.get("rollout/logprob_gap", float("nan")) for r in rows)
    for phase in ("generate", "score", "train"):
        key = f"memory/{phase}_peak_gib"
        stats[f"{phase}_peak_gib"] = max((r[key] for r in rows if key in r), default=None)
    return stats


def peak_tflops(device: str, given: float | None) -> float | None:
    if given is not None:
        return given
    return next((v for k, v in PEAK_TFLOPS.items() if k in device), None)


def engine_row(args, env, model: Path, shape: dict, run: str, peak: float | None) -> dict:
    out_dir = Path(tempfile.mkdtemp(prefix=f"engine_{run}_", dir=args.work))
    wall, log = run_engine(args, model, run, out_dir)
    s = summarize(out_dir, args.warmup)
    algo = run.split("-")[0]
    trained = matmul_params(shape, head=True) + (matmul_params(shape, head=False) if algo == "ppo" else 0)
    tflops = 6 * trained * s["tokens"] / s["train_s"] / 1e12  # one epoch (ppo_epochs=1)
    row = {
        **env,
        "run": algo,
        "kernels": "reference"
        if run.endswith("-reference")
        else ("triton" if args.device == "cuda" else "auto"),
        "decode_step": "graph" if "decode step runs as a CUDA graph" in log else "loop",
        "steps": args.steps,
        "warmup": args.warmup,
        "train_tflops": fmt(tflops),
        "mfu_train_pct": fmt(100 * tflops / peak) if peak and args.device == "cuda" else "",
        "wall_s": fmt(wall),
        "note": ""
        if args.device == "cuda"
        else "dry run on CPU (fp32, gloo, eager decode): not a measurement",
    }
    row |= {k: fmt(s[k]) for k in (*PHASES, "samples_per_s", "tokens_per_s", "logprob_gap_max")}
    row |= {f"{p}_peak_gib": fmt(s[f"{p}_peak_gib"]) for p in ("generate", "score", "train")}
    print(
        f"{run}: {s['samples_per_s']:.3g} samples/s, {s['tokens_per_s']:.4g} tokens/s, step {s['step_s']:.3g} s "
        f"(generate {s['generate_s']:.3g}, score {s['score_s']:.3g}, train {s['train_s']:.3g}, "
        f"sync {s['sync_s']:.3g}); train {tflops:.3g} TFLOP/s"
        + (f" = {row['mfu_train_pct']}% MFU" if row["mfu_train_pct"] else "")
        + f"; peak GiB generate/score/train {row['generate_peak_gib'] or '-'}/{row['score_peak_gib'] or '-'}"
        f"/{row['train_peak_gib'] or '-'}; logprob_gap {s['logprob_gap_max']:.3g}; wall {wall:.0f} s",
        flush=True,
    )
    return row


def decode_rows(args, env, model_dir: Path) -> list[dict]:
    """The static loop on ``--prompts x --samples`` rows of 32-token prompts, ``--new-tokens`` each
    (no stop token: every row runs to the end): eager loop, then the CUDA-graph step (CPU: the
    eager fixed-shape step); tokens/s of the second of two calls."""
    from transformers import AutoModelForCausalLM

    from tritonrlhf.engine.rl.static_decode import StaticDecoder

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    dec = StaticDecoder(model)
    batch = args.prompts * args.samples
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, 32), generator=torch.Generator().manual_seed(0)).to(args.device)
    mask = torch.ones_like(ids)

    def choose(logits, rows, t, tokens):
        lp = logits.log_softmax(-1)
        tok = torch.multinomial(lp.exp(), 1)[:, 0]
        return tok, lp.gather(-1, tok[:, None])[:, 0]

    rows = []
    for step in ("loop", "graph" if args.device == "cuda" else "fixed"):
        times = []
        for _ in range(2):
            _sync(args.device)
            t0 = time.perf_counter()
            tokens, _ = dec.generate(ids, mask, args.new_tokens, choose, [], 0, step=step)
            _sync(args.device)
            times.append(time.perf_counter() - t0)
        rate = tokens.numel() / times[-1]
        print(
            f"decode ({step}): {rate:.4g} tokens/s ({batch} rows x {tokens.shape[1]} tokens, {times[-1]:.3g} s)"
        )
        rows.append(
            {**env, "run": "decode", "decode_step": step, "kernels": "", "steps": 1, "warmup": 1,
             "decode_tokens_per_s": fmt(rate), "wall_s": fmt(sum(times)),
             "note": "" if args.device == "cuda" else "dry run on CPU: not a measurement"}
        )  # fmt: skip
    if len(rows) == 2:
        speedup = float(rows[1]["decode_tokens_per_s"]) / float(rows[0]["decode_tokens_per_s"])
        print(f"decode: {rows[1]['decode_step']} / loop = {speedup:.3g}x")
    return rows


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a temporary CSV")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tritonrlhf_engine_gpu")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default 64; dry run 4)")
    p.add_argument("--samples", type=int, default=None, help="samples per prompt (default 4; dry run 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128; dry run 8")
    p.add_argument("--steps", type=int, default=None, help="default 10; dry run 3")
    p.add_argument("--warmup", type=int, default=None, help="default 2; dry run 1")
    p.add_argument("--mini-batch", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 dense peak")
    args = p.parse_args(argv)
    dry = args.dry_run
    for key, full, tiny in (
        ("prompts", 64, 4),
        ("samples", 4, 2),
        ("new_tokens", 128, 8),
        ("steps", 10, 3),
        ("warmup", 2, 1),
    ):
        if getattr(args, key) is None:
            setattr(args, key, tiny if dry else full)
    runs = [r for r in args.runs.split(",") if r]
    if bad := [r for r in runs if r not in RUNS]:
        p.error(f"unknown run(s) {bad}; choose from {', '.join(RUNS)}")
    if dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not dry:
        p.error("no CUDA device: use --dry-run on a machine without one")
    out = args.out or (
        Path(tempfile.mkdtemp()) / "engine_gpu.csv" if dry else ROOT / "benchmarks/results/engine_gpu.csv"
    )
    args.work.mkdir(parents=True, exist_ok=True)
    shape = TINY if dry else QWEN2_05B
    t0 = time.perf_counter()
    model = build_model(args.work, shape, torch.float32 if dry else torch.bfloat16)
    print(f"model: random Qwen2 {shape} at {model} ({time.perf_counter() - t0:.0f} s)", flush=True)
    env = run_env(torch.device(args.device))
    env |= {"transformers": package_version("transformers"), "deepspeed": package_version("deepspeed")}
    env |= {
        "model": "qwen2-0.5b-shape" if not dry else "qwen2-tiny",
        "model_params": matmul_params(shape, True),
    }
    env |= {"prompts": args.prompts, "samples_per_prompt": args.samples, "max_new_tokens": args.new_tokens}
    peak = peak_tflops(env["device"], args.peak_tflops)
    failed = []
    for run in runs:
        try:
            rows = (
                decode_rows(args, env, model)
                if run == "decode"
                else [engine_row(args, env, model, shape, run, peak)]
            )
        except Exception as e:  # noqa: BLE001 -- one run's failure must not lose the others' rows
            print(f"{run}: FAILED: {e}", file=sys.stderr, flush=True)
            failed.append(run)
            continue
        append_rows(out, rows, COLUMNS)
    print(f"rows in {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
