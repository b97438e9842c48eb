"""The RL loop: generate, score, advantages, update, sync.

``algo.advantage`` picks the estimator: ``gae`` (PPO with a critic) or a critic-free one over the
group of ``ppo.samples_per_prompt`` samples of each prompt (GRPO, Dr. GRPO, RLOO, REINFORCE++;
``tritonrlhf.engine.rl.advantages``), which builds no critic at all. The KL to the reference goes into the
reward or, fused into the policy-loss kernel, into the loss (``ppo.kl.placement``).

``colocate`` placement: each rank holds its own rollout engine beside its DeepSpeed shard of the
actor and critic, generates its share of the batch, and after every update receives the new
actor weights (``tritonrlhf.engine.rl.weight_sync``). Synchronous.

``split`` placement (``tritonrlhf.engine.rl.placement``): the trainer ranks ask the rollout ranks for batches
(``tritonrlhf.engine.rl.rollout_server``) and broadcast weights to them. With ``async.max_staleness = s``
trainer 0 keeps the requests for batches ``k+1 .. k+s`` queued while it trains on batch ``k``, so
generation overlaps training and no sample is more than ``s`` policy versions old; older samples
are refused. The loss corrects for the behaviour policy with truncated importance weights.

Read ``PPOTrainer.step`` top to bottom for the algorithm.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tritonrlhf.engine import distributed as dist
from tritonrlhf.engine.checkpoint import writable_dir
from tritonrlhf.engine.config import PPOConfig, is_url, save_config, to_dict
from tritonrlhf.engine.data import PromptBatch
from tritonrlhf.engine.metrics import MetricsLogger, drop_rows_after
from tritonrlhf.engine.rl.experience_maker import ExperienceMixin
from tritonrlhf.engine.rl.generation import GenerateMixin, rollout_seed_stream


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _init_single_process() -> None:
    """A world of one on gloo, so single-process runs take the same code path as launched ones."""
    import deepspeed

    dist.ensure_single_process_env()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class PPOTrainer(GenerateMixin, ExperienceMixin):
    """Builds every role from a ``PPOConfig`` and runs ``total_steps`` PPO steps.

    Construction validates everything that can be checked without generating
    (config ranges, batch divisibility by micro-batch x world size, paths, the
    reward callable, tokenizer/model vocabularies) so bad input fails before
    the first rollout.
    """

    def __init__(self, cfg: PPOConfig, placement: Any = None) -> None:
        from tritonrlhf.engine.config import ConfigError
        from tritonrlhf.engine.data import PromptDataset, PromptSampler
        from tritonrlhf.engine.rl.experience import RunningMoments
        from tritonrlhf.engine.rl.kl_control import make_kl_controller
        from tritonrlhf.engine.tasks import load_callable

        self.placement = placement  # engine.rl.placement.Placement in split mode (a trainer rank)
        self.split = placement is not None
        dist.init_distributed()
        if not dist.is_initialized():  # plain `python`: a world of one, same code path
            _init_single_process()
        self.cfg = cfg
        self.rank, self.world = dist.rank(), dist.world_size()
        cfg.validate(self.world)
        if cfg.reward.kind == "model":  # reads config.json only: fails before any weights load
            from tritonrlhf.engine.models import require_checkpoint_kind

            require_checkpoint_kind(cfg.reward.model_path, "reward.model_path", "seq_cls")
        if cfg.ppo.rollout_batch_size % self.world:
            raise ConfigError(
                f"ppo.rollout_batch_size={cfg.ppo.rollout_batch_size} is not divisible by world size {self.world}"
            )
        self.out = Path(cfg.output_dir)
        if self.rank == 0:
            writable_dir(self.out)
        if cfg.reward.kind == "function":  # fail in a second, not after building every role
            for _, spec, _ in cfg.reward.terms():
                if not is_url(spec):  # an endpoint is checked by its first batch
                    load_callable(spec)
        from tritonrlhf.engine.checkpoint import CheckpointManager

        # Resolve `resume` now, so a bad path fails in a second rather than after building every role.
        self.ckpt = CheckpointManager(self.out, cfg.keep_last, self.rank, self.world)
        self._resume_from = self.ckpt.resolve(cfg.resume)
        dist.barrier()
        if self.rank == 0:
            save_config(cfg, self.out)
        seed_everything(cfg.seed)
        self.device = _device()

        # Policy checkpoint on disk (vLLM loads from it): rank 0 builds a tiny one if asked.
        from tritonrlhf.engine.models import load_causal_lm, prepare_policy, resolve_dtype

        if self.rank == 0:
            self.policy_dir, self.tokenizer = prepare_policy(cfg.model, self.out, cfg.seed)
        dist.barrier()
        if self.rank != 0:
            self.policy_dir, self.tokenizer = prepare_policy(cfg.model, self.out, cfg.seed)
        self.pad_id = self.tokenizer.pad_token_id
        self.dataset = PromptDataset(cfg.data, self.tokenizer, seed=cfg.seed)
        if cfg.reward.kind == "function":  # each function's required keywords are columns of the data
            from tritonrlhf.engine.rewards.functions import reward_functions

            reward_functions(cfg.reward).check_columns(self.dataset.column_names(), cfg.data.prompts)
        # How the reward model reads samples, and whether the critic may start from it: decided
        # from config.json and tokenizer files, before any weights load.
        from tritonrlhf.engine.rl.critic import check_critic_init

        self.reward_route = None
        if cfg.reward.kind == "model":
            from tritonrlhf.engine.rl.reward_route import resolve_reward_route

            self.reward_route = resolve_reward_route(
                cfg.reward.tokenizer, self.tokenizer, cfg.reward.model_path, layout=cfg.reward.layout
            )
            if self.rank == 0:
                print(self.reward_route.log_line(), flush=True)
        if cfg.algo.uses_critic:
            check_critic_init(cfg.critic.init_from, cfg.reward.kind, self.tokenizer, self.reward_route)
        dtype = resolve_dtype(cfg.model.dtype, self.device)
        self.rollout = None
        if self.split and placement.is_coordinator:  # the rollout ranks start vLLM while we build roles
            from tritonrlhf.engine.rl.rollout_server import RemoteRollout

            hello = {"policy_dir": str(self.policy_dir), "scoring": cfg.placement.scoring}
            self.rollout = RemoteRollout(placement, {**hello, **self._vllm_args(dtype)})
        if self.reward_route is not None and self.reward_route.text is not None:
            self.reward_route.text.chats = self.dataset.chats  # chat prompts reach the RM as chats
        p = cfg.ppo
        # split: trainer 0 draws every global batch for the rollout ranks and deals out the samples.
        shard = (0, 1) if self.split else (self.rank, self.world)
        self.sampler = PromptSampler(
            len(self.dataset), p.rollout_batch_size, cfg.seed, cfg.data.shuffle, *shard
        )
        self.samples_per_rank = p.rollout_batch_size * p.samples_per_prompt // self.world
        self.mini_per_rank = p.mini_batch_size // self.world
        # When a step makes one update (one epoch, one mini-batch; ppo.reuse_update_forward), the old
        # log-probs are that update's own (ratio exactly 1, truncated IS weights applied there), not
        # a scoring pass, if no reward reads them first (no KL in the reward) or, with one
        # micro-batch per rank, if the rewards and advantages are formed between the update's
        # forwards and backwards (fused_update: train_fused); then the critic's forward gives the
        # values too.
        kl_in_reward = p.kl.placement == "reward" and (p.kl.coef != 0 or p.kl.adaptive)
        one_update = (
            p.reuse_update_forward and p.ppo_epochs == 1 and self.mini_per_rank == self.samples_per_rank
        )
        one_micro = one_update and p.micro_batch_tokens == 0 and p.micro_batch_size >= self.mini_per_rank
        self.fused_update = one_micro and (kl_in_reward or cfg.algo.uses_critic)
        self.old_from_update = one_update and (not kl_in_reward or self.fused_update)
        if self.rank == 0 and self.old_from_update:
            values = " and the values from the critic's" if self.fused_update and cfg.algo.uses_critic else ""
            print(
                f"[ppo] one update per step: the old log-probs come from the update's own forward{values} "
                "(no separate scoring pass)",
                flush=True,
            )
        # With ppo.micro_batch_tokens the count varies per mini-batch and the workers drive DeepSpeed's
        # accumulation themselves (TrainEngine.begin); this only fills DeepSpeed's config.
        grad_accum = max(self.mini_per_rank // p.micro_batch_size, 1)
        from tritonrlhf.engine.rl.packing import Batching

        self.batching = Batching.from_config(p)
        updates = cfg.total_steps * p.ppo_epochs * (self.samples_per_rank // self.mini_per_rank)
        attn = cfg.model.attn_implementation

        # Roles: actor + critic (DeepSpeed), frozen reference and reward.
        from tritonrlhf.engine.rl.actor import ActorWorker, PolicyLossSpec
        from tritonrlhf.engine.rl.critic import CriticWorker, ValueModel
        from tritonrlhf.engine.rl.scoring import build_scoring

        T = cfg.rollout.temperature
        actor_lm = load_causal_lm(self.policy_dir, torch.float32, attn, self.device)
        self.loss_agg, self.whiten, self.norm_rewards = cfg.resolved()
        self.actor = ActorWorker(
            actor_lm,
            cfg.actor,
            p,
            self.batching,
            grad_accum,
            dtype,
            T,
            updates,
            PolicyLossSpec.from_config(cfg),
        )
        self.ref = self.reward = None  # placement.scoring=rollout: the rollout ranks score
        if not (self.split and cfg.placement.scoring == "rollout"):
            self.ref, self.reward = build_scoring(
                cfg, str(self.policy_dir), dtype, self.device, self.reward_route
            )
        # KL coef 0 and ppo.kl.reference=auto: no reference model anywhere (rollout ranks included).
        self.reference = "model" if p.kl.needs_reference else "skipped"
        if self.rank == 0 and self.reference == "skipped":
            msg = "no reference model, no reference forward, no kl/ stats (reference=always logs them)"
            print(f"[ppo] KL coefficient 0 and ppo.kl.reference=auto: {msg}", flush=True)
        self.invalid_rewards = 0
        self.critic = None  # critic-free estimators load no value model, optimizer or value pass
        if cfg.algo.uses_critic:
            init = cfg.critic.init_from
            if init == "policy":
                value_model = ValueModel.from_policy(str(self.policy_dir))
            elif init == "reward":
                value_model = ValueModel.from_reward_model(cfg.reward.model_path)
            else:
                value_model = ValueModel.from_reward_model(init)
            self.critic = CriticWorker(value_model, cfg.critic, p, self.batching, grad_accum, dtype, updates)
        if self.rank == 0:  # bf16: bf16 params, fp32 master weights and Adam state (DeepSpeed's bf16 mode)
            for name, role in (("actor", self.actor), ("critic", self.critic)):
                if role is not None:
                    print(f"[ppo] {name} dtypes: {role.train.precision()}", flush=True)

        # Rollout engine beside this rank's shard (colocate) or on the rollout ranks (split), and the
        # weight pipe into it.
        from tritonrlhf.engine.rl.weight_sync import BroadcastWeightSync, ColocatedWeightSync

        bucket = cfg.placement.bucket_mb << 20
        if self.split:
            self.sync = BroadcastWeightSync(self.actor.module, placement, bucket, cfg.actor.zero_stage)
        else:
            self.rollout = self._build_rollout(dtype)
            self.sync = ColocatedWeightSync(self.actor.module, self.rollout, bucket, cfg.actor.zero_stage)
        self.kl_ctl = make_kl_controller(p.kl.coef, p.kl.adaptive, p.kl.target, p.kl.horizon)
        self.reward_norm = RunningMoments()
        # A critic started from the reward model with normalised rewards is mapped onto the
        # normalised scale once the first batch's reward statistics exist (make_experience).
        self.calibrate_critic = (
            self.critic is not None and cfg.critic.init_from == "reward" and self.norm_rewards
        )
        self.critic_calibrated = False
        self.version = 0
        self.step_idx = 0
        self.last_samples: list[dict[str, Any]] = []  # the last step's samples.jsonl rows (trainer 0)
        self.requested = 0  # split: batches requested from the rollout ranks so far
        self.extra_requests = 0  # split + dynamic sampling: top-up batches get ids -1, -2, ...
        self.pending: dict[int, tuple[PromptBatch, int]] = {}  # split: requested, not yet trained
        self._gen = rollout_seed_stream(cfg.seed)  # the same on every rank
        if self.rollout is not None and self.split:
            self.rollout.wait_ready(cfg.placement.startup_timeout_s)
        self._maybe_resume()
        self.logger = MetricsLogger(
            self.out,
            cfg.logging,
            cfg.total_steps,
            self.step_idx,
            enabled=self.rank == 0,
            run_config=to_dict(cfg),
        )

    def _vllm_args(self, dtype: torch.dtype) -> dict[str, Any]:
        c = self.cfg
        return {
            "seed": c.seed + self.rank,
            "max_len": c.data.max_prompt_len + c.rollout.max_new_tokens + 1,
            "dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
        }

    def _build_rollout(self, dtype: torch.dtype):
        from tritonrlhf.engine.rl.rollout_server import build_engine

        return build_engine(
            self.cfg, str(self.policy_dir), self._vllm_args(dtype), self.tokenizer, self.device
        )

    # ------------------------------------------------------------------ one RL step
    # (generate: GenerateMixin; make_experience and train: ExperienceMixin)

    def step(self) -> dict[str, float]:
        """Generate, score, compute advantages, update, sync; returns this step's metrics."""
        t0 = time.time()
        _cuda_peak_gib()  # resets the peak: each phase's own follows
        rb, events, dynamic = self.generate()
        t1 = time.time()
        peaks = {"memory/generate_peak_gib": _cuda_peak_gib()}
        exp, stats = self.make_experience(rb)
        t2 = time.time()
        peaks["memory/score_peak_gib"] = _cuda_peak_gib()
        train_stats = self.train(exp)
        t3 = time.time()
        peaks["memory/train_peak_gib"] = _cuda_peak_gib()
        if self.split:  # the rollout ranks join the sync only after the batches queued before it
            if self.rollout is not None:
                self.rollout.drain()
            dist.barrier(self.cfg.placement.timeout_s)
        t3b = time.time()
        self.version += 1
        sync_stats = self.sync.push(self.version)
        t4 = time.time()
        self.step_idx += 1
        # A few decoded samples for samples.jsonl (trainer 0's share; logged in fit() beside metrics).
        due = self.rank == 0 and self.cfg.logging.samples_every
        due = due and self.step_idx % self.cfg.logging.samples_every == 0
        self.last_samples = self.sample_rows(rb, exp) if due else []
        every = self.cfg.placement.probe_every
        if every and self.step_idx % every == 0:
            sync_stats["sync/probe_gap_max"] = self.probe_sync()
        phases = ("rollout_wait" if self.split else "generate", "score", "train", "rollout_wait", "sync")
        events += [
            {"role": "trainer", "phase": ph, "t0": a, "t1": b, "tag": self.step_idx}
            for ph, a, b in zip(phases, (t0, t1, t2, t3, t3b), (t1, t2, t3, t3b, t4))
            if b > a or ph != "rollout_wait"
        ]
        generate_s = sum(
            e["t1"] - e["t0"] for e in events if e["phase"] == "generate" and e["role"] != "trainer"
        )
        self._write_timeline(events)

        local = {
            **stats,
            **dynamic,
            **train_stats,
            **{k: v for k, v in sync_stats.items() if k != "time/sync_s"},
            **{k: v for k, v in peaks.items() if v is not None},
        }
        local.update(
            {
                "time/rollout_s": (t1 - t0) + (t3b - t3),  # generating, or (split) waiting for it
                "time/score_s": t2 - t1,
                "time/train_s": t3 - t2,
                "time/sync_s": t4 - t3b,
                "time/step_s": t4 - t0,
                "time/generate_s": generate_s if self.rank == 0 else 0.0,
            }
        )
        # Sums (tokens, invalid rewards, group counts) add over ranks; everything else averages;
        # times and maxima take the max.
        summed = ("rollout/tokens", "rollout/response_tokens", "rollout/invalid_rewards")
        sums = {k: local.pop(k) for k in list(local) if k in summed or k.endswith("_groups")}
        times = {k: local.pop(k) for k in list(local) if k.startswith("time/") or k.endswith("max")}
        m = dist.all_reduce_mean(local)
        m.update(dist.all_reduce_sum(sums))
        m.update({k: dist.all_reduce_max(v) for k, v in times.items()})
        samples = self.samples_per_rank * self.world
        if "kl/mean" in m:  # absent without a reference (then the coefficient is a fixed 0)
            self.kl_ctl.update(m["kl/mean"], samples)
        m.update(
            {
                "loss/policy": m.get("actor/policy_loss", float("nan")),
                **(
                    {"loss/value": m.get("critic/value_loss", float("nan"))}
                    if self.critic is not None
                    else {}
                ),
                "clipfrac": m.get("actor/clipfrac", float("nan")),
                "kl_coef": self.kl_ctl.value,
                "algo/reference": self.reference,  # "skipped": no reference model, no kl/ stats
                "throughput/samples_per_s": samples / m["time/step_s"],
                "throughput/tokens_per_s": m["rollout/response_tokens"] / m["time/step_s"],
                "policy_version": self.version,
                "rollout/policy_version": exp.policy_version,
                # The share of generation that training hid (split + async); 0 when synchronous.
                "async/hidden_frac": max(0.0, 1.0 - m["time/rollout_s"] / m["time/generate_s"])
                if self.split and m["time/generate_s"] > 0
                else 0.0,
            }
        )
        return m

    @torch.no_grad()
    def probe_sync(self) -> float:
        """Mean |rollout - trainer| log-prob on a fixed sequence, under the weights just synced.

        The sequence is the first prompt followed by its own first tokens as the "response". A
        diagnostic of the weight pipe (about 1e-7 in fp32 when it works): collective on every
        trainer (the actor forward may gather ZeRO-3 shards).
        """
        from tritonrlhf.engine.rl.experience import Experience

        prompt = list(self.dataset.batch([0]).input_ids[0])
        response = prompt[: max(1, min(8, len(prompt)))]
        seq = torch.tensor([prompt + response])
        exp = Experience(seq, torch.ones_like(seq), torch.ones(1, len(response), dtype=torch.bool))
        mine = self.actor.logprobs(exp)[0][0]
        if self.rollout is None:  # a split trainer other than 0: only joins the forward
            return 0.0
        theirs = torch.tensor(self.rollout.sequence_logprobs(prompt, response))
        return float((mine - theirs).abs().mean())

    def _write_timeline(self, events: list[dict[str, Any]]) -> None:
        """Append this step's phase intervals (wall clock; trainer and rollout ranks) to timeline.jsonl."""
        if self.rank != 0:
            return
        import json

        with open(self.out / "timeline.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step_idx, "events": events}) + "\n")

    def fit(self) -> dict[str, Any]:
        """Run until ``total_steps``; writes metrics.jsonl per step and summary.json at the end."""
        from tritonrlhf.engine.checkpoint import GracefulShutdown, save_hf_checkpoint
        from tritonrlhf.engine.rl.train_engine import stop_on_consecutive_skips

        every = self.cfg.save_every
        try:
            with GracefulShutdown() as stop:
                while self.step_idx < self.cfg.total_steps:
                    metrics = self.step()
                    self.logger.log(self.step_idx, metrics)
                    self.logger.log_samples(self.step_idx, self.last_samples)
                    # Step boundary; should_stop_all is a collective, so every rank evaluates it.
                    if stop.should_stop_all() and self.step_idx < self.cfg.total_steps:
                        path = self.save_checkpoint()
                        if self.rank == 0:
                            print(stop.stop_message(self.step_idx, path), flush=True)
                        return {"stopped": True, "step": self.step_idx, "checkpoint": str(path)}
                    saved = self.save_checkpoint() if every and self.step_idx % every == 0 else None
                    # K skipped updates in a row (actor or critic; the skip decision is agreed on every
                    # rank, so all ranks stop together): checkpoint, then an error naming the step.
                    stop_on_consecutive_skips(
                        max(e.train.consecutive_skips for e in self._workers().values()),
                        self.cfg.max_consecutive_skips,
                        self.step_idx,
                        lambda saved=saved: saved or self.save_checkpoint(),
                    )

            final = save_hf_checkpoint(self.actor.module, self.tokenizer, self.out / "final")
            # Each rank scored its own samples: the run's count is the sum (a collective, every rank).
            invalid = dist.all_reduce_mean({"n": float(self.invalid_rewards)})["n"] * self.world
            summary = {
                "final_policy": str(final),
                "prompts/truncated": self.dataset.num_truncated,
                "prompts/dropped": self.dataset.num_dropped,
                "rewards/invalid": round(invalid),
                "world_size": self.world,
                "policy_dir": str(self.policy_dir),
                "algo/advantage": self.cfg.algo.advantage,
                "algo/loss_agg": self.loss_agg,
                "algo/critic": self.critic is not None,
                # Where the old log-probs came from: the update's own forward, or a scoring pass.
                "algo/old_logprobs": "update" if self.old_from_update else "scoring",
                # Where the values came from (GAE): the critic update's forward, or a scoring pass.
                "algo/values": ("update" if self.fused_update else "scoring") if self.critic else "none",
                # Whether a reference model was built and scored against ("skipped" at KL coef 0).
                "algo/reference": self.reference,
            }
            self.logger.write_summary(summary)
            return summary
        finally:
            self.logger.close()
            if self.reward is not None:
                self.reward.close()  # its worker pool, if any

    # ------------------------------------------------------------------ checkpoint / resume
    def state_dict(self) -> dict[str, Any]:
        """This rank's loop state for a checkpoint (``CheckpointManager`` adds the global RNGs)."""
        rollout_rng = getattr(self.rollout, "_rng", None)  # the rollout engine's fallback seed stream
        return {
            "step_idx": self.step_idx,
            "version": self.version,
            "sampler": self.sampler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "reward_norm": self.reward_norm.state_dict(),
            "critic_calibrated": self.critic_calibrated,
            "gen": self._gen.get_state(),
            "rollout_rng": None if rollout_rng is None else rollout_rng.get_state(),
            "reward_invalid": self.invalid_rewards,
            # split: requested batches (prompts, seed) not yet trained, as plain data
            "pending": {j: (dataclasses.asdict(pb), seed) for j, (pb, seed) in self.pending.items()},
            "counters": {k: w.train.counters() for k, w in self._workers().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_idx = int(state["step_idx"])
        self.version = int(state["version"])
        self.sampler.load_state_dict(state["sampler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.reward_norm.load_state_dict(state["reward_norm"])
        self.critic_calibrated = bool(state.get("critic_calibrated", False))
        self._gen.set_state(state["gen"])
        rollout_rng = getattr(self.rollout, "_rng", None)
        if rollout_rng is not None and state.get("rollout_rng") is not None:
            rollout_rng.set_state(state["rollout_rng"])
        self.invalid_rewards = int(state.get("reward_invalid", 0))
        for name, worker in self._workers().items():
            if name in state.get("counters", {}):
                worker.train.load_counters(state["counters"][name])
        # split: batches requested before the checkpoint are requested again, with the same
        # prompts and seeds (under async they are now sampled from the restored, newer policy).
        self.pending = {j: (PromptBatch(**pb), seed) for j, (pb, seed) in state.get("pending", {}).items()}
        self.requested = self.step_idx

    def calibrate_critic_once(self) -> None:
        """Put a critic started from the reward model on the normalised reward scale (once per run).

        Called after the first batch's scores entered ``reward_norm``: the value head is mapped by
        ``v -> (v - mean) / (std + eps)``, the map ``reward_norm.normalize`` applies to the scores.
        The mapped weights are in the critic's checkpoint and ``critic_calibrated`` in the loop
        state, so a resumed run does not map them again.
        """
        if not self.calibrate_critic or self.critic_calibrated or self.reward_norm.count <= 0:
            return
        mean, scale = self.reward_norm.mean, self.reward_norm.std + self.reward_norm.eps
        self.critic.calibrate(mean, scale)
        self.critic_calibrated = True
        if self.rank == 0:
            print(
                f"[ppo] critic (init_from=reward) calibrated to the normalised reward scale: "
                f"values -> (v - {mean:.4g}) / {scale:.4g} (the first batch's reward mean and std)",
                flush=True,
            )

    def _workers(self) -> dict[str, Any]:
        """The trained roles: the actor, and the critic for GAE."""
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def _engines(self) -> dict[str, Any]:
        return {k: w.engine for k, w in self._workers().items()}

    def save_checkpoint(self) -> Path:
        """Checkpoint step ``step_idx`` (collective): engines, loop state, RNGs and the actor in HF format."""
        from tritonrlhf.engine.checkpoint import hf_exporter

        path = self.ckpt.save(
            self.step_idx,
            self._engines(),
            self.state_dict(),
            hf_exporter(self.actor.module, self.tokenizer, self.rank),
            policy_version=self.version,
            config=to_dict(self.cfg),
        )
        if self.rank == 0:
            secs = self.ckpt.last_save_seconds.get("total", 0.0)
            print(f"[ppo] saved checkpoint {path} ({secs:.1f}s)", flush=True)
        return path

    def _maybe_resume(self) -> None:
        """Load the checkpoint ``cfg.resume`` resolved to, then give the rollout engine its weights."""
        if self.cfg.resume == "never":
            return
        if self._resume_from is not None:
            self.load_state_dict(self.ckpt.load(self._resume_from, self._engines()))
            self.sync.push(self.version)  # vLLM was built from the initial policy
            if self.rank == 0:
                print(f"[ppo] resumed from {self._resume_from} at step {self.step_idx}", flush=True)
        if self.rank == 0:  # a killed run may have logged steps past its last checkpoint
            drop_rows_after(self.out / "metrics.jsonl", self.step_idx)
            drop_rows_after(self.out / "samples.jsonl", self.step_idx)
        dist.barrier()

    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.close()


def run_ppo(cfg: PPOConfig) -> dict[str, Any]:
    """Entry point of ``python -m tritonrlhf.engine.cli ppo``; in ``split`` placement rollout ranks serve instead."""
    placement = None
    if cfg.placement.mode == "split":
        from tritonrlhf.engine.rl.placement import setup_split

        placement = setup_split(cfg.placement.rollout_ranks, cfg.placement.timeout_s)
        if placement.role == "rollout":
            from tritonrlhf.engine.rl.rollout_server import serve

            return serve(cfg, placement)
    trainer = PPOTrainer(cfg, placement)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def _cuda_peak_gib() -> float | None:
    """The CUDA allocator's peak (GiB) since the last call on this rank's device, then reset; None
    off CUDA. Colocated roles share the device, so each phase's peak is what its roles needed
    (generate: the rollout engine; score: reference, critic and old log-probs; train: updates)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak
