"""Weight-swap check under a real DeepSpeed launch, one in-process vLLM engine per rank.

Run: ``deepspeed --num_gpus 2 tests/engine/_scripts/sync_swap_ds.py --model_dir D --out DIR --stages 3 2``.
Per stage, every rank: wraps the tiny model in a DeepSpeed ZeRO engine, records its vLLM engine's
log-probs for a fixed sequence, takes one optimizer step, pushes the weights with
ColocatedWeightSync, and records vLLM's log-probs again next to the trainer's own (fp32 HF
forward of the gathered, updated weights). Results go to ``DIR/rank{r}.json``; the test asserts.
Used by ``tests/engine/rl/test_weight_sync.py::test_deepspeed_two_ranks_swap``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tritonrlhf.engine.config import RolloutConfig  # noqa: E402
from tritonrlhf.engine.rl.rollout import VLLMRollout, processed_logprobs  # noqa: E402
from tritonrlhf.engine.rl.weight_sync import ColocatedWeightSync  # noqa: E402

PROMPT = [72, 101, 108, 108, 111, 44, 32]
RESPONSE = [119, 111, 114, 108, 100, 33, 10, 65, 66, 67, 256, 5]


def trainer_logprobs(
    module: torch.nn.Module, model_dir: str, zero3: bool, cfg: RolloutConfig, response: list[int]
) -> list[float]:
    """fp32 HF forward of the trainer's current (gathered) weights on PROMPT + response."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).float().eval()
    params = list(module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else torch.no_grad()
    with ctx, torch.no_grad():
        state = {n.removeprefix("module."): p.detach().clone() for n, p in module.named_parameters()}
    ref.load_state_dict(state, strict=False)
    ids = torch.tensor([PROMPT + list(response)])
    with torch.no_grad():
        logits = ref(input_ids=ids).logits[0, len(PROMPT) - 1 : -1]
    return processed_logprobs(logits, ids[0, len(PROMPT) :], cfg.temperature, cfg.top_k, cfg.top_p).tolist()


def one_step(engine, rank: int) -> float:
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", type=int, nargs="+", default=[3])
    ap.add_argument("--bucket_bytes", type=int, default=48 << 10)  # splits q/k/v across buckets
    args = ap.parse_args()

    import deepspeed
    from transformers import AutoModelForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg = RolloutConfig(temperature=0.7, max_new_tokens=12, kv_cache_gib=1)
    result: dict = {"rank": rank, "world": world, "stages": {}}

    t = time.perf_counter()
    rollout = VLLMRollout(args.model_dir, cfg, seed=rank, max_model_len=128)
    result["vllm_start_s"] = time.perf_counter() - t
    from vllm.distributed import parallel_state as ps

    result["vllm_world"] = ps.get_world_group().world_size
    result["vllm_tp"] = ps.get_tp_group().world_size

    # Ranks generate different amounts: no cross-rank lockstep during generation.
    outs = rollout.generate([PROMPT, PROMPT[:3]][: 1 + rank], n=2, seed=7)
    result["generated"] = [[s.response_ids for s in group] for group in outs]

    for stage in args.stages:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32)
        ds_cfg = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 2e-2, "torch_adam": True}},
            "gradient_clipping": 0.0,
        }
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
        zero3 = stage == 3
        # Back to the checkpoint weights (a previous stage may have pushed others).
        sync = ColocatedWeightSync(engine, rollout, bucket_bytes=args.bucket_bytes, zero_stage=stage)
        sync.push(version=0)
        pre = rollout.sequence_logprobs(PROMPT, RESPONSE)
        pre_trainer = trainer_logprobs(engine.module, args.model_dir, zero3, cfg, RESPONSE)
        loss = one_step(engine, rank)
        stats = sync.push(version=1)
        post = rollout.sequence_logprobs(PROMPT, RESPONSE)
        post_trainer = trainer_logprobs(engine.module, args.model_dir, zero3, cfg, RESPONSE)
        sample = rollout.generate([PROMPT], n=1, seed=3)[0][0]
        sample_ref = trainer_logprobs(engine.module, args.model_dir, zero3, cfg, sample.response_ids)
        result["stages"][str(stage)] = {
            "loss": loss,
            "pre": pre,
            "pre_trainer": pre_trainer,
            "post": post,
            "post_trainer": post_trainer,
            "sample_logprobs": sample.logprobs,
            "sample_trainer": sample_ref,
            "sample_version": sample.policy_version,
            "stats": stats,
        }
        engine.destroy() if hasattr(engine, "destroy") else None
        del engine
    rollout.close()
    torch.distributed.barrier()  # the trainer's process group survives the engine's shutdown
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main()
