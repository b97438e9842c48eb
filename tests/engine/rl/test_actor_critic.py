"""Actor, critic and scorers on a tiny random Llama: log-prob parity, updates that do what PPO says, skips.

Fast tests run a DeepSpeed engine in this process (a world of one, gloo on CPU).
The slow test launches ``deepspeed --num_gpus 2`` for ZeRO-2 and ZeRO-3.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from tests.engine._scripts.launch import run_two_rank_script
from tritonrlhf.engine.config import OptimConfig, PPOAlgoConfig
from tritonrlhf.engine.rl.actor import ActorWorker, PolicyLogprobs
from tritonrlhf.engine.rl.critic import CriticWorker, ValueModel
from tritonrlhf.engine.rl.experience import Experience, truncated_is_weights
from tritonrlhf.engine.rl.scoring import ReferenceModel, RewardScorer
from tritonrlhf.engine.rl.train_engine import NonFiniteError, stop_on_consecutive_skips

ROOT = Path(__file__).resolve().parents[3]
VOCAB, P, R = 96, 5, 6


def tiny_config(config_cls=LlamaConfig, **kw) -> LlamaConfig:
    """A 2-layer, hidden-64 config of ``config_cls`` (Llama by default); ``kw`` overrides."""
    kw = {"num_key_value_heads": 2, **kw}
    return config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
        max_position_embeddings=256,
        pad_token_id=0,
        **kw,
    )


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config()).float()


def tiny_batch(B: int = 4, seed: int = 1) -> Experience:
    """Left-padded prompts of lengths 5,3,.. and right-padded responses of lengths 6,2,.."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, VOCAB, (B, P + R), generator=g)
    prompt_lens = [P, 3, 4, 1][:B]
    resp_lens = [R, 2, 5, 1][:B]
    am = torch.zeros(B, P + R, dtype=torch.long)
    for b in range(B):
        am[b, P - prompt_lens[b] : P + resp_lens[b]] = 1
    seq = seq * am
    return Experience(seq, am, am[:, P:].bool())


def hf_logprobs(lm: LlamaForCausalLM, batch: Experience, temperature: float) -> torch.Tensor:
    """Plain HF forward -> log_softmax(logits / T)[targets], materializing the logits."""
    am = batch.attention_mask
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = lm(input_ids=batch.sequences, attention_mask=am, position_ids=pos).logits.float()
    logits = logits[:, P - 1 : P - 1 + R] / temperature
    return torch.log_softmax(logits, -1).gather(-1, batch.sequences[:, P:, None]).squeeze(-1)


def optim(lr: float, stage: int = 0) -> OptimConfig:
    return OptimConfig(lr=lr, zero_stage=stage, grad_clip=1.0)


def params_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# --------------------------------------------------------------------------- fast
def test_linear_logprobs_path_matches_hf_forward_and_reference_model() -> None:
    lm = tiny_lm()
    batch = tiny_batch()
    mask = batch.action_mask
    for T in (1.0, 0.7):
        logp, entropy = PolicyLogprobs(lm)(batch.sequences, batch.attention_mask, R, T)
        expected = hf_logprobs(lm, batch, T)
        assert logp.dtype == torch.float32 and logp.shape == (4, R)
        torch.testing.assert_close(logp[mask], expected[mask], atol=1e-5, rtol=0)
        assert (entropy[mask] > 0).all()
        ref = ReferenceModel(tiny_lm()).logprobs(batch, temperature=T)
        torch.testing.assert_close(ref[mask], expected[mask], atol=1e-5, rtol=0)
        assert (ref[~mask] == 0).all()


def _small(config_cls, **kw):
    """A random causal LM of another family (grouped-query attention: 1 KV head)."""
    import transformers

    cfg = tiny_config(getattr(transformers, config_cls), num_key_value_heads=1, **kw)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).float().eval()


