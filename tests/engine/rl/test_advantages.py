"""Critic-free advantage estimators against hand-computed examples, on one process and across two ranks."""

from __future__ import annotations

import math

import pytest
import torch

from tritonrlhf.engine.rl.advantages import (
    group_ids_for,
    group_stats,
    informative_groups,
    overlong_penalty,
    sequence_advantages,
    token_advantages,
)

# Three groups of four samples, prompt-major: A has spread, B is all equal, C has one invalid sample.
SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 1.0, float("nan"), 2.0])
VALID = torch.isfinite(SCORES)
SCORES_CLEAN = torch.where(VALID, SCORES, torch.zeros_like(SCORES))
GROUPS = group_ids_for(0, 12, 4)
S3 = 1 / math.sqrt(1 / 3)  # A: mean 0.5, Bessel std sqrt(1/3)
# By hand, per estimator (C's valid members 3, 1, 2: mean 2, std 1, leave-one-out means 1.5 / 2.5).
EXPECTED = {
    "grpo": [0.5 * S3, -0.5 * S3, -0.5 * S3, 0.5 * S3, 0, 0, 0, 0, 1.0, -1.0, 0, 0],
    "dr_grpo": [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1.0, -1.0, 0, 0],
    "rloo": [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0, 1.5, -1.5, 0, 0],
    "reinforce_pp": [1.0, 0, 0, 1.0, 2, 2, 2, 2, 3.0, 1.0, 0, 2.0],
    "reinforce_pp_baseline": [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1.0, -1.0, 0, 0],
}
EPS = 1e-6


def test_group_ids_are_prompt_major() -> None:
    assert group_ids_for(0, 8, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert group_ids_for(6, 4, 4).tolist() == [1, 1, 2, 2]  # rank 1 of a batch dealt 6 + 6


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_sequence_advantages_by_hand(kind: str) -> None:
    got = sequence_advantages(kind, SCORES_CLEAN, GROUPS, VALID, eps=EPS)
    want = torch.tensor(EXPECTED[kind], dtype=torch.float32)
    if kind == "grpo":  # (r - mean) / (std + eps)
        want = want * torch.tensor([1 / (1 + EPS * S3)] * 4 + [1.0] * 4 + [1 / (1 + EPS)] * 4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32 and got[10] == 0  # the invalid sample


def test_group_of_one_valid_sample_and_bad_kind() -> None:
    s, g, v = torch.tensor([5.0, 1.0]), torch.tensor([0, 0]), torch.tensor([True, False])
    for kind in ("grpo", "dr_grpo", "rloo"):
        assert sequence_advantages(kind, s, g, v).tolist() == [0.0, 0.0], kind
    mean, std, cnt = group_stats(s, g, v)
    assert mean.tolist() == [5.0, 5.0] and std.tolist() == [0.0, 0.0] and cnt.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="gae"):
        sequence_advantages("gae", s, g, v)


def test_token_advantages_reward_to_go_with_kl_in_reward_and_broadcast_without() -> None:
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    seq = torch.tensor([1.0, -1.0])
    adv, rewards = token_advantages(seq, kl, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.01, -0.02, 0.97], [-0.05, -1.05, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.94, 0.95, 0.97], [-1.10, -1.05, 0.0]]))
    adv0, _ = token_advantages(seq, kl, mask, kl_coef=0.0)  # KL in the loss: broadcast
    torch.testing.assert_close(adv0, torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]))
    disc, _ = token_advantages(seq, kl, mask, kl_coef=0.0, gamma=0.5)
    torch.testing.assert_close(disc, torch.tensor([[0.25, 0.5, 1.0], [-0.5, -1.0, 0.0]]))
    white, _ = token_advantages(seq, kl, mask, kl_coef=0.1, whiten=True)  # REINFORCE++
    vals = white[mask].double()
    assert abs(float(vals.mean())) < 1e-6 and abs(float(vals.std()) - 1) < 1e-5 and white[1, 2] == 0


