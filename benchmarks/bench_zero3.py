"""Benchmark PPO under ZeRO-3 on 2 ranks in bf16: peak memory per rank and step time.

Usage::

    python benchmarks/bench_zero3.py --size 250m --steps 3      # ~250M parameters (the 24 GiB VM's run)
    python benchmarks/bench_zero3.py --size tiny --steps 2      # seconds of compute (the test)

Builds a random Qwen2-shaped causal LM -- Qwen2-0.5B's widths (hidden 896, 14 query and 2
key/value heads of 64, MLP 4864), as many layers as ``--size`` asks for, the offline toy
tokenizer's 64-token vocabulary (so the parameters are the layers', not the embedding's) -- saves
it in bf16 with the tokenizer, and runs ``tritonrlhf.engine.cli ppo`` on ``configs/ppo_tiny.yaml`` under
``deepspeed --num_gpus 2`` with ``model.path`` pointing at it, ``model.dtype=bf16`` and ZeRO-3 for
actor and critic (bf16 weights, fp32 master weights and Adam state, partitioned over the 2 ranks),
a frozen bf16 reference, the toy reward function, and each rank's in-process vLLM engine (bf16)
generating a few short responses.

Memory: each rank writes its RSS high-water mark (``VmHWM``) when the run ends; the parent also
samples the whole process tree's RSS every 0.2 s (``tree_rss_peak_mb``: the run's total peak,
launcher included). Step time is the mean over the steps after ``--warmup``. A row is appended to
``benchmarks/results/zero3.csv`` with the device, versions and git SHA; ``--note`` goes into its
note column (say what else was running: step times on a shared 2-core machine are inflated,
memory figures are not).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import append_rows, device_name, git_sha, package_version  # noqa: E402
from benchmarks.bench_ppo import summarize  # noqa: E402

COLUMNS = [
    "timestamp", "git_sha", "device", "torch", "vllm", "deepspeed", "size", "model_params", "layers",
    "hidden", "ranks", "zero_stage", "dtype", "actor_dtypes", "rollout_batch", "max_new_tokens",
    "steps", "warmup", "step_s", "generate_s", "score_s", "train_s", "sync_s", "rank_hwm_mb",
    "rank_hwm_max_mb", "tree_rss_peak_mb", "wall_s", "note",
]  # fmt: skip
# Qwen2-0.5B's widths; the layer count sets the size (14.9M parameters per layer).
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2)
RANKS = 2
# Few prompts, short responses: 4 samples per step (2 per rank), 8 new tokens.
RUN_OVERRIDES = [
    "model.dtype=bf16",
    "actor.zero_stage=3",
    "critic.zero_stage=3",
    "actor.lr=1e-5",
    "critic.lr=1e-5",
    "ppo.rollout_batch_size=4",
    "ppo.mini_batch_size=4",
    "ppo.micro_batch_size=2",
    "rollout.max_new_tokens=8",
    "rollout.kv_cache_gib=1",
    "data.num_prompts=64",
    "placement.bucket_mb=128",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
]
SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"


def qwen2_config(size: str):
    """``tiny`` or ``<N>m``: a Qwen2Config with the toy tokenizer's vocabulary and ids."""
    from transformers import Qwen2Config

    from tritonrlhf.engine.models import build_tokenizer

    tok = build_tokenizer()
    if size == "tiny":
        widths, layers = TINY, 2
    else:
        m = re.fullmatch(r"(\d+)m", size)
        if not m:
            raise SystemExit(f"--size must be tiny or <millions>m (e.g. 250m), got {size!r}")
        w = QWEN2_05B
        h, kv = w["hidden_size"], w["num_key_value_heads"] * w["hidden_size"] // w["num_attention_heads"]
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * w["intermediate_size"]
        widths, layers = w, max(1, round(int(m.group(1)) * 1e6 / per_layer))
    return Qwen2Config(
        vocab_size=64,
        num_hidden_layers=layers,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **widths,
    ), tok


def build_checkpoint(size: str, out: Path, seed: int = 0) -> tuple[int, object]:
    """Save the random model (bf16) and the toy tokenizer to ``out``; returns (parameters, config)."""
    from transformers import Qwen2ForCausalLM

    config, tok = qwen2_config(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = Qwen2ForCausalLM(config)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        for name, p in model.named_parameters():  # HF's init is slow on big models; this is enough here
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif p.dim() == 1:
                    p.zero_()
                else:
                    p.normal_(0.0, config.initializer_range)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters()), config


