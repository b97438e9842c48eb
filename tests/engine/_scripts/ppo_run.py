"""``python -m tritonrlhf.engine.cli ppo`` with parameter fingerprints of the actor and critic around ``fit``.

Run: ``[deepspeed --num_gpus 2] tests/engine/_scripts/ppo_run.py --fingerprints DIR ppo --config F k=v ...``.
Everything after ``--fingerprints DIR`` goes to ``tritonrlhf.engine.cli.main`` unchanged, so the run takes the
real CLI path (config loading, ``run_ppo``, exit status). The only addition: ``PPOTrainer.fit`` is
wrapped to copy every actor and critic parameter (gathered under ZeRO-3, a collective) before the
first step and compare after the last. Each rank writes ``DIR/rank{r}.json``; the tests assert.
Used by ``tests/engine/rl/test_ppo_e2e.py`` and ``tests/engine/rl/test_ppo_inputs.py``.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import tritonrlhf.engine.rl.trainer as trainer_mod  # noqa: E402
from tritonrlhf.engine import cli  # noqa: E402
from tritonrlhf.engine import distributed as dist  # noqa: E402


def _snapshot(module: torch.nn.Module, zero3: bool) -> dict[str, torch.Tensor]:
    """Full fp64 copies of every parameter (gathering ZeRO-3 partitions on every rank)."""
    params = dict(module.named_parameters())
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None)
    else:
        ctx = nullcontext()
    with ctx, torch.no_grad():
        return {n: p.detach().to("cpu", torch.float64).clone() for n, p in params.items()}


def _compare(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    deltas = {n: (after[n] - before[n]).abs() for n in before}
    norm_b = sum(float(t.square().sum()) for t in before.values()) ** 0.5
    norm_d = sum(float(d.square().sum()) for d in deltas.values()) ** 0.5
    return {
        "n_tensors": len(before),
        "n_elements": sum(t.numel() for t in before.values()),
        "n_changed": sum(int(bool((d > 0).any())) for d in deltas.values()),
        "max_abs_delta": max(float(d.max()) for d in deltas.values()),
        "rel_delta": norm_d / max(norm_b, 1e-30),
        # Equal on every rank when the ranks hold the same model.
        "checksum_after": sum(float(t.sum()) for t in after.values()),
        "all_finite": all(bool(torch.isfinite(t).all()) for t in after.values()),
    }


class FingerprintedTrainer(trainer_mod.PPOTrainer):
    out_dir: Path

    def _roles(self) -> dict[str, tuple[torch.nn.Module, bool]]:
        c = self.cfg
        roles = {"actor": (self.actor.module, c.actor.zero_stage == 3)}
        if self.critic is not None:  # critic-free estimators build none
            roles["critic"] = (self.critic.module, c.critic.zero_stage == 3)
        return roles

    def fit(self):
        before = {k: _snapshot(m, z3) for k, (m, z3) in self._roles().items()}
        summary = super().fit()
        report = {
            "rank": self.rank,
            "world": self.world,
            "zero_stage": {"actor": self.cfg.actor.zero_stage, "critic": self.cfg.critic.zero_stage},
            "steps": self.step_idx,
            "rollout_version": getattr(self.rollout, "policy_version", None),
        }
        for k, (m, z3) in self._roles().items():
            report[k] = _compare(before[k], _snapshot(m, z3))
            report[k]["precision"] = getattr(self, k).train.precision()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{dist.rank()}.json").write_text(json.dumps(report, indent=1))
        return summary


def main(argv: list[str]) -> int:
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]  # the launcher's
    if len(argv) < 2 or argv[0] != "--fingerprints":
        raise SystemExit(__doc__)
    FingerprintedTrainer.out_dir = Path(argv[1])
    trainer_mod.PPOTrainer = FingerprintedTrainer  # run_ppo looks the class up at call time
    return cli.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
