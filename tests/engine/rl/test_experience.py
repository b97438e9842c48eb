"""Experience containers and the pure PPO-target functions, against float64 / numpy formulas."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tritonrlhf.engine.rl.experience import (
    Experience,
    RunningMoments,
    compute_advantages,
    compute_rewards,
    masked_mean,
    masked_whiten,
)
from tritonrlhf.engine.rl.kl_control import AdaptiveKLController, FixedKLController


def _action_mask(lengths: list[int], R: int) -> torch.Tensor:
    return torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_compute_rewards_matches_float64_formula(kind: str) -> None:
    B, R, coef = 4, 7, 0.1
    lengths = [7, 3, 1, 0]
    mask = _action_mask(lengths, R)
    logp = torch.randn(B, R) - 2
    ref = logp + 0.3 * torch.randn(B, R)
    scores = torch.tensor([1.5, -2.0, 0.25, 9.0])

    rewards, kl = compute_rewards(scores, logp, ref, mask, coef, kind)

    d = logp.double() - ref.double()
    kl64 = {"k1": d, "k2": 0.5 * d**2, "k3": torch.exp(-d) - 1 + d}[kind]
    expected = -coef * kl64 * mask
    for b, n in enumerate(lengths):
        if n:
            expected[b, n - 1] += scores[b].double()
    assert rewards.dtype == torch.float32 and rewards.shape == (B, R)
    torch.testing.assert_close(rewards.double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kl.double(), kl64 * mask, atol=1e-6, rtol=1e-6)
    assert rewards[3].abs().sum() == 0  # an empty response gets neither KL nor score
    assert (rewards[~mask] == 0).all()


def test_k3_reward_clamps_the_log_ratio() -> None:
    """A token the policy pushed to logp -30 (reference -0.5): the k3 reward term is the clamped
    exp(10) - 11, not exp(29.5) ~ 6e12, and ``log_ratio_clamp`` (ppo.kl.log_ratio_clamp) moves it."""
    mask = torch.ones(1, 2, dtype=torch.bool)
    logp, ref = torch.tensor([[-30.0, -1.0]]), torch.tensor([[-0.5, -1.2]])
    _, kl = compute_rewards(torch.zeros(1), logp, ref, mask, 0.1, "k3")
    assert math.isclose(float(kl[0, 0]), math.expm1(10.0) - 10.0, rel_tol=1e-5)
    assert math.isclose(float(kl[0, 1]), math.expm1(-0.2) + 0.2, rel_tol=1e-4)
    _, kl5 = compute_rewards(torch.zeros(1), logp, ref, mask, 0.1, "k3", log_ratio_clamp=5.0)
    assert math.isclose(float(kl5[0, 0]), math.expm1(5.0) - 5.0, rel_tol=1e-5)


def test_adaptive_kl_moves_toward_target_and_fixed_does_not() -> None:
    ada = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=100)
    ada.update(current_kl=12.0, n_steps=10)  # error clipped to +0.2
    assert ada.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    up = ada.value
    ada.update(current_kl=3.0, n_steps=10)  # error = -0.5 -> clipped to -0.2
    assert ada.value == pytest.approx(up * (1 - 0.2 * 10 / 100))
    ada.update(current_kl=6.6, n_steps=10)  # error = +0.1
    assert ada.value > up * (1 - 0.02)

    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(ada.state_dict())
    assert restored.value == ada.value and restored.target == 6.0 and restored.horizon == 100

    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    fixed.update(0.0, 1000)
    assert fixed.value == 0.05


def test_running_moments_match_numpy_over_updates_and_merge() -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=n) for n in (5, 17, 1, 40)]
    rm = RunningMoments()
    for i, c in enumerate(chunks):
        mean, std = rm.update(torch.tensor(c, dtype=torch.float32))
        seen = np.concatenate(chunks[: i + 1])
        assert mean == pytest.approx(seen.mean(), rel=1e-6)
        assert std == pytest.approx(seen.std(), rel=1e-5)

    # Two "ranks" each see half the data; merging their batch stats gives the global moments.
    a, b = RunningMoments(), RunningMoments()
    a.update(torch.tensor(np.concatenate(chunks[:2])))
    b.update(torch.tensor(np.concatenate(chunks[2:])))
    a.merge_stats(b.count, b.mean, b.m2)
    all_ = np.concatenate(chunks)
    assert a.count == len(all_)
    assert a.mean == pytest.approx(all_.mean(), rel=1e-9)
    assert a.std == pytest.approx(all_.std(), rel=1e-9)

    x = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(a.normalize(x), (x - all_.mean()) / all_.std(), rtol=1e-5, atol=1e-6)
    c = RunningMoments()
    c.load_state_dict(a.state_dict())
    assert (c.count, c.mean, c.m2) == (a.count, a.mean, a.m2)


def test_masked_whiten_has_masked_mean_zero_std_one() -> None:
    x = torch.randn(5, 9) * 4 + 7
    mask = _action_mask([9, 4, 1, 6, 2], 9)
    x[~mask] = float("nan")  # masked-out garbage must not leak in
    w = masked_whiten(x, mask)
    vals = w[mask].double()
    assert abs(float(vals.mean())) < 1e-6
    assert float(vals.std()) == pytest.approx(1.0, rel=1e-5)
    assert (w[~mask] == 0).all()
    assert float(masked_mean(x, mask)) == pytest.approx(float(x[mask].mean()), rel=1e-6)
    unshifted = masked_whiten(x, mask, shift_mean=False)
    # TRL semantics: scale to std 1 but keep the original mean.
    assert float(unshifted[mask].mean()) == pytest.approx(float(x[mask].mean()), rel=1e-5)
    assert float(unshifted[mask].std()) == pytest.approx(1.0, rel=1e-5)


def test_compute_advantages_is_gae_on_response_tokens() -> None:
    B, R, gamma, lam = 3, 6, 0.9, 0.8
    mask = _action_mask([6, 2, 4], R)
    rewards = torch.randn(B, R) * mask
    values = torch.randn(B, R) * mask
    adv, ret = compute_advantages(rewards, values, mask, gamma, lam, whiten=False)
    r, v = rewards.double(), values.double()
    expected = torch.zeros(B, R, dtype=torch.float64)
    for b in range(B):
        n, last = int(mask[b].sum()), 0.0
        for t in reversed(range(n)):
            nv = v[b, t + 1] if t + 1 < n else 0.0
            last = r[b, t] + gamma * nv - v[b, t] + gamma * lam * last
            expected[b, t] = last
    torch.testing.assert_close(adv.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), (expected + v) * mask, atol=1e-5, rtol=1e-5)
    white, _ = compute_advantages(rewards, values, mask, gamma, lam, whiten=True)
    assert abs(float(white[mask].mean())) < 1e-5


def test_experience_split_cat_select_round_trip() -> None:
    B, P, R = 5, 3, 4
    mask = _action_mask([4, 2, 1, 3, 4], R)
    exp = Experience(
        sequences=torch.randint(0, 50, (B, P + R)),
        attention_mask=torch.ones(B, P + R, dtype=torch.long),
        action_mask=mask,
        old_logprobs=torch.randn(B, R),
        advantages=torch.randn(B, R),
        scores=torch.randn(B),
        policy_version=3,
    )
    parts = exp.split(2)
    assert [p.batch_size for p in parts] == [2, 2, 1]
    assert all(p.prompt_len == P and p.response_len == R for p in parts)
    back = Experience.cat(parts)
    for name in ("sequences", "attention_mask", "action_mask", "old_logprobs", "advantages", "scores"):
        assert torch.equal(getattr(back, name), getattr(exp, name)), name
    assert back.values is None and back.policy_version == 3

    sel = exp.select([4, 0])
    assert torch.equal(sel.sequences, exp.sequences[[4, 0]])
    assert torch.equal(exp.select(torch.tensor([True, False, False, False, True])).scores, exp.scores[[0, 4]])
    assert exp.to("cpu").old_logprobs.shape == (B, R)

    # Batches with different P and R are re-padded: prompts on the left, responses on the right.
    short = Experience(
        sequences=torch.full((1, 2 + 2), 9),
        attention_mask=torch.ones(1, 4, dtype=torch.long),
        action_mask=torch.ones(1, 2, dtype=torch.bool),
        old_logprobs=torch.ones(1, 2),
        advantages=torch.ones(1, 2),
        scores=torch.ones(1),
    )
    mixed = Experience.cat([exp, short])
    assert mixed.sequences.shape == (B + 1, P + R)
    assert mixed.attention_mask[-1].tolist() == [0, 1, 1, 1, 1, 0, 0]
    assert mixed.action_mask[-1].tolist() == [True, True, False, False]


def test_truncated_is_weights_against_float64() -> None:
    from tritonrlhf.engine.rl.experience import truncated_is_weights

    g = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 9, generator=g, dtype=torch.float64) * 3
    behaviour = old + torch.randn(4, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 9, generator=g) > 0.3
    w, stats = truncated_is_weights(old.float(), behaviour.float(), mask, cap=1.5)
    raw = torch.exp(old - behaviour)
    want = torch.where(mask, raw.clamp(max=1.5), torch.ones_like(raw))
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=1e-6)
    assert stats["is/max"] == pytest.approx(float(raw[mask].max()), rel=1e-5)
    assert stats["is/mean"] == pytest.approx(float(raw[mask].mean()), rel=1e-5)
    assert stats["is/truncated_frac"] == pytest.approx(float((raw[mask] > 1.5).double().mean()))
    # w >= 0, so scaling the advantages by w scales the clipped surrogate per token by w.
    from tritonrlhf import kernels

    adv = torch.randn(4, 9, generator=g)
    logp = old.float() + 0.3 * torch.randn(4, 9, generator=g)
    a, _ = kernels.ppo_policy_loss(logp, old.float(), adv * w, mask, clip_low=0.2)
    r = torch.exp(logp.double() - old)
    per_token = -torch.minimum(r * adv.double(), r.clamp(0.8, 1.2) * adv.double()) * w.double()
    want = per_token[mask].sum() / mask.sum()
    torch.testing.assert_close(a.double(), want, rtol=1e-5, atol=1e-6)


def _whiten_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, mask = _whiten_shards()[rank]
        torch.save(masked_whiten(x, mask, across_ranks=True), f"{out_dir}/white{rank}.pt")
        torch.save(
            masked_whiten(x, mask, shift_mean=False, across_ranks=True), f"{out_dir}/unshifted{rank}.pt"
        )
    finally:
        tdist.destroy_process_group()


def _whiten_shards() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two ranks' advantages on different scales and batch sizes (masked-out entries are NaN)."""
    g = torch.Generator().manual_seed(3)
    shards = []
    for rows, lengths, scale, shift in ((3, [6, 2, 5], 1.0, 0.0), (2, [1, 4], 5.0, 3.0)):
        x = torch.randn(rows, 6, generator=g) * scale + shift
        mask = _action_mask(lengths, 6)
        shards.append((torch.where(mask, x, torch.full_like(x, float("nan"))), mask))
    return shards


