"""Best-of-n / rejection sampling (RAFT, Dong et al. 2023): sample n, keep the best, fine-tune on it.

One round, read top to bottom in ``run_bon``:

1. **generate** ``bon.n`` samples for each of ``bon.prompts_per_round`` prompts (this rank's share)
   with the rollout engine (vLLM in-process, or HF ``generate`` with ``rollout.backend=hf``);
2. **score** every sample with the reward (an RM checkpoint or a ``module:function``);
3. **select** the highest-scoring sample per prompt (``select_best``; invalid scores never win);
4. **SFT** on the kept samples for ``bon.steps_per_round`` optimizer steps: cross-entropy on
   response tokens only (``tritonrlhf.engine.stages.sft``'s loss and collate);
5. **sync** the new weights into the rollout engine in place with
   ``tritonrlhf.engine.rl.weight_sync.ColocatedWeightSync`` (no restart, no disk).

``total_steps`` is the number of rounds k. The output directory gets an HF checkpoint of the
final policy, ``samples_round_<k>.jsonl`` (rank 0's samples with scores and a ``kept`` flag), ``metrics.jsonl`` (one row per
round) and ``summary.json``.

Checkpoints, ``resume`` and SIGTERM work as in the SFT, RM and DPO stages
(``tritonrlhf.engine.stages.common.StageCheckpoints``), with rounds as the steps: a checkpoint is taken at a
round's end (``save_every`` rounds), never inside one, as the round's kept samples are not saved.
Beyond the engine, the RNGs and the prompt sampler, nothing crosses a round boundary: a round's
sampling seed and SFT shuffle are functions of the seed and the round index, so a resumed run
repeats the uninterrupted run's rounds. On resume the checkpoint's weights are pushed into the
rollout engine before it samples.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tritonrlhf.engine import distributed as D
from tritonrlhf.engine.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    QuietLoggingConfig,
    RewardConfig,
    RolloutConfig,
    StageConfig,
    check_choice,
    check_dtype,
    check_optim,
    check_positive,
    check_stage_counts,
    load_config,
)


# --------------------------------------------------------------------------- config
@dataclass
class BoNAlgoConfig:
    n: int = 8  # samples per prompt
    prompts_per_round: int = 64  # across all ranks
    steps_per_round: int = 8  # SFT optimizer steps on the kept samples
    batch_size: int = 16  # kept samples per SFT step, across all ranks
    micro_batch_size: int = 16  # per rank per forward/backward


# Section defaults differ from the shared classes, so they are subclasses, not ``default_factory``
# lambdas: ``load_config`` rebuilds an overridden section from its class defaults.
@dataclass
class BoNModelConfig(ModelConfig):
    path: str = "runs/sft"


@dataclass
class BoNRewardConfig(RewardConfig):
    kind: str = "model"
    model_path: str = "runs/rm"
    clip: float = 0.0


@dataclass
class BoNDataConfig(DataConfig):
    prompts: str = "data/demo/prompts.jsonl"


@dataclass
class BoNOptimConfig(OptimConfig):
    lr: float = 1e-4


@dataclass
class BoNConfig(StageConfig):
    """Best-of-n rounds from a causal-LM checkpoint; ``total_steps`` = number of rounds."""

    output_dir: str = "runs/bon"
    total_steps: int = 2
    model: BoNModelConfig = field(default_factory=BoNModelConfig)
    reward: BoNRewardConfig = field(default_factory=BoNRewardConfig)
    data: BoNDataConfig = field(default_factory=BoNDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    bon: BoNAlgoConfig = field(default_factory=BoNAlgoConfig)
    optim: BoNOptimConfig = field(default_factory=BoNOptimConfig)
    logging: QuietLoggingConfig = field(default_factory=QuietLoggingConfig)

    def validate(self, world_size: int = 1) -> None:
        check_choice("resume", self.resume, ("auto", "never"), allow_path=True)
        check_choice("reward.kind", self.reward.kind, ("function", "model", "http"))
        self.reward.validate()
        check_choice("reward.tokenizer", self.reward.tokenizer, ("auto", "policy", "own"))
        check_choice("reward.layout", self.reward.layout, ("auto", "plain", "chat"))
        if self.reward.missing_eos_penalty or self.reward.on_truncated != "score":
            raise ConfigError(
                "reward.missing_eos_penalty and reward.on_truncated apply to RL runs (engine.cli ppo); "
                "best-of-n keeps the highest raw score"
            )
        self.rollout.validate()
        check_choice("data.on_long_prompt", self.data.on_long_prompt, ("truncate", "drop"))
        check_optim("optim", self.optim)
        if not self.model.path:
            self.model.tiny.validate()
        check_dtype(self.model.dtype)
        check_positive("total_steps", self.total_steps)
        check_stage_counts(self)
        b = self.bon
        for key in ("n", "prompts_per_round", "steps_per_round", "batch_size", "micro_batch_size"):
            check_positive(f"bon.{key}", getattr(b, key))
        if b.prompts_per_round % world_size:
            raise ConfigError(
                f"bon.prompts_per_round={b.prompts_per_round} is not divisible by world size {world_size}"
            )
        if b.batch_size % (b.micro_batch_size * world_size):
            raise ConfigError(
                f"bon.batch_size={b.batch_size} is not divisible by "
                f"micro_batch_size x world_size = {b.micro_batch_size} x {world_size}"
            )
        if self.reward.kind == "model" and not self.reward.model_path:
            raise ConfigError("reward.kind=model needs reward.model_path")
        for key, path in (
            ("model.path", self.model.path),
            ("model.tokenizer", self.model.tokenizer),
            ("reward.model_path", self.reward.model_path if self.reward.kind == "model" else ""),
        ):
            if path and not Path(path).exists():
                raise ConfigError(f"{key}: path does not exist: {path}")
        if self.data.prompts != "toy" and not Path(self.data.prompts).exists():
            raise ConfigError(f"data.prompts: file does not exist: {self.data.prompts}")


# --------------------------------------------------------------------------- selection
def select_best(scores: torch.Tensor, n: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the best sample of each group of ``n``.

    ``scores``: [G * n] float, prompt-major (``scores[g * n + j]`` is sample j of prompt g,
    as ``RolloutEngine.generate`` returns them). ``valid``: optional [G * n] bool; invalid
    samples never win, and a group with none valid is left out. Ties go to the lowest j.
    Returns a LongTensor [G'] (G' <= G) of indices into ``scores``, in group order.
    """
    if scores.dim() != 1 or scores.numel() % n:
        raise ValueError(
            f"select_best: scores must be 1-D with a multiple of n={n} entries, got {tuple(scores.shape)}"
        )
    s = scores.float().view(-1, n)
    ok = torch.ones_like(s, dtype=torch.bool) if valid is None else valid.view(-1, n).bool()
    s = s.masked_fill(~ok, float("-inf"))
    best = s.argmax(dim=1)  # first maximum on ties
    groups = torch.arange(s.shape[0])
    keep = ok.any(dim=1)
    return (groups * n + best)[keep]


