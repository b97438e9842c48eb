"""ZeRO-3 checkpoint round trip on 2 ranks: actor + critic engines, HF export, RNGs; results to JSON.

Run: ``deepspeed --num_gpus 2 tests/engine/_scripts/ckpt_zero3.py --out DIR``. Each rank
writes ``DIR/rank<r>.json`` with parameter digests at the save, after moving on, after
loading, and after one more step from both points; RNG draws after the save and after
the load; its restored state; (rank 0) whether the HF export equals the gathered weights,
the checkpoint's files, and the fingerprint-mismatch error.
Used by ``tests/engine/test_checkpoint.py::test_zero3_two_ranks_save_load_round_trip``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tests.engine._scripts.ckpt_common import build_engine, param_digest, train_step
from tritonrlhf.engine import distributed as D
from tritonrlhf.engine.checkpoint import CheckpointManager, engines_fingerprint, hf_exporter
from tritonrlhf.engine.config import ConfigError, TinyModelConfig
from tritonrlhf.engine.models import build_tiny_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = ap.parse_args()
    D.init_distributed()
    rank = D.rank()
    actor, tok = build_engine(zero_stage=3, seed=0)
    critic, _ = build_engine(zero_stage=3, seed=1)
    engines = {"actor": actor, "critic": critic}
    torch.manual_seed(100 + rank)  # each rank draws different data

    def step() -> None:
        train_step(actor)
        train_step(critic)

    step()
    step()
    mgr = CheckpointManager(Path(args.out) / "run", keep_last=2)
    path = mgr.save(2, engines, {"rank": rank, "step": 2}, hf_exporter(actor.module, tok), policy_version=2)
    res: dict = {"rank": rank, "digest_at_save": param_digest(actor.module) + param_digest(critic.module)}
    res["draw_at_save"] = torch.rand(3).tolist()
    step()
    res["digest_next"] = param_digest(actor.module) + param_digest(critic.module)
    step()
    step()
    res["digest_moved_on"] = param_digest(actor.module) + param_digest(critic.module)
    res["state"] = mgr.load(path, engines)
    res["digest_after_load"] = param_digest(actor.module) + param_digest(critic.module)
    res["draw_after_load"] = torch.rand(3).tolist()
    step()
    res["digest_next_after_load"] = param_digest(actor.module) + param_digest(critic.module)
    mgr.load(path, {"actor": actor}, restore_rng=False)  # collective, like the digest below
    actor_at_save = param_digest(actor.module)
    if rank == 0:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path / "hf")
        res["hf_matches"] = param_digest(hf) == actor_at_save == res["digest_at_save"][:16]
        res["files"] = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        wider = build_tiny_model(tok, TinyModelConfig(hidden_size=96, num_heads=3, num_kv_heads=3), seed=0)
        try:
            mgr.load(path, engines, {"actor": engines_fingerprint({"a": wider})["a"]})
        except ConfigError as e:
            res["mismatch_error"] = str(e)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(res))
    D.barrier(120)


if __name__ == "__main__":
    main()