def test_masked_whiten_across_ranks_equals_whitening_the_whole_batch(tmp_path) -> None:
    """Two gloo ranks whiten their shards with global statistics: as if one process held both."""
    import torch.multiprocessing as mp

    from tests.engine._scripts.launch import free_port

    mp.spawn(_whiten_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    shards = _whiten_shards()
    x = torch.cat([s[0] for s in shards]).double()
    mask = torch.cat([s[1] for s in shards])
    vals = x[mask]
    expected = torch.where(mask, (x - vals.mean()) / vals.std(), torch.zeros_like(x))
    got = torch.cat([torch.load(tmp_path / f"white{r}.pt") for r in range(2)]).double()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    unshifted = torch.cat([torch.load(tmp_path / f"unshifted{r}.pt") for r in range(2)]).double()
    torch.testing.assert_close(unshifted[mask], expected[mask] + vals.mean(), atol=1e-5, rtol=1e-5)
    # Per-rank statistics would differ (the shards have different scales): the test can tell.
    local = torch.cat([masked_whiten(*s) for s in shards]).double()
    assert (local - expected).abs().max() > 0.1
    # Without a process group, across_ranks is the local whitening.
    torch.testing.assert_close(masked_whiten(*shards[0], across_ranks=True), masked_whiten(*shards[0]))


def test_kl_mean_averages_over_training_rows_only() -> None:
    """Rows dropped (all-zero action mask: invalid reward, stale, on_truncated=mask) do not dilute
    ``kl/mean``, which also feeds the adaptive KL controller."""
    from types import SimpleNamespace

    from tritonrlhf.engine.config import KLConfig
    from tritonrlhf.engine.rl.experience import sequence_kl
    from tritonrlhf.engine.rl.experience_maker import ExperienceMixin

    g = torch.Generator().manual_seed(0)
    B, P, R = 5, 3, 6
    full = _action_mask([6, 4, 5, 2, 6], R)
    trained = full.clone()
    trained[[1, 3]] = False  # two rows dropped after scoring
    old = -torch.rand(B, R, generator=g) * 3
    ref = -torch.rand(B, R, generator=g) * 3
    seq = torch.zeros(B, P + R, dtype=torch.long)
    exp = Experience(
        seq, torch.ones_like(seq), trained, old_logprobs=old, rollout_logprobs=old, ref_logprobs=ref
    )
    trainer = SimpleNamespace(cfg=SimpleNamespace(ppo=SimpleNamespace(kl=KLConfig(kind="k1"))))
    stats = ExperienceMixin.logprob_stats(trainer, exp, torch.zeros(B, R))

    per_row = ((old - ref).double() * full).sum(1)  # k1, summed over each row's tokens
    assert stats["kl/mean"] == pytest.approx(float(per_row[[0, 2, 4]].mean()), rel=1e-6)
    assert stats["kl/mean"] != pytest.approx(float(per_row[[0, 2, 4]].sum() / B), rel=1e-3)
    seq_kl, trains = sequence_kl(old - ref, trained)
    assert trains.tolist() == [True, False, True, False, True]
    assert seq_kl[[1, 3]].tolist() == [0.0, 0.0]
    # Every row dropped: no KL to report (NaN, which the adaptive controller skips).
    exp.action_mask = torch.zeros_like(trained)
    assert math.isnan(ExperienceMixin.logprob_stats(trainer, exp, torch.zeros(B, R))["kl/mean"])


def test_too_stale_rows_are_refused_masked_and_left_out_of_their_groups() -> None:
    """``async.max_staleness=1``, trainer at version 3: the two rows of version 1 (staleness 2) are
    refused. ``make_experience`` masks them (no loss token), counts them in ``async/refused`` and
    forms each GRPO group's baseline and scale from its fresh rows only (the refused rows' extreme
    scores would move both). No launch: the mixin runs on a stub trainer and the real config."""
    from types import SimpleNamespace

    from tritonrlhf.engine.config import PPOConfig, load_config
    from tritonrlhf.engine.rl.experience import RolloutBatch
    from tritonrlhf.engine.rl.experience_maker import ExperienceMixin

    cfg = load_config(
        PPOConfig,
        Path(__file__).resolve().parents[3] / "configs" / "grpo_tiny.yaml",
        ["ppo.rollout_batch_size=2", "ppo.samples_per_prompt=4", "async.max_staleness=1"],
    )
    g = torch.Generator().manual_seed(0)
    B, P, R = 8, 3, 5
    mask = _action_mask([5, 3, 4, 5, 2, 5, 4, 1], R)
    rollout_lp = torch.where(mask, -torch.rand(B, R, generator=g) * 3, torch.zeros(B, R))
    versions = torch.tensor([3, 2, 1, 3, 2, 3, 1, 2])  # staleness 0 1 2 0 | 1 0 2 1
    scores = torch.tensor([0.2, 0.6, 9.0, 0.1, 0.5, 0.3, -7.0, 0.9])  # refused rows: 9 and -7
    seq = torch.randint(3, 50, (B, P + R), generator=g)
    rb = RolloutBatch(
        seq,
        torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], 1),
        mask,
        rollout_lp,
        [""] * B,
        [""] * B,
        versions,
        ref_logprobs=rollout_lp - 0.05,  # scored beside the rollout: no reference model here
        scores=scores.clone(),
        score_valid=torch.ones(B, dtype=torch.bool),
    )

    class Trainer(ExperienceMixin):
        pass

    t = Trainer()
    t.cfg, t.version, t.rank, t.samples_per_rank = cfg, 3, 0, B
    t.loss_agg, t.whiten, t.norm_rewards = cfg.resolved()
    t.old_from_update = t.fused_update = False
    t.critic, t.invalid_rewards = None, 0
    t.kl_ctl = FixedKLController(cfg.ppo.kl.coef)
    # The trainer's old log-probs equal the rollout's: the truncated IS weights are exactly 1.
    t.actor = SimpleNamespace(logprobs=lambda exp: (rollout_lp.clone(), torch.ones(B, R)))
    assert (cfg.algo.advantage, cfg.ppo.kl.placement, t.norm_rewards) == ("grpo", "loss", False)

    exp, stats = t.make_experience(rb)

    refused = torch.tensor([False, False, True, False, False, False, True, False])
    assert stats["async/refused"] == 2 and stats["async/staleness_max"] == 2
    assert torch.equal(exp.action_mask, mask & ~refused[:, None])  # masked: no loss from them
    assert not exp.advantages[refused].any()
    # GRPO over each group's fresh rows: (r - mean) / (std + eps), Bessel's std, on every token.
    fresh_adv, with_refused = torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    for grp in (slice(0, 4), slice(4, 8)):
        s, keep = scores[grp].double(), ~refused[grp]
        for out, rows in ((fresh_adv, keep), (with_refused, torch.ones_like(keep))):
            mean, std = s[rows].mean(), s[rows].std()
            out[grp] = torch.where(keep, (s - mean) / (std + cfg.algo.std_eps), 0.0)
    got = torch.where(exp.action_mask, exp.advantages, torch.nan).nanmean(1).double()
    torch.testing.assert_close(got[~refused], fresh_adv[~refused], atol=1e-5, rtol=1e-5)
    assert (fresh_adv - with_refused)[~refused].abs().min() > 0.1  # the test can tell the two apart