# --------------------------------------------------------------------------- the stage
def build_rollout(cfg: BoNConfig | Any, policy_dir: Path, tokenizer: Any, max_model_len: int, rank: int = 0):
    """The rollout engine of ``cfg.rollout.backend`` on the checkpoint at ``policy_dir``, in ``model.dtype``."""
    from tritonrlhf.engine.models import resolve_dtype
    from tritonrlhf.engine.rl.engines import open_rollout

    dtype = resolve_dtype(cfg.model.dtype)
    attn = cfg.model.attn_implementation
    return open_rollout(policy_dir, cfg.rollout, tokenizer, cfg.seed + rank, max_model_len, dtype, attn)


def build_reward(cfg: RewardConfig, tokenizer: Any, device: torch.device | None = None):
    """A ``RewardScorer`` from ``reward.kind``: the callable, or the RM checkpoint (kind checked),
    reading the policy's ids or re-tokenized text as ``reward.tokenizer`` decides (logged)."""
    from tritonrlhf.engine.rl.scoring import RewardScorer

    if cfg.kind in ("function", "http"):
        from tritonrlhf.engine.rewards.functions import reward_functions

        return RewardScorer(functions=reward_functions(cfg), clip=cfg.clip)
    from tritonrlhf.engine.models import load_reward_model
    from tritonrlhf.engine.rl.reward_route import resolve_reward_route

    route = resolve_reward_route(cfg.tokenizer, tokenizer, cfg.model_path, layout=cfg.layout)
    if D.is_main():
        print(route.log_line(), flush=True)
    rm = load_reward_model(cfg.model_path, torch.float32, "auto", device)
    return RewardScorer(model=rm, clip=cfg.clip, device=device, text_route=route.text)


