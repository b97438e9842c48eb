"""One PPO actor step and one critic step under ZeRO-2 and ZeRO-3 on 2 ranks; digests to JSON.

Run: ``deepspeed --num_gpus 2 tests/engine/_scripts/train_zero_stages.py --out DIR``.
Each rank writes ``DIR/rank<r>.json``: per stage, per role, the gathered
parameters' digests before and after the step, the step's stats, and (actor)
the max error of the ZeRO log-probs against a plain HF forward on full weights.
Used by ``tests/engine/rl/test_actor_critic.py::test_zero2_zero3_two_ranks_update_and_agree``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import deepspeed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tritonrlhf.engine import distributed as D
from tritonrlhf.engine.config import OptimConfig, PPOAlgoConfig
from tritonrlhf.engine.rl.actor import ActorWorker
from tritonrlhf.engine.rl.critic import CriticWorker, ValueModel
from tritonrlhf.engine.rl.experience import Experience

VOCAB, P, R = 96, 5, 6


def tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)  # identical initial weights on every rank
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).float()


def rank_batch(rank: int, B: int = 2) -> Experience:
    """A different left/right-padded batch on each rank."""
    g = torch.Generator().manual_seed(100 + rank)
    seq = torch.randint(1, VOCAB, (B, P + R), generator=g)
    am = torch.zeros(B, P + R, dtype=torch.long)
    for b, (pl, rl) in enumerate([(P, R), (3, 4)][:B]):
        am[b, P - pl : P + rl] = 1
    return Experience(seq * am, am, am[:, P:].bool())


def digest(module: torch.nn.Module) -> list[float]:
    """Per-parameter (sum, sum of squares) of the full (gathered) parameters, in float64."""
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return [
            float(v) for p in params for v in (p.detach().double().sum(), (p.detach().double() ** 2).sum())
        ]


def lm_head_weight(actor: ActorWorker) -> torch.Tensor:
    w = actor.module.lm_head.weight
    with deepspeed.zero.GatheredParameters([w], modifier_rank=None):
        return w.detach().clone()


def hf_logprobs(lm: LlamaForCausalLM, batch: Experience) -> torch.Tensor:
    am = batch.attention_mask
    with torch.no_grad():
        logits = lm(
            input_ids=batch.sequences, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp_min(0)
        ).logits
    return torch.log_softmax(logits[:, P - 1 : P - 1 + R].float(), -1).gather(
        -1, batch.sequences[:, P:, None]
    )[..., 0]


def run_stage(stage: int, rank: int) -> dict:
    algo = PPOAlgoConfig(value_clip=0.2)
    out: dict = {}
    lm = tiny_lm()
    full = copy.deepcopy(lm)
    actor = ActorWorker(lm, OptimConfig(lr=1e-2, zero_stage=stage), algo, 2, 1)
    batch = rank_batch(rank)
    logp, _ = actor.logprobs(batch)
    mask = batch.action_mask
    out["logprob_err"] = float((logp - hf_logprobs(full, batch))[mask].abs().max())
    batch.old_logprobs = logp
    batch.advantages = mask.float() * torch.tensor([[1.0], [-1.0]])
    head0 = lm_head_weight(actor)
    before = digest(actor.module)
    stats = actor.train_minibatch([batch])
    out["actor"] = {
        "before": before,
        "after": digest(actor.module),
        "stats": stats,
        "lm_head_changed": bool((lm_head_weight(actor) - head0).abs().max() > 0),
    }

    critic = CriticWorker(ValueModel.from_policy(full), OptimConfig(lr=1e-2, zero_stage=stage), algo, 2, 1)
    batch.values = critic.values(batch)
    batch.returns = mask.float() * 1.5
    before = digest(critic.module)
    stats = critic.train_minibatch([batch])
    out["critic"] = {"before": before, "after": digest(critic.module), "stats": stats}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    D.init_distributed()
    rank = D.rank()
    results: dict = {}
    for stage in (2, 3):
        t0 = time.time()
        results[str(stage)] = run_stage(stage, rank)
        results[str(stage)]["seconds"] = time.time() - t0
        D.barrier(120)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
