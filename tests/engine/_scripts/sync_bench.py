"""Time one ColocatedWeightSync push into an in-process vLLM engine (1 rank, CPU or GPU).

Run: ``python tests/engine/_scripts/sync_bench.py --size 100m [--bucket_mib 256]``.
Prints one JSON line: parameters, buckets, bytes, seconds per push (median of a few), and the
max |vLLM - HF| log-prob gap after the last push (must be small, or the timing is meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).parent))

SIZES = {  # ~params: tiny 0.46M; 100m: 12 x 768 layers, vocab 8192 -> ~98M
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vocab_size=264),
    "100m": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048, vocab_size=8192),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--bucket_mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from rollout_tiny import build_tiny_llama, build_tokenizer

    from tritonrlhf.engine.config import RolloutConfig
    from tritonrlhf.engine.rl.rollout import VLLMRollout, processed_logprobs
    from tritonrlhf.engine.rl.weight_sync import ColocatedWeightSync

    with tempfile.TemporaryDirectory() as d:
        model = build_tiny_llama(0, **SIZES[args.size])
        model.save_pretrained(d)
        build_tokenizer().save_pretrained(d)
        cfg = RolloutConfig(temperature=0.7, max_new_tokens=8, kv_cache_gib=1)
        rollout = VLLMRollout(d, cfg, seed=0, max_model_len=128)
        sync = ColocatedWeightSync(model, rollout, bucket_bytes=args.bucket_mib << 20)
        times = []
        for v in range(1, args.repeats + 1):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.01)
            stats = sync.push(version=v)
            times.append(stats["time/sync_s"])
        prompt, resp = [72, 101, 108, 108, 111], [119, 111, 114, 108, 100, 33]
        ids = torch.tensor([prompt + resp])
        with torch.no_grad():
            ref = processed_logprobs(model(input_ids=ids).logits[0, len(prompt) - 1 : -1], ids[0, 5:], 0.7)
        gap = (torch.tensor(rollout.sequence_logprobs(prompt, resp)) - ref).abs().max().item()
        rollout.close()
    print(
        json.dumps(
            {
                "size": args.size,
                "params": sum(p.numel() for p in model.parameters()),
                "buckets": stats["sync/buckets"],
                "bytes": stats["sync/bytes"],
                "sync_s_median": statistics.median(times),
                "sync_s_all": times,
                "logprob_gap": gap,
                "device": "cuda" if torch.cuda.is_available() else "cpu",
            }
        )
    )


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    t = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t:.1f}s", file=sys.stderr)