def _write_samples(
    path: Path, rb: Any, scores: torch.Tensor, valid: torch.Tensor, kept: list[int], n: int
) -> None:
    """This rank's samples of a round, one JSON line each, with their score and whether kept."""
    keep = set(kept)
    with path.open("w") as f:
        for i, (p, r) in enumerate(zip(rb.prompts, rb.responses)):
            row = {"group": i // n, "prompt": p, "response": r, "score": float(scores[i])}
            row.update({"valid": bool(valid[i]), "kept": i in keep})
            f.write(json.dumps(row) + "\n")


def round_seed(seed: int, rank: int, rnd: int) -> int:
    """Round ``rnd``'s sampling seed on ``rank`` (request i gets ``seed + i``).

    A function of its arguments alone, so a resumed run draws the uninterrupted run's samples.
    """
    return random.Random(f"bon-sample-{seed}-{rank}-{rnd}").randrange(2**31 - 1)


def _kept_examples(samples: list[Any], kept: list[int]) -> list[Any]:
    """``SFTExample``s of the kept samples with a non-empty response: loss on the response only."""
    from tritonrlhf.engine.stages.sft import SFTExample

    return [
        SFTExample(
            samples[i].prompt_ids + samples[i].response_ids,
            [0] * len(samples[i].prompt_ids) + [1] * len(samples[i].response_ids),
        )
        for i in kept
        if samples[i].response_ids
    ]


def _sft_on_kept(
    train_engine: Any, examples: list[Any], cfg: BoNConfig, rnd: int, pad: int
) -> tuple[float, dict[str, float]]:
    """``bon.steps_per_round`` SFT steps on ``examples`` (reshuffled per round from the seed).

    Returns (mean response-token NLL over the round, the last step's ``TrainEngine.finish`` stats).
    """
    from tritonrlhf.engine.data import PromptSampler
    from tritonrlhf.engine.stages.sft import sft_collate, sft_loss_sum

    b, engine = cfg.bon, train_engine.engine
    sampler = PromptSampler(len(examples), b.batch_size // D.world_size(), cfg.seed + rnd, True)
    nll_sum, tokens = 0.0, 0.0
    step_stats: dict[str, float] = {}
    for _ in range(b.steps_per_round):
        idx = sampler.next_batch()
        for c in range(0, len(idx), b.micro_batch_size):
            batch = sft_collate([examples[i] for i in idx[c : c + b.micro_batch_size]], pad)
            logits = engine(
                input_ids=batch.input_ids.to(engine.device),
                attention_mask=batch.attention_mask.to(engine.device),
                use_cache=False,
            ).logits
            nll, _, n = sft_loss_sum(logits, batch.labels.to(engine.device))
            loss = nll / max(n, 1)
            train_engine.micro_step(loss, bool(torch.isfinite(loss)))
            nll_sum += float(nll.detach())
            tokens += n
        step_stats = train_engine.finish()
    return nll_sum / max(tokens, 1.0), step_stats


def run_bon(cfg: BoNConfig) -> dict[str, Any]:
    """``total_steps`` rounds of generate -> score -> keep the best -> SFT -> sync; returns the summary.

    Every ``save_every`` rounds (and on SIGTERM, which then returns ``{"stopped": True, ...}``)
    a full-state checkpoint (``StageCheckpoints``: engine, RNGs, prompt sampler, counters, round)
    is written at the round's end; ``resume=auto|<path>`` continues from one, pushing its weights
    into the rollout engine before the next round samples, and repeats the uninterrupted rounds.
    """
    from tritonrlhf.engine.checkpoint import GracefulShutdown, hf_exporter, save_hf_checkpoint
    from tritonrlhf.engine.data import PromptDataset, PromptSampler
    from tritonrlhf.engine.models import load_causal_lm, prepare_policy, resolve_dtype
    from tritonrlhf.engine.rl.experience import collate_samples
    from tritonrlhf.engine.rl.generation import with_columns
    from tritonrlhf.engine.rl.train_engine import TrainEngine
    from tritonrlhf.engine.rl.weight_sync import ColocatedWeightSync
    from tritonrlhf.engine.stages.common import LoopState, finish_stage, setup_resumable_stage

    logger, ckpt = setup_resumable_stage(cfg, "bon")
    t_start = time.time()
    out = Path(cfg.output_dir)
    rank, world = D.rank(), D.world_size()
    if D.is_main():
        policy_dir, tokenizer = prepare_policy(cfg.model, out, cfg.seed)
    D.barrier()
    if not D.is_main():
        policy_dir, tokenizer = prepare_policy(cfg.model, out, cfg.seed)
    pad = tokenizer.pad_token_id
    dataset = PromptDataset(cfg.data, tokenizer, seed=cfg.seed)
    b = cfg.bon
    prompt_sampler = PromptSampler(len(dataset), b.prompts_per_round, cfg.seed, cfg.data.shuffle, rank, world)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    reward = build_reward(
        cfg.reward, tokenizer, dev
    )  # before the engines: a wrong checkpoint kind fails first
    if reward.text_route is not None:
        reward.text_route.chats = dataset.chats  # chat prompts reach the RM as chats

    model = load_causal_lm(policy_dir, torch.float32, cfg.model.attn_implementation)
    model.config.use_cache = False
    grad_accum = b.batch_size // (b.micro_batch_size * world)
    train_engine = TrainEngine(
        model.train(),
        cfg.optim,
        b.micro_batch_size,
        grad_accum,
        resolve_dtype(cfg.model.dtype),  # 16 bits: DeepSpeed casts the module, keeps fp32 master weights
        cfg.total_steps * b.steps_per_round,
    )
    engine = train_engine.engine
    rollout = build_rollout(
        cfg, policy_dir, tokenizer, cfg.data.max_prompt_len + cfg.rollout.max_new_tokens + 1, rank
    )
    # The window is the run's totals here (never reset): this rank's invalid scores, for the summary.
    loop = LoopState({"rewards/invalid": 0.0})
    try:
        try:
            sync = ColocatedWeightSync(engine, rollout, zero_stage=cfg.optim.zero_stage)
            # After the rollout engine: building vLLM reseeds the RNGs a checkpoint restores.
            loop = ckpt.attach(
                train_engine, prompt_sampler, hf_exporter(engine.module, tokenizer, rank), loop
            )
            if loop.step:
                sync.push(loop.step)  # the rollout engine was built from the initial policy
            with GracefulShutdown() as stop:
                for rnd in range(loop.step + 1, cfg.total_steps + 1):
                    t0 = time.perf_counter()
                    prompts = dataset.batch(prompt_sampler.next_batch())
                    groups = rollout.generate(prompts.input_ids, n=b.n, seed=round_seed(cfg.seed, rank, rnd))
                    rollout.sleep()
                    samples = with_columns(groups, prompts.columns)  # each record's columns, for the reward
                    rb = collate_samples(samples, tokenizer, pad)
                    t1 = time.perf_counter()
                    scores, valid = reward.score(
                        rb.prompts,
                        rb.responses,
                        rb.sequences,
                        rb.attention_mask,
                        rb.finish_reasons,
                        rb.columns,
                    )
                    kept = select_best(scores, b.n, valid).tolist()
                    t2 = time.perf_counter()
                    examples = _kept_examples(samples, kept)
                    if not examples:
                        raise RuntimeError(
                            f"best-of-n round {rnd}: no sample has a valid score and a non-empty response"
                        )
                    if D.is_main():
                        _write_samples(out / f"samples_round_{rnd}.jsonl", rb, scores, valid, kept, b.n)
                    sft_loss, step_stats = _sft_on_kept(train_engine, examples, cfg, rnd, pad)
                    t3 = time.perf_counter()
                    sync_stats = sync.push(rnd)
                    t4 = time.perf_counter()
                    v = valid.float()
                    lengths = rb.action_mask.float().sum(1)
                    local = {
                        "reward/mean": float((scores * v).sum() / v.sum().clamp_min(1)),
                        "reward/best_mean": float(scores[kept].mean()),
                        "reward/invalid": float((~valid).sum()),
                        "response_len/mean": float(lengths.mean()),
                        "response_len/kept_mean": float(lengths[kept].mean()),
                        "sft/loss": sft_loss,
                        "kept": float(len(examples)),
                    }
                    row = D.all_reduce_mean(local)
                    row["reward/gain"] = row["reward/best_mean"] - row["reward/mean"]
                    row.update(step_stats)
                    row.update({k: val for k, val in sync_stats.items() if k.startswith("sync/")})
                    row.update(
                        {
                            "time/generate_s": t1 - t0,
                            "time/score_s": t2 - t1,
                            "time/train_s": t3 - t2,
                            "time/sync_s": t4 - t3,
                            "time/round_s": t4 - t0,
                        }
                    )
                    logger.log(rnd, row)
                    loop.step, loop.first, loop.last = rnd, loop.first or row, row
                    loop.window["rewards/invalid"] += local["reward/invalid"]
                    if (stopped := ckpt.end_step(loop, stop)) is not None:
                        return stopped
        finally:
            rollout.close()
        final = save_hf_checkpoint(engine.module, tokenizer, out)
        head = {
            "rounds": loop.step,
            "reward/mean_first": loop.first["reward/mean"],
            "reward/mean_last": loop.last["reward/mean"],
            "reward/best_mean_last": loop.last["reward/best_mean"],
            "prompts/truncated": dataset.num_truncated,
            "prompts/dropped": dataset.num_dropped,
            "rewards/invalid": int(loop.window["rewards/invalid"]),
            "sync": "in-place (ColocatedWeightSync)",
        }
        return finish_stage(logger, loop, train_engine, final, t_start, head)
    finally:
        logger.close()


def main_bon(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """``load_config(BoNConfig, config_path, overrides)`` then ``run_bon``."""
    return run_bon(load_config(BoNConfig, config_path, overrides))