def test_overlong_penalty_is_dapos_soft_punishment() -> None:
    lengths = torch.tensor([10, 12, 13, 15, 16])
    got = overlong_penalty(lengths, max_new_tokens=16, buffer=4, penalty=2.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.5, -1.5, -2.0]))
    assert overlong_penalty(lengths, 16, 0, 2.0).abs().sum() == 0


def test_informative_groups_drop_equal_rewards() -> None:
    keep = informative_groups(SCORES_CLEAN, GROUPS, VALID)
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    # Only one valid reward left in a group: nothing to compare it with.
    one = informative_groups(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([True, False]))
    assert one.tolist() == [False, False]


# --------------------------------------------------------------------------- two ranks
SPLIT = 3  # rank 0 holds samples 0-2 (three of group A), rank 1 the other nine: A is split


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        sl = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        out = {}
        for kind in EXPECTED:
            out[kind] = sequence_advantages(
                kind, SCORES_CLEAN[sl], GROUPS[sl], VALID[sl], eps=EPS, across_ranks=True
            )
        out["local_grpo"] = sequence_advantages("grpo", SCORES_CLEAN[sl], GROUPS[sl], VALID[sl], eps=EPS)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_groups_split_across_two_ranks_use_the_whole_group(tmp_path) -> None:
    """Group A's samples sit on two gloo ranks: every estimator equals the one-process result."""
    import torch.multiprocessing as mp

    from tests.engine._scripts.launch import free_port

    mp.spawn(_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for kind in EXPECTED:
        got = torch.cat([p[kind] for p in parts])
        torch.testing.assert_close(got, sequence_advantages(kind, SCORES_CLEAN, GROUPS, VALID, eps=EPS))
    # Per-rank statistics would be wrong for the split group (the test can tell them apart).
    local = torch.cat([p["local_grpo"] for p in parts])
    assert (
        local[:4] - sequence_advantages("grpo", SCORES_CLEAN, GROUPS, VALID, eps=EPS)[:4]
    ).abs().max() > 0.1


# --------------------------------------------------------------------------- dynamic sampling
def test_group_filter_keeps_informative_groups_and_pads_when_short() -> None:
    from tritonrlhf.engine.rl.dynamic_sampling import GroupFilter
    from tritonrlhf.engine.rl.rollout import Sample

    def group(*scores, valid=True):
        return [Sample([1], [5], [-1.0], "stop", 0, score=s, score_valid=valid) for s in scores]

    filt = GroupFilter(groups_needed=3, n=2)
    filt.add(group(1.0, 0.0) + group(0.0, 0.0) + group(0.5, 0.5))  # one informative, two flat
    assert filt.short and filt.draws == 1 and len(filt.kept) == 1 and len(filt.dropped) == 2
    filt.add([])  # a draw this rank did not need
    filt.add(group(0.2, 0.3) + group(1.0, 1.0, valid=False))  # invalid rewards are not a signal
    assert filt.draws == 3 and len(filt.kept) == 2 and len(filt.dropped) == 3
    samples, stats = filt.take()
    assert [s.score for s in samples] == [1.0, 0.0, 0.2, 0.3, 0.0, 0.0]  # kept first, then padding
    assert stats == {
        "dynamic/draws_max": 3.0,
        "dynamic/kept_groups": 2.0,
        "dynamic/dropped_groups": 3.0,
        "dynamic/padded_groups": 1.0,
    }
    full = GroupFilter(groups_needed=1, n=2)
    full.add(group(1.0, 0.0) + group(0.0, 1.0))
    assert not full.short and len(full.take()[0]) == 2 and full.take()[1]["dynamic/padded_groups"] == 0
    with pytest.raises(ValueError, match="whole groups of 2"):
        full.add(group(1.0))
    with pytest.raises(ValueError, match="n >= 2"):
        GroupFilter(1, 1)