@pytest.mark.parametrize(
    "config_cls, kw",
    [
        ("CohereConfig", {"logit_scale": 0.0625}),  # logits * logit_scale (tied embeddings)
        ("GraniteConfig", {"logits_scaling": 8.0}),  # logits / logits_scaling
        ("GraniteConfig", {"logits_scaling": 1.0}),
    ],
)
def test_logit_scaling_heads_give_the_models_own_logprobs(config_cls, kw) -> None:
    """Heads that scale the logits after the matmul: PolicyLogprobs applies the same factor (as a
    temperature), so its log-probs are the model's own, not those of the unscaled logits."""
    lm = _small(config_cls, **kw)
    batch = tiny_batch()
    expected = hf_logprobs(lm, batch, 0.7)
    with torch.no_grad():
        got, _ = PolicyLogprobs(lm)(batch.sequences, batch.attention_mask, R, 0.7)
    m = batch.action_mask
    torch.testing.assert_close(got[m], expected[m], atol=2e-5, rtol=0)


def test_logit_softcapping_is_refused_with_the_reason() -> None:
    lm = _small("Gemma2Config", head_dim=32, final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0 .*soft-cap"):
        PolicyLogprobs(lm)


def test_rl_roles_turn_dropout_off_so_the_first_ratio_is_one() -> None:
    """A checkpoint trained with dropout (attention_dropout 0.3 here): the actor, critic and
    reference turn it off, so the training forward equals the scoring forward and PPO's first
    ratio is exactly 1 (no clipping at the first update)."""
    lm = LlamaForCausalLM(tiny_config(attention_dropout=0.3)).float()
    actor = ActorWorker(lm, optim(1e-3), PPOAlgoConfig(), 4, 1, temperature=1.0)
    assert lm.config.attention_dropout == 0.0
    assert all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in lm.modules())
    batch = tiny_batch()
    batch.old_logprobs, _ = actor.logprobs(batch)  # eval mode
    actor.engine.train()
    with torch.no_grad():
        train_mode, _ = actor.engine(batch.sequences, batch.attention_mask, R, 1.0)
    m = batch.action_mask
    torch.testing.assert_close(train_mode[m], batch.old_logprobs[m], atol=1e-6, rtol=0)
    batch.advantages = torch.randn(m.shape)
    stats = actor.train_minibatch([batch])
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-7)

    value = ValueModel(LlamaForCausalLM(tiny_config(attention_dropout=0.3)).model, 64)
    CriticWorker(value, optim(1e-3), PPOAlgoConfig(), 4, 1)
    assert value.backbone.config.attention_dropout == 0.0
    ref_lm = LlamaForCausalLM(tiny_config(attention_dropout=0.3)).float()
    ReferenceModel(ref_lm)
    assert ref_lm.config.attention_dropout == 0.0


def test_actor_step_raises_logprob_of_positively_advantaged_tokens() -> None:
    actor = ActorWorker(tiny_lm(), optim(1e-3), PPOAlgoConfig(entropy_coef=0.01), 2, 2, temperature=0.8)
    batch = tiny_batch()
    expected = hf_logprobs(tiny_lm(), batch, 0.8)
    before, _ = actor.logprobs(batch)
    torch.testing.assert_close(before[batch.action_mask], expected[batch.action_mask], atol=1e-5, rtol=0)

    batch.old_logprobs = before
    batch.advantages = batch.action_mask.float()
    stats = actor.train_minibatch(batch.split(2))
    after, _ = actor.logprobs(batch)

    assert stats["skipped"] == 0 and stats["grad_norm"] > 0
    assert stats["policy_loss"] == pytest.approx(-1.0, abs=1e-5)  # ratio 1 at the first step
    gain = (after - before)[batch.action_mask]
    assert gain.mean() > 0.05, gain


