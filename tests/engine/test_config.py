"""The config tree: shipped YAMLs, dotted overrides, type and range errors, save/load round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tritonrlhf.engine.config import ConfigError, PPOConfig, load_config, save_config, to_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = CONFIGS / "ppo_tiny.yaml"
BIG = CONFIGS / "ppo_7b_8gpu.yaml"


def _load(*overrides: str, path: Path = TINY) -> PPOConfig:
    return load_config(PPOConfig, path, list(overrides))


# --------------------------------------------------------------------------- shipped configs
def test_ppo_tiny_loads_and_validates():
    cfg = _load()
    cfg.validate(world_size=1)
    assert cfg.model.path == "" and cfg.data.prompts == "toy"
    assert cfg.reward.kind == "function" and cfg.reward.function == "tritonrlhf.engine.tasks:toy_reward"
    assert cfg.rollout.backend == "vllm" and cfg.actor.zero_stage == 2
    assert cfg.model.tiny.hidden_size // cfg.model.tiny.num_heads >= 32  # vLLM CPU attention
    cfg.validate(world_size=2)  # also fits a 2-rank DeepSpeed run


def test_ppo_7b_loads_and_fits_8_gpus(tmp_path):
    cfg = _load(path=BIG)
    assert cfg.actor.zero_stage == cfg.critic.zero_stage == 3
    assert (cfg.ppo.rollout_batch_size, cfg.ppo.mini_batch_size, cfg.ppo.micro_batch_size) == (512, 64, 2)
    assert cfg.rollout.max_new_tokens == 1024 and cfg.rollout.gpu_memory_utilization == 0.45
    assert cfg.placement.frozen_zero_stage == 3  # the frozen reference and reward partitioned: it fits 80 GB
    assert (cfg.actor.lr, cfg.critic.lr) == (1e-6, 5e-6)
    with pytest.raises(ConfigError, match="path does not exist"):
        cfg.validate(world_size=8)  # the placeholder checkpoints are not on this machine
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    local = _load(
        f"model.path={tmp_path}", f"reward.model_path={tmp_path}", f"data.prompts={prompts}", path=BIG
    )
    local.validate(world_size=8)  # the batch arithmetic holds on 8 ranks


# --------------------------------------------------------------------------- overrides
def test_dotted_overrides():
    cfg = _load(
        "actor.lr=1e-6",  # YAML reads this as a string; it is coerced to float
        "ppo.kl.coef=0.2",  # nested two levels
        "ppo.kl.adaptive=true",
        "data.shuffle=false",
        "ppo.clip_high=0.28",
        "ppo.value_clip=null",  # None for an optional field
        "actor.betas=[0.9, 0.999]",  # tuple
        "model.tiny.num_layers=4",
        "seed=3",
    )
    assert cfg.actor.lr == 1e-6 and isinstance(cfg.actor.lr, float)
    assert cfg.ppo.kl.coef == 0.2 and cfg.ppo.kl.adaptive is True
    assert cfg.data.shuffle is False
    assert cfg.ppo.clip_high == 0.28 and cfg.ppo.value_clip is None
    assert cfg.actor.betas == (0.9, 0.999)
    assert cfg.model.tiny.num_layers == 4 and cfg.model.tiny.hidden_size == 64  # siblings kept
    assert cfg.seed == 3


def test_overrides_without_yaml():
    cfg = load_config(PPOConfig, None, ["critic.lr=2e-6"])
    assert cfg.critic.lr == 2e-6 and cfg.actor.lr == PPOConfig().actor.lr


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("actor.lrr=1e-6", "'lr'"),
        ("totl_steps=3", "'total_steps'"),
        ("ppo.kl.coeff=0.1", "'coef'"),
        ("rolout.max_new_tokens=8", "'rollout'"),
    ],
)
def test_unknown_key_names_closest(override, suggestion):
    with pytest.raises(ConfigError, match=rf"unknown config key.*did you mean {suggestion}"):
        _load(override)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  mini_batchsize: 8\n")
    with pytest.raises(ConfigError, match=r"'ppo.mini_batchsize'.*did you mean 'mini_batch_size'"):
        load_config(PPOConfig, path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("total_steps=abc", "total_steps must be int"),
        ("total_steps=1.5", "total_steps must be an int"),
        ("data.shuffle=maybe", "data.shuffle must be a bool"),
        ("actor.betas=[0.9]", r"actor.betas must be a list of 2 values"),
        ("actor.lr=true", "actor.lr must be float"),
        ("ppo=3", "ppo must be a mapping"),
        ("model.path=[a]", "model.path must be a string"),
        ("actorlr", "must look like key.sub=value"),
    ],
)
def test_bad_types(override, message):
    with pytest.raises(ConfigError, match=message):
        _load(override)


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        (["actor.lr=-1e-6"], 1, "actor.lr must be > 0"),
        (["critic.lr=0"], 1, "critic.lr must be > 0"),
        (["ppo.clip_low=1.0"], 1, r"ppo.clip_low must be in \[0, 1\)"),
        (["ppo.clip_low=-0.1"], 1, "ppo.clip_low"),
        (["ppo.dual_clip=1.0"], 1, "ppo.dual_clip must be > 1"),
        (["ppo.gamma=1.5"], 1, "ppo.gamma"),
        (
            ["ppo.mini_batch_size=8", "ppo.micro_batch_size=4"],
            4,
            "not divisible by micro_batch_size x world_size",
        ),
        (["ppo.mini_batch_size=12"], 1, "not divisible by ppo.mini_batch_size=12"),
        (["actor.zero_stage=4"], 1, "actor.zero_stage must be one of"),
        (["actor.lr_schedule=linear"], 1, "actor.lr_schedule must be one of"),
        (["critic.min_lr_ratio=1.5"], 1, r"critic.min_lr_ratio must be in \[0, 1\]"),
        (["actor.warmup_steps=-1"], 1, "actor.warmup_steps must be >= 0"),
        (["rollout.backend=sglang"], 1, "rollout.backend must be one of"),
        (["data.on_long_prompt=skip"], 1, "data.on_long_prompt"),
        (["reward.kind=model"], 1, "reward.kind=model needs reward.model_path"),
        (["model.path=/definitely/not/here"], 1, "model.path: path does not exist"),
        (["resume=/definitely/not/here"], 1, "resume: checkpoint path does not exist"),
    ],
)
def test_out_of_range(overrides, world_size, message):
    cfg = _load(*overrides)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world_size=world_size)


# --------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("path", [TINY, BIG])
def test_save_config_round_trip(tmp_path, path):
    cfg = _load("ppo.clip_high=0.3", "actor.betas=[0.8, 0.9]", "ppo.dual_clip=3.0", path=path)
    written = save_config(cfg, tmp_path / "run")
    assert written == tmp_path / "run" / "config.yaml"
    assert load_config(PPOConfig, written) == cfg


def test_section_override_keeps_parent_defaults():
    """Overriding one key of a section keeps the defaults the parent gave that section."""
    from tritonrlhf.engine.config import PPOConfig, load_config
    from tritonrlhf.engine.stages.rm import RMConfig

    rm = load_config(RMConfig, None, ["optim.warmup_steps=3", "model.dtype=fp32"])
    assert rm.optim.lr == RMConfig().optim.lr != 1e-5  # RMConfig's own lr, not OptimConfig's
    assert rm.optim.warmup_steps == 3
    assert rm.model.path == RMConfig().model.path != ""
    ppo = load_config(PPOConfig, None, ["critic.zero_stage=3"])
    assert ppo.critic.lr == PPOConfig().critic.lr and ppo.critic.zero_stage == 3


def test_placement_and_async_keys() -> None:
    cfg = load_config(PPOConfig, None, ["placement.mode=split", "async.max_staleness=2", "async.tis_cap=3"])
    assert cfg.placement.mode == "split" and cfg.async_.max_staleness == 2 and cfg.async_.tis_cap == 3.0
    cfg.validate(1)
    assert to_dict(cfg)["async"] == {"max_staleness": 2, "tis_cap": 3.0}
    with pytest.raises(ConfigError, match="did you mean 'max_staleness'"):
        load_config(PPOConfig, None, ["async.staleness=1"])
    for bad, match in (
        (["async.max_staleness=1"], "needs placement.mode=split"),
        (["placement.mode=split", "async.max_staleness=-1"], "max_staleness must be >= 0"),
        (["async.tis_cap=0.5"], "tis_cap must be 0"),
        (["placement.mode=spread"], "placement.mode"),
        (["placement.timeout_s=0"], "placement.timeout_s"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(PPOConfig, None, bad).validate(1)


def test_split_needs_a_launch_with_a_trainer_and_a_rollout_rank(monkeypatch) -> None:
    from tritonrlhf.engine.rl.placement import setup_split

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="needs a launch"):
        setup_split(1, 10.0)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"rollout_ranks=2 must be in \[1, world_size - 1\] = \[1, 1\]"):
        setup_split(2, 10.0)


def test_mapping_fields_take_dotted_entries_and_check_their_values() -> None:
    from tritonrlhf.engine.stages.evaluate import EvalConfig

    cfg = load_config(
        EvalConfig, None, ["models.policies.ppo=/runs/ppo", 'models.policies={"sft": "/runs/sft"}']
    )
    assert cfg.models.policies == {"sft": "/runs/sft"}  # a whole mapping replaces earlier entries
    cfg = load_config(
        EvalConfig, None, ['models.policies={"sft": "/runs/sft"}', "models.policies.ppo=/runs/ppo"]
    )
    assert cfg.models.policies == {"sft": "/runs/sft", "ppo": "/runs/ppo"}
    for override, message in [
        ("models.policies.ppo.x=1", "models.policies is a mapping of plain values"),
        ("models.policy.x=1", "models.policy is a single value, not a section"),
        ("seed.x=1", "seed is a single value"),
        ("models.policies=[1]", "models.policies must be a mapping"),
        ('models.policies={"ppo": [1]}', "models.policies.ppo must be a string"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(EvalConfig, None, [override])


# --------------------------------------------------------------------------- critic-free RL
GRPO = CONFIGS / "grpo_tiny.yaml"


def test_grpo_tiny_loads_and_resolves_the_estimators_defaults():
    cfg = _load(path=GRPO)
    cfg.validate(world_size=1)
    assert cfg.algo.advantage == "grpo" and not cfg.algo.uses_critic
    assert cfg.ppo.kl.placement == "loss" and cfg.ppo.kl.kind == "k3"
    assert cfg.resolved() == ("seq_mean_token_mean", False, False)
    assert _load("algo.advantage=dr_grpo", path=GRPO).resolved() == ("seq_mean_token_sum_norm", False, False)
    assert _load("algo.advantage=reinforce_pp", path=GRPO).resolved() == ("token_mean", True, False)
    # PPO keeps what it did: token mean, whitened advantages, normalized rewards.
    assert _load().resolved() == ("token_mean", True, True) and _load().algo.uses_critic
    # Explicit choices win over the estimator's.
    cfg = _load("algo.loss_agg=token_mean", "ppo.whiten_advantages=true", "ppo.reward_norm=true", path=GRPO)
    assert cfg.resolved() == ("token_mean", True, True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo.advantage=ppo"], "algo.advantage must be one of"),
        (["ppo.kl.placement=both"], "ppo.kl.placement must be one of"),
        (["algo.loss_agg=sum"], "algo.loss_agg must be one of"),
        (["ppo.samples_per_prompt=1"], "algo.advantage=grpo needs groups: ppo.samples_per_prompt"),
        (["algo.advantage=rloo", "ppo.samples_per_prompt=1"], "algo.advantage=rloo needs groups"),
        (["ppo.gamma=0.99"], r"ppo.gamma=0.99 with algo.advantage=grpo: .*OpenRLHF forces gamma to 1"),
        (["algo.advantage=rloo", "ppo.gamma=0.9"], "ppo.gamma=0.9 with algo.advantage=rloo"),
        (["algo.advantage=dr_grpo", "ppo.gamma=0.9"], "ppo.gamma=0.9 with algo.advantage=dr_grpo"),
        (
            ["algo.advantage=reinforce_pp_baseline", "ppo.gamma=0.9"],
            "with algo.advantage=reinforce_pp_baseline",
        ),
        (["algo.loss_agg_constant=-1"], "algo.loss_agg_constant must be >= 0"),
        (["algo.std_eps=0"], "algo.std_eps must be > 0"),
        (["algo.dynamic_sampling.max_draws=0"], "algo.dynamic_sampling.max_draws must be >= 1"),
        (["algo.overlong.buffer=16"], r"algo.overlong.buffer must be in \[0, rollout.max_new_tokens=16\)"),
        (["algo.overlong.penalty=-1"], "algo.overlong.penalty must be >= 0"),
        (
            ["algo.advantage=reinforce_pp", "ppo.samples_per_prompt=1", "algo.dynamic_sampling.enabled=true"],
            "algo.dynamic_sampling needs ppo.samples_per_prompt >= 2",
        ),
    ],
)
def test_algo_config_errors_name_the_key(overrides, message):
    cfg = _load(*overrides, path=GRPO)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world_size=1)


def test_critic_free_ignores_the_critic_checkpoint_and_reinforce_pp_needs_no_group():
    _load("critic.init_from=/not/here", path=GRPO).validate(1)  # no critic is built
    _load(
        "algo.advantage=reinforce_pp",
        "ppo.samples_per_prompt=1",
        "ppo.mini_batch_size=8",
        "ppo.micro_batch_size=8",
        path=GRPO,
    ).validate(1)
    with pytest.raises(ConfigError, match="unknown config key 'algo.advantages'"):
        _load("algo.advantages=grpo", path=GRPO)
    # gamma discounts a per-token return: fine where the advantage is one (gae, reinforce_pp)
    _load("algo.advantage=reinforce_pp", "ppo.gamma=0.9", path=GRPO).validate(1)
    _load("ppo.gamma=0.9").validate(1)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["algo.policy_loss=grpo"], "algo.policy_loss"),
        (["algo.policy_loss=gspo", "algo.advantage=rloo", "ppo.samples_per_prompt=2"], "seq_mean_token_mean"),
        (["algo.policy_loss=cispo", "ppo.dual_clip=3"], "dual_clip"),
        (["algo.gspo_clip_high=0"], "gspo_clip_high"),
        (["algo.cispo_clip_low=1.5"], "cispo_clip_low"),
        (["algo.rollout_correction.mode=reject"], "rollout_correction.mode"),
        (["algo.rollout_correction.mode=mask", "algo.rollout_correction.level=batch"], "level"),
        (["algo.rollout_correction.mode=mask", "algo.rollout_correction.aggregation=sum"], "aggregation"),
        (["algo.rollout_correction.mode=truncate", "algo.rollout_correction.high=0.5"], "high"),
        (["algo.rollout_correction.mode=mask", "algo.rollout_correction.low=-1"], "low"),
    ],
)
def test_objective_and_rollout_correction_errors(overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(PPOConfig, None, overrides).validate()


def test_rollout_correction_defaults_to_tis_cap() -> None:
    cfg = load_config(PPOConfig, None, ["async.tis_cap=3"])
    rc = cfg.rollout_correction()
    assert (rc.mode, rc.level, rc.high) == ("truncate", "token", 3.0)
    assert load_config(PPOConfig, None, ["async.tis_cap=0"]).rollout_correction() is None
    gspo = ["algo.policy_loss=gspo", "algo.advantage=grpo", "ppo.samples_per_prompt=2"]
    cfg = load_config(PPOConfig, None, ["algo.rollout_correction.mode=mask", *gspo])
    cfg.validate()
    assert cfg.rollout_correction().mode == "mask" and cfg.algo.policy_clip(cfg.ppo) == (3e-4, 4e-4)
