"""One fixed rollout, one update, on every rank layout: the weight change for each loss aggregation.

Run: ``deepspeed --num_gpus 2 tests/engine/_scripts/rank_layouts.py --out DIR`` (the 2-rank
layouts); ``tests/engine/rl/test_rank_layouts.py`` runs the 1-rank layouts in its own process with
``run_layouts(1, 0)``. Rank 0 writes ``DIR/layouts.pt``: ``{case: {layout: {"delta", "grad_norm"}}}``;
each rank writes ``DIR/rank<r>.json`` with a digest of its weights (the ranks must agree).

The rollout: 8 rows with very uneven response lengths; rows 0 and 1 (rank 0's on two ranks) are
dropped (all-masked, as ``on_truncated=mask`` leaves them), rows 2 and 3 have 1 and 2 response
tokens, rows 4 to 7 have 7 to 10. The optimizer is AdamW with ``eps`` = ``lr`` = 1e3, so the first
update is ``-g * (1 - |g| / 1e3)``: the weight change is the gradient (to 1e-3 relative), which
Adam's sign-like first step would otherwise hide.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tritonrlhf.engine import distributed as D
from tritonrlhf.engine.config import OptimConfig, PPOAlgoConfig
from tritonrlhf.engine.rl.actor import ActorWorker, PolicyLossSpec
from tritonrlhf.engine.rl.critic import CriticWorker, ValueModel
from tritonrlhf.engine.rl.experience import Experience
from tritonrlhf.engine.rl.packing import Batching

VOCAB, P, R = 64, 4, 10
PROMPT_LENS = [4, 2, 3, 4, 1, 4, 3, 2]
RESPONSE_LENS = [6, 10, 1, 2, 10, 9, 10, 7]
DROPPED = (0, 1)  # all-masked rows, on rank 0 only when there are two ranks

# case -> (role, reduction, scale, ZeRO stage): every loss_agg (the last actor one is Dr. GRPO's
# seq_mean_token_sum_norm, a constant 1/R) and every ZeRO stage.
CASES = {
    "actor/token_mean": ("actor", "token_mean", 1.0, 0),
    "actor/seq_mean_token_mean": ("actor", "seq_mean_token_mean", 1.0, 1),
    "actor/seq_mean_token_sum": ("actor", "seq_mean_token_sum", 1.0, 3),
    "actor/seq_mean_token_sum_norm": ("actor", "seq_mean_token_sum", 1.0 / R, 2),
    "critic/token_mean": ("critic", "token_mean", 1.0, 0),
    "critic/token_mean_zero3": ("critic", "token_mean", 1.0, 3),
}
# layout -> (world size, per rank: its micro-batches as global row indices, token budget or not).
# "tok": token-budget micro-batches of uneven sizes (TrainEngine.begin), "tok13" with a different
# count on each rank: run at ZeRO-0 only (ZeRO-1/2/3 communicate per micro-batch, so the trainer
# agrees the count across ranks, packing.agreed_token_groups; and they are slow to build).
LAYOUTS = {
    "1x1": (1, [[list(range(8))]], False),
    "1x2": (1, [[[0, 1, 2, 3], [4, 5, 6, 7]]], False),
    "2x1": (2, [[[0, 1, 2, 3]], [[4, 5, 6, 7]]], False),
    "2x2": (2, [[[0, 1], [2, 3]], [[4, 5], [6, 7]]], False),
    "2xtok": (2, [[[0, 1, 2], [3]], [[4], [5, 6, 7]]], True),
    "2xtok13": (2, [[[0, 1, 2, 3]], [[4], [5, 6], [7]]], True),
}


def tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)  # identical initial weights on every rank and in every layout
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=1,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).float()


def rollout() -> Experience:
    """The global batch of 8 rows (see the module docstring), with advantages, values and returns."""
    g = torch.Generator().manual_seed(5)
    B = len(PROMPT_LENS)
    am = torch.zeros(B, P + R, dtype=torch.long)
    for b, (pl, rl) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        am[b, P - pl : P + rl] = 1
    seq = torch.randint(1, VOCAB, (B, P + R), generator=g) * am
    action = am[:, P:].bool().clone()
    action[list(DROPPED)] = False
    m = action.float()
    adv = (torch.randn(B, 1, generator=g) + 0.3 * torch.randn(B, R, generator=g)) * m
    values = 0.5 * torch.randn(B, R, generator=g) * m
    returns = torch.randn(B, R, generator=g) * m
    return Experience(seq, am, action, advantages=adv, values=values, returns=returns)


def full_params(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter (gathered under ZeRO-3), flattened, float64."""
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return torch.cat([p.detach().double().flatten() for p in params])


def run_case(case: str, layout: str, rank: int) -> dict:
    role, reduction, scale, stage = CASES[case]
    _, groups, tokens = LAYOUTS[layout]
    groups = groups[rank]
    micro = [rollout().select(g) for g in groups]
    opt = OptimConfig(lr=1e3, eps=1e3, betas=(0.9, 0.999), grad_clip=0.0, zero_stage=stage)
    algo = PPOAlgoConfig(entropy_coef=0.01, value_clip=None)
    batching = Batching(len(groups[0]), 1000) if tokens else len(groups[0])
    lm = tiny_lm()
    if role == "actor":
        before = full_params(lm)
        worker = ActorWorker(lm, opt, algo, batching, len(groups), loss=PolicyLossSpec(reduction, scale))
        stats = worker.train_minibatch(micro, keep=[])
    else:
        torch.manual_seed(1)
        model = ValueModel.from_policy(lm)
        before = full_params(model)
        worker = CriticWorker(model, opt, algo, batching, len(groups))
        stats = worker.train_minibatch(micro)
    delta = full_params(worker.module) - before
    print(f"rank {rank}: {case} {layout} done", flush=True)
    return {"delta": delta, "grad_norm": float(stats["grad_norm"]), "skipped": float(stats["skipped"])}


def run_layouts(world: int, rank: int) -> dict:
    """``{case: {layout: result}}`` for every layout of ``world`` ranks (collective)."""
    return {
        case: {
            name: run_case(case, name, rank)
            for name, (w, _, tokens) in LAYOUTS.items()
            if w == world and (CASES[case][3] == 0 or not tokens)
        }
        for case in CASES
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    D.init_distributed()
    rank = D.rank()
    results = run_layouts(D.world_size(), rank)
    print(f"rank {rank}: done", flush=True)
    if rank == 0:
        torch.save(results, Path(args.out, "layouts.pt"))
    digest = {f"{c}@{n}": float(r["delta"].abs().sum()) for c, rs in results.items() for n, r in rs.items()}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(digest))


if __name__ == "__main__":
    main()