def test_old_logprobs_from_the_update_give_the_same_update() -> None:
    """One update per step (PPOTrainer.old_from_update): taking the old log-probs from the update's
    own forward, instead of a scoring pass first, gives the same loss, stats and weights, the
    truncated IS weights (toward a behaviour policy some tokens are far from) included."""
    batch = tiny_batch()
    g = torch.Generator().manual_seed(3)
    batch.advantages = torch.randn(batch.action_mask.shape, generator=g)
    batch.ref_logprobs = hf_logprobs(tiny_lm(seed=5), batch, 0.8)
    batch.rollout_logprobs = hf_logprobs(tiny_lm(), batch, 0.8) + torch.randn(
        batch.action_mask.shape, generator=g
    )
    cap = 2.0
    algo = PPOAlgoConfig(entropy_coef=0.01)
    runs = []
    for deferred in (False, True):
        actor = ActorWorker(tiny_lm(), optim(1e-3), algo, 2, 2, temperature=0.8)
        actor.loss = dataclasses.replace(actor.loss, kl_kind="k3")
        b = dataclasses.replace(batch)
        kept: list | None = [] if deferred else None
        if not deferred:  # the trainer's scoring pass, then its IS weights on the advantages
            b.old_logprobs, entropy = actor.logprobs(b)
            w, _ = truncated_is_weights(b.old_logprobs, b.rollout_logprobs, b.action_mask, cap)
            assert 0 < w.min() and (w < 1).any() and (w == cap).any()  # the weights bite both ways
            b.advantages = b.advantages * w
        stats = actor.train_minibatch(b.split(2), kl_coef=0.1, keep=kept, tis_cap=cap if deferred else 0.0)
        if deferred:
            assert len(kept) == 2 and b.old_logprobs is None
            old = torch.cat([lp for lp, _ in kept])
            entropy = torch.cat([e for _, e in kept])
        else:
            old = b.old_logprobs
        runs.append((stats, old, entropy, params_of(actor.module)))
    (s0, old0, ent0, w0), (s1, old1, ent1, w1) = runs
    m = batch.action_mask
    torch.testing.assert_close(old1[m], old0[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent1[m], ent0[m], atol=1e-5, rtol=0)
    for k in ("policy_loss", "kl_loss", "entropy", "grad_norm"):
        assert s1[k] == pytest.approx(s0[k], abs=1e-5), k
    assert s1["clipfrac"] == s0["clipfrac"] == 0.0
    for a, b_ in zip(w0, w1):
        torch.testing.assert_close(a, b_, atol=1e-6, rtol=0)
    assert any(not torch.equal(a, b_) for a, b_ in zip(w0, params_of(tiny_lm())))  # it did update


def test_critic_values_move_toward_returns() -> None:
    critic = CriticWorker(
        ValueModel.from_policy(tiny_lm()), optim(5e-3), PPOAlgoConfig(value_clip=None), 4, 1
    )
    batch = tiny_batch()
    returns = torch.full((4, R), 2.0) * batch.action_mask
    err = []
    for _ in range(4):
        values = critic.values(batch)
        err.append(float(((values - returns)[batch.action_mask] ** 2).mean()))
        batch.values, batch.returns = values, returns
        stats = critic.train_minibatch([batch])
        assert stats["skipped"] == 0
    assert err[-1] < 0.5 * err[0], err


def test_warmup_schedule_ramps_learning_rate() -> None:
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, zero_stage=0)
    critic = CriticWorker(ValueModel.from_policy(tiny_lm()), cfg, PPOAlgoConfig(), 4, 1)
    batch = tiny_batch()
    batch.values, batch.returns = critic.values(batch), batch.action_mask.float()
    lrs = [critic.train_minibatch([batch])["lr"] for _ in range(3)]
    assert lrs[0] < lrs[1] < lrs[2] <= 1e-3, lrs


