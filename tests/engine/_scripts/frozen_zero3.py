"""The frozen reference and reward model partitioned over 2 ranks (ZeRO-3 inference); results to JSON.

Run: ``deepspeed --num_gpus 2 tests/engine/_scripts/frozen_zero3.py --out DIR``. Each rank scores
its own batch with whole models and with partitioned ones (``partition=True``), and writes
``DIR/rank<r>.json``: the largest differences of the reference log-probs and reward scores between
the two, and how many parameter elements each rank holds for the partitioned models. Both ranks
score the same number of micro-batches, as the trainer ranks do.
Used by ``tests/engine/rl/test_frozen_zero3.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tritonrlhf.engine import distributed as D
from tritonrlhf.engine.config import TinyModelConfig
from tritonrlhf.engine.models import build_tiny_model, build_tiny_reward_model, build_tokenizer
from tritonrlhf.engine.rl.experience import Experience
from tritonrlhf.engine.rl.scoring import ReferenceModel, RewardScorer

TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128)


def held(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds: the local shard of a partitioned parameter, else all of it."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = ap.parse_args()
    D.init_distributed()
    rank = D.rank()
    tok = build_tokenizer()
    torch.manual_seed(7 + rank)  # each rank scores its own batch
    B, P, R = 6, 5, 7
    seq = torch.randint(7, 60, (B, P + R))
    am = torch.ones_like(seq)
    am[0, :2] = 0  # a left-padded prompt
    am[1, P + 4 :] = 0  # a short response
    batch = Experience(seq, am, am[:, P:].bool())
    whole_ref = ReferenceModel(build_tiny_model(tok, TINY, seed=0), "cpu", micro_batch_size=4)
    part_ref = ReferenceModel(build_tiny_model(tok, TINY, seed=0), "cpu", micro_batch_size=4, partition=True)
    whole_rm = RewardScorer(
        model=build_tiny_reward_model(tok, TINY, seed=1), device="cpu", micro_batch_size=4
    )
    part_rm = RewardScorer(
        model=build_tiny_reward_model(tok, TINY, seed=1), device="cpu", micro_batch_size=4, partition=True
    )
    out = {
        "rank": rank,
        "ref_max_diff": float((whole_ref.logprobs(batch, 0.7) - part_ref.logprobs(batch, 0.7)).abs().max()),
        "rm_max_diff": float((whole_rm._model_scores(seq, am) - part_rm._model_scores(seq, am)).abs().max()),
        "ref_elements": [held(whole_ref.net), held(part_ref.net)],
        "rm_elements": [held(whole_rm.model), held(part_rm.model)],
        "ref_logp_mean": float(part_ref.logprobs(batch, 0.7).mean()),
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
