"""The same data on any number of ranks: one loss, one gradient, one rollout.

* ``mean_weights``: the micro-batch weights make the gradient a mean over the whole mini-batch
  (checked by hand on the arithmetic DeepSpeed does: 1/n_micro per micro-batch, mean over ranks).
* The prompts and sampling seeds of a step follow the sample's global index (1, 2, 4 ranks,
  split), and the HF backend's static loop samples a row by its own seed
  (``test_static_decode.py``), as vLLM does per request.
* The slow test trains one fixed rollout on 1 rank and on 2 (``tests/engine/_scripts/rank_layouts.py``),
  with 1, 2 and token-budget micro-batches, for every loss aggregation, actor and critic, ZeRO 0-3:
  every layout makes the 1-rank update.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tritonrlhf.engine.data import PromptBatch
from tritonrlhf.engine.rl.actor import mean_weights
from tritonrlhf.engine.rl.generation import GenerateMixin, rollout_seed_stream

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    "counts",
    [
        [[3.0], [36.0]],  # very uneven ranks
        [[0.0, 3.0], [20.0, 16.0]],  # an all-masked micro-batch
        [[0.0], [10.0, 0.0, 5.0]],  # an all-masked rank, different micro-batch counts
        [[0.0], [0.0]],  # nothing to learn from: no contribution, no division by zero
    ],
)
def test_mean_weights_give_the_global_mean_through_deepspeeds_scaling(counts) -> None:
    """sum over ranks of (1/W) sum over micro-batches of (1/n) * w * (micro-batch mean) is the mean
    over every item of the mini-batch, however the items are cut."""
    g = torch.Generator().manual_seed(0)
    items = [[torch.randn(int(c), generator=g, dtype=torch.float64) for c in rank] for rank in counts]
    world, total = len(counts), sum(map(sum, counts))
    got = 0.0
    for rank, xs in zip(counts, items):
        n = len(rank)
        for w, x in zip(mean_weights(rank, total, n * world), xs):
            got += w * (float(x.mean()) if x.numel() else 0.0) / n / world
    want = float(torch.cat([x for xs in items for x in xs]).sum()) / total if total else 0.0
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    # With the rank's own total and scale n they are the rank's mean (the returned stats).
    assert mean_weights([2.0, 6.0], 8.0, 2) == [0.5, 1.5]


@pytest.mark.slow
def test_one_rollout_trains_the_same_on_one_and_two_ranks(tmp_path: Path) -> None:
    """The same rollout (very uneven response lengths, rows dropped on rank 0 only) on 1 rank and 2,
    with 1, 2 and token-budget micro-batches per rank: the same gradient (the weight change of an
    update that is the gradient, see rank_layouts.py) and the same grad norm, within fp32 noise,
    for every loss aggregation, the actor and the critic, ZeRO 0-3. Failed before the loss was
    normalised over the mini-batch: per-rank means put 12x the weight on rank 0's short responses."""
    from tests.engine._scripts.launch import run_two_rank_script
    from tests.engine._scripts.rank_layouts import CASES, run_layouts

    digests = run_two_rank_script(ROOT / "tests/engine/_scripts/rank_layouts.py", tmp_path, timeout_s=480)
    assert digests[0] == digests[1], "the two ranks ended with different weights"
    two = torch.load(tmp_path / "layouts.pt")
    one = run_layouts(1, 0)
    bad = []
    for case in CASES:
        ref = one[case]["1x1"]
        scale = float(ref["delta"].abs().max())
        assert scale > 1e-4, f"{case}: the update did not move the weights"
        for name, r in {**one[case], **two[case]}.items():
            assert r["skipped"] == 0, f"{case} {name}: skipped"
            err = float((r["delta"] - ref["delta"]).abs().max()) / scale
            norm_err = abs(r["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"]
            print(f"{case:32s} {name:6s} rel err {err:.1e}  grad_norm {r['grad_norm']:.6f} ({norm_err:.1e})")
            if err > 1e-4 or norm_err > 1e-4:
                bad.append(f"{case} {name}: weight change off by {err:.1e}, grad norm by {norm_err:.1e}")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- the same rollout
class _Draws(GenerateMixin):
    """The trainer's prompt draw on rank ``rank`` of ``world`` (colocate), or trainer 0's (split)."""

    def __init__(self, rank: int, world: int, seed: int = 3, n: int = 2) -> None:
        from types import SimpleNamespace

        from tritonrlhf.engine.data import PromptSampler

        self.sampler = PromptSampler(21, 8, seed, True, rank, world)
        self.dataset = SimpleNamespace(
            batch=lambda idx: PromptBatch(list(idx), [""] * len(idx), [[7, i] for i in idx], [{}] * len(idx))
        )
        self.cfg = SimpleNamespace(ppo=SimpleNamespace(samples_per_prompt=n))
        self._gen = rollout_seed_stream(seed)

    def requests(self) -> list[tuple[list[int], int]]:
        """This rank's share of the next batch: (prompt, sampling seed) per request, prompt-major."""
        prompts, seed = self._draw_batch()
        ids = prompts.input_ids
        n = self.cfg.ppo.samples_per_prompt
        return [(p, s) for p, s in zip([p for p in ids for _ in range(n)], range(seed, seed + len(ids) * n))]


def test_prompts_and_sampling_seeds_follow_the_global_index_on_any_number_of_ranks() -> None:
    """Step after step (the sampler wraps epochs), ranks 0..W-1's requests in rank order are the
    1-rank run's, for W = 2 and 4, and so are those trainer 0 sends to 2 rollout ranks (split)."""
    from types import SimpleNamespace

    from tritonrlhf.engine.rl.rollout_server import RemoteRollout

    one = _Draws(0, 1)
    many = {w: [_Draws(r, w) for r in range(w)] for w in (2, 4)}
    sent: list[list[dict]] = [[], []]
    channels = [SimpleNamespace(send=box.append) for box in sent]
    placement = SimpleNamespace(num_rollout=2, to_rollout=channels.__getitem__, from_rollout=lambda i: None)
    remote = RemoteRollout(placement, {})
    split = _Draws(0, 1)
    for _step in range(5):
        want = one.requests()
        assert len({s for _, s in want}) == len(want)  # one seed per request
        for ranks in many.values():
            assert [q for d in ranks for q in d.requests()] == want
        prompts, seed = split._draw_batch()
        remote.request(0, prompts, 2, seed)
        msgs = [box.pop() for box in sent]
        got = [
            (p, m["seed"] + i) for m in msgs for i, p in enumerate(q for q in m["prompts"] for _ in range(2))
        ]
        assert got == want