class _TreeRSS(threading.Thread):
    """Samples the summed RSS of ``pid`` and its descendants; ``peak_mb`` is the maximum seen."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak_mb, self.done = pid, every_s, 0.0, threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_mb = max(self.peak_mb, total / 2**20)
            except psutil.Error:
                pass
            self.done.wait(self.every_s)


def run(size: str, steps: int, warmup: int, work: Path, timeout_s: float) -> dict:
    """Build the checkpoint, launch 2 ranks, return the measurements."""
    model_dir = work / "model"
    params, config = build_checkpoint(size, model_dir)
    out = work / "run"
    port = _free_port()
    launcher = str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", str(RANKS), "--master_port", str(port), __file__, "--child", str(work)]
    cmd += ["ppo", "--config", str(ROOT / "configs" / "ppo_tiny.yaml"), f"output_dir={out}"]
    cmd += [f"model.path={model_dir}", f"total_steps={steps}", *RUN_OVERRIDES]
    env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_PORT=str(port), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    t0 = time.perf_counter()
    log = work / "run.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler = _TreeRSS(proc.pid)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = proc.wait()
        finally:
            sampler.done.set()
            sampler.join()
            for b in glob.glob(SHM_BUFFERS.format(port=port)):
                Path(b).unlink(missing_ok=True)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"zero-3 run failed ({rc}):\n{log.read_text()[-4000:]}")
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(RANKS)]
    return {
        "params": params,
        "config": config,
        "stats": summarize(out, warmup),
        "ranks": ranks,
        "tree_rss_peak_mb": sampler.peak_mb,
        "wall_s": wall,
        "run_config": (out / "config.yaml").read_text(),
    }


def row_of(args: argparse.Namespace, res: dict) -> dict:
    s, cfg = res["stats"], res["config"]
    hwm = [r["vm_hwm_mb"] for r in res["ranks"]]
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "vllm": package_version("vllm"),
        "deepspeed": package_version("deepspeed"),
        "size": args.size,
        "model_params": res["params"],
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "ranks": RANKS,
        "zero_stage": 3,
        "dtype": "bf16",
        "actor_dtypes": "params {params} / master {master} / adam {optim_state}".format(
            **{k: "+".join(v) for k, v in res["ranks"][0]["actor_precision"].items()}
        ),
        "rollout_batch": 4,
        "max_new_tokens": 8,
        "steps": args.steps,
        "warmup": args.warmup,
        **{k: f"{s[k]:.3g}" for k in ("step_s", "generate_s", "score_s", "train_s", "sync_s")},
        "rank_hwm_mb": ";".join(f"{h:.0f}" for h in hwm),
        "rank_hwm_max_mb": f"{max(hwm):.0f}",
        "tree_rss_peak_mb": f"{res['tree_rss_peak_mb']:.0f}",
        "wall_s": f"{res['wall_s']:.0f}",
        "note": args.note,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(work: Path, argv: list[str]) -> int:
    """One rank: the real CLI, then this process's RSS high-water mark and the actor's dtypes."""
    import tritonrlhf.engine.rl.trainer as trainer_mod
    from tritonrlhf.engine import cli

    seen: dict = {}

    class Trainer(trainer_mod.PPOTrainer):
        def fit(self):
            summary = super().fit()
            seen["actor_precision"] = self.actor.train.precision()  # after the steps: Adam state exists
            return summary

    trainer_mod.PPOTrainer = Trainer  # run_ppo looks the class up at call time
    rc = cli.main(argv)
    status = Path("/proc/self/status").read_text()
    hwm_kb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    (work / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"vm_hwm_mb": hwm_kb / 1024, **seen}))
    return rc


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]  # the launcher's
    if argv[:1] == ["--child"]:
        sys.exit(child(Path(argv[1]), argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="250m", help="tiny, or millions of parameters: 250m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="leading steps left out of the step time")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zero3.csv"))
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--note", default="", help="the CSV's note column (e.g. other load on the machine)")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    with tempfile.TemporaryDirectory(prefix="bench_zero3_") as tmp:
        res = run(args.size, args.steps, args.warmup, Path(tmp), args.timeout)
    row = row_of(args, res)
    append_rows(Path(args.out), [row], COLUMNS)
    print(
        f"{row['device']} | ZeRO-3 x {RANKS} ranks, bf16, {row['model_params']} params "
        f"({row['layers']} layers x {row['hidden']}); actor {row['actor_dtypes']}\n"
        f"  step {row['step_s']}s (generate {row['generate_s']}, score {row['score_s']}, "
        f"train {row['train_s']}, sync {row['sync_s']}) over {args.steps - args.warmup} steps\n"
        f"  peak RSS per rank {row['rank_hwm_mb']} MB; process tree peak {row['tree_rss_peak_mb']} MB; "
        f"wall {row['wall_s']}s\nappended to {args.out}"
    )
    return row


if __name__ == "__main__":
    main()