def test_cosine_schedule_warms_up_then_decays_to_min_lr_ratio() -> None:
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, zero_stage=0, lr_schedule="cosine", min_lr_ratio=0.1)
    critic = CriticWorker(ValueModel.from_policy(tiny_lm()), cfg, PPOAlgoConfig(), 4, 1, total_updates=6)
    batch = tiny_batch()
    batch.values, batch.returns = critic.values(batch), batch.action_mask.float()
    lrs = [critic.train_minibatch([batch])["lr"] for _ in range(8)]
    # DeepSpeed's WarmupCosineLR: linear warm-up over 2 updates (0, lr/2), then a half cosine that
    # reaches 0.1 x lr at the 6th update and holds it.
    assert lrs[:2] == [0.0, pytest.approx(5e-4)], lrs
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5], lrs
    assert lrs[5:] == [pytest.approx(1e-4)] * 3, lrs


def test_cosine_schedule_needs_the_number_of_updates() -> None:
    cfg = OptimConfig(lr=1e-3, zero_stage=0, lr_schedule="cosine")
    with pytest.raises(ValueError, match="total number of updates"):
        CriticWorker(ValueModel.from_policy(tiny_lm()), cfg, PPOAlgoConfig(), 4, 1)


def test_nonfinite_loss_skips_step_and_leaves_parameters_unchanged() -> None:
    actor = ActorWorker(tiny_lm(), optim(1e-2), PPOAlgoConfig(), 2, 2)
    batch = tiny_batch()
    batch.old_logprobs, _ = actor.logprobs(batch)
    batch.advantages = batch.action_mask.float()
    bad = tiny_batch()
    bad.old_logprobs = batch.old_logprobs
    bad.advantages = batch.advantages.clone()
    bad.advantages[1, 0] = float("nan")  # one NaN in the second micro-batch only

    p0 = params_of(actor.module)
    for n in (1, 2):
        stats = actor.train_minibatch(bad.split(2))
        assert stats["skipped"] == 1 and actor.train.skipped == actor.train.consecutive_skips == n
    assert all(torch.equal(a, b) for a, b in zip(p0, actor.module.parameters()))

    stats = actor.train_minibatch(batch.split(2))  # the guard resets: a good step updates
    assert stats["skipped"] == 0 and actor.train.consecutive_skips == 0 and actor.train.skipped == 2
    assert actor.train.counters() == {"steps": 3, "skipped": 2, "consecutive_skips": 0}
    assert not all(torch.equal(a, b) for a, b in zip(p0, actor.module.parameters()))

    critic = CriticWorker(ValueModel.from_policy(tiny_lm()), optim(1e-2), PPOAlgoConfig(), 4, 1)
    batch.values = critic.values(batch)
    batch.returns = torch.full((4, R), float("inf"))
    c0 = params_of(critic.module)
    assert critic.train_minibatch([batch])["skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(c0, critic.module.parameters()))


def test_one_rank_zero0_skips_deepspeeds_lone_allreduce_with_the_same_update() -> None:
    """One data-parallel rank at ZeRO-0: DeepSpeed's bucketed all-reduce (flatten, reduce alone,
    copy back) is switched off, and two accumulated micro-batches update the weights exactly as
    they do with it on."""
    batch = tiny_batch()
    after = {}
    for allreduce in (False, True):
        actor = ActorWorker(tiny_lm(), optim(1e-2), PPOAlgoConfig(), 2, 2)
        assert actor.engine.dp_world_size == 1 and actor.engine.enable_backward_allreduce is False
        actor.engine.enable_backward_allreduce = allreduce
        batch.old_logprobs, _ = actor.logprobs(batch)
        batch.advantages = torch.linspace(-1, 1, batch.action_mask.numel()).view_as(batch.action_mask)
        p0 = params_of(actor.module)
        stats = actor.train_minibatch(batch.split(2))
        assert stats["skipped"] == 0
        after[allreduce] = params_of(actor.module)
        assert not all(torch.equal(a, b) for a, b in zip(p0, after[allreduce]))
    assert all(torch.equal(a, b) for a, b in zip(after[False], after[True]))
    # ZeRO-2 reduces through its own optimizer hooks: left as DeepSpeed sets it.
    zero2 = ActorWorker(tiny_lm(), optim(1e-2, stage=2), PPOAlgoConfig(), 2, 2)
    assert zero2.engine.enable_backward_allreduce


def test_stop_on_consecutive_skips() -> None:
    stop_on_consecutive_skips(2, 3, step=7)  # below the limit
    stop_on_consecutive_skips(50, 0, step=7)  # 0: never stop
    saves = []
    with pytest.raises(
        NonFiniteError, match=r"^step 7: 3 updates in a row .*=3\); checkpoint saved to ck/step_7\."
    ):
        stop_on_consecutive_skips(3, 3, step=7, save=lambda: saves.append(7) or "ck/step_7")
    assert saves == [7]  # saved first, then raised


def test_value_model_from_reward_model_and_reward_scorer() -> None:
    torch.manual_seed(3)
    rm = LlamaForSequenceClassification(tiny_config(num_labels=1)).float().eval()
    batch = tiny_batch()
    vm = ValueModel.from_reward_model(rm)
    torch.testing.assert_close(vm.value_head.weight, rm.score.weight)

    scorer = RewardScorer.from_model(rm, clip=0.0)
    scores, valid = scorer.score(["p"] * 4, ["r"] * 4, batch.sequences, batch.attention_mask)
    last = batch.attention_mask.shape[1] - 1 - batch.attention_mask.flip(1).argmax(1)
    with torch.no_grad():
        values = vm(batch.sequences, batch.attention_mask)
    torch.testing.assert_close(scores, values[torch.arange(4), last], atol=1e-5, rtol=1e-5)
    assert valid.all()

    fn = RewardScorer.from_function(lambda p, r: [1.0, None, float("nan"), 50.0], clip=10.0)
    scores, valid = fn.score(["a"] * 4, ["b"] * 4)
    assert valid.tolist() == [True, False, False, True]
    assert scores.tolist() == [1.0, 0.0, 0.0, 10.0] and fn.num_invalid == 2


# --------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_zero_stages_two_ranks_update_and_agree(tmp_path: Path) -> None:
    """ZeRO-0, 1, 2 and 3 in one 2-rank launch, each rank on its own batch: every stage updates every
    parameter, both ranks end equal (the gradients were averaged), and all four take the same step.
    On two ranks ZeRO-0 keeps DeepSpeed's backward all-reduce (the actor drops it on one rank only:
    dropped here, each rank would step on its own gradients and the ranks would disagree)."""
    ranks = run_two_rank_script(ROOT / "tests/engine/_scripts/train_zero_stages.py", tmp_path, timeout_s=420)
    print({s: round(ranks[0][s]["seconds"], 1) for s in ranks[0]})
    assert all(r["0"]["backward_allreduce"] for r in ranks)
    for stage in ("0", "1", "2", "3"):
        r0, r1 = ranks[0][stage], ranks[1][stage]
        for role in ("actor", "critic"):
            before, after = r0[role]["before"], r0[role]["after"]
            changed = [abs(a - b) > 0 for a, b in zip(before, after)]
            assert all(changed), f"ZeRO-{stage} {role}: some parameters did not change: {changed}"
            assert r0[role]["after"] == r1[role]["after"], f"ZeRO-{stage} {role}: ranks disagree"
            assert r0[role]["stats"]["skipped"] == 0
        # Under ZeRO-3 the LM head is partitioned; the gathered forward must still match plain HF.
        assert r0["logprob_err"] < 1e-5, r0["logprob_err"]
        assert r0["actor"]["lm_head_changed"]
    # fp32: every stage makes ZeRO-2's update.
    for stage in ("0", "1", "3"):
        for role in ("actor", "critic"):
            for a, b in zip(ranks[0]["2"][role]["after"], ranks[0][stage][role]["after"]):
                assert a == pytest.approx(b, rel=1e-4, abs=1e-5), f"ZeRO-{stage} {role} vs ZeRO-2"