@pytest.mark.parametrize(
    "level,aggregation", [("token", "geometric"), ("sequence", "product"), ("sequence", "geometric")]
)
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_rollout_correction_weights_against_float64(level, aggregation, mode) -> None:
    """Token or sequence weights (product or geometric mean), truncated or masked, and the
    masked fraction and normalised ESS, against float64 formulas."""
    from tritonrlhf.engine.config import RolloutCorrectionConfig
    from tritonrlhf.engine.rl.experience import rollout_correction_weights

    g = torch.Generator().manual_seed(5)
    old = -torch.rand(6, 11, generator=g, dtype=torch.float64) * 3
    behaviour = old + 0.1 * torch.randn(6, 11, generator=g, dtype=torch.float64)
    # Per-row shifts: sequences whose weight falls above, below and inside [0.7, 1.3].
    behaviour = behaviour + torch.tensor([0.6, -0.6, 0.0, 0.05, -0.05, 0.0], dtype=torch.float64)[:, None]
    mask = torch.rand(6, 11, generator=g) > 0.3
    mask[2] = False  # an empty row: no unit, weight 1
    rc = RolloutCorrectionConfig(mode, level, aggregation, low=0.7, high=1.3)
    w, stats = rollout_correction_weights(old.float(), behaviour.float(), mask, rc)
    d = torch.where(mask, old - behaviour, 0.0)
    if level == "token":
        units, raw = mask, torch.exp(d)
    else:
        n = mask.sum(-1, keepdim=True).double()
        s = d.sum(-1, keepdim=True) / (n.clamp(min=1) if aggregation == "geometric" else 1)
        units, raw = mask.any(-1), torch.exp(s).expand_as(d)
    want = ((raw >= 0.7) & (raw <= 1.3)).double() if mode == "mask" else raw.clamp(max=1.3)
    torch.testing.assert_close(w.double(), torch.where(mask, want, 1.0), rtol=1e-5, atol=1e-6)
    u = raw[mask] if level == "token" else raw[:, 0][units]
    out = ((u < 0.7) | (u > 1.3)) if mode == "mask" else u > 1.3
    assert 0 < out.double().mean() < 1
    key = "is/masked_frac" if mode == "mask" else "is/truncated_frac"
    assert stats[key] == pytest.approx(float(out.double().mean()))
    assert stats["is/ess"] == pytest.approx(float(u.sum() ** 2 / (u.numel() * (u**2).sum())), rel=1e-5)
    assert stats["is/ess"] < 1 and stats["is/mean"] == pytest.approx(float(u.mean()), rel=1e-5)
