"""``python -m tritonrlhf.engine.cli ppo`` on one rank, recording what the reward model scored and the critic's first values.

Run: ``[deepspeed --num_gpus 2] tests/engine/_scripts/ppo_rm_text.py RECORD.json ppo --config F k=v ...``. Everything
after RECORD.json goes to ``tritonrlhf.engine.cli.main`` unchanged (the real CLI path). The trainer is wrapped to
record (a) every call of the reward scorer: the texts, finish reasons, scores and validity it returned
(what the run trained on; under ``placement.scoring=rollout`` the scores the rollout ranks sent), and (b) on the first step, the critic's value at each sample's last real
token right after ``make_experience`` next to the normalised scores, and whether it was calibrated.
Used by ``tests/engine/rl/test_reward_route_e2e.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import tritonrlhf.engine.rl.trainer as trainer_mod  # noqa: E402
from tritonrlhf.engine import cli  # noqa: E402


class RecordingTrainer(trainer_mod.PPOTrainer):
    record_path: Path

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        route = self.reward_route
        self.record = {"route": None if route is None else route.route, "scored": [], "first_values": None}
        if self.reward is None:  # placement.scoring=rollout: the rollout ranks score (see make_experience)
            return
        inner = self.reward.submit  # every scoring path of RewardScorer goes through it

        def submit(
            prompts, responses, sequences=None, attention_mask=None, finish_reasons=None, columns=None
        ):
            pending = inner(prompts, responses, sequences, attention_mask, finish_reasons, columns)
            out = pending.result()
            self.record["scored"].append(
                {
                    "prompts": list(prompts),
                    "responses": list(responses),
                    "finish_reasons": list(finish_reasons or []),
                    "scores": out.scores.tolist(),
                    "valid": out.valid.tolist(),
                }
            )
            return pending

        self.reward.submit = submit

    def make_experience(self, rb):
        if self.reward is None and rb.scores is not None:  # scored beside the rollout engine
            call = {"prompts": rb.prompts, "responses": rb.responses, "finish_reasons": rb.finish_reasons}
            self.record["scored"].append(
                {**call, "scores": rb.scores.tolist(), "valid": rb.score_valid.tolist()}
            )
        exp, stats = super().make_experience(rb)
        if self.critic is not None and self.record["first_values"] is None:
            am = exp.attention_mask
            last = am.shape[1] - 1 - am.flip(1).argmax(1)
            with torch.no_grad():
                values = self.critic.engine(exp.sequences.to(self.critic.device), am.to(self.critic.device))
            self.record["first_values"] = {
                "values_last": values[torch.arange(am.shape[0]), last].float().cpu().tolist(),
                "scores": exp.scores.tolist(),
                "calibrated": self.critic_calibrated,
                "reward_mean": self.reward_norm.mean,
                "reward_std": self.reward_norm.std,
            }
        return exp, stats

    def fit(self):
        summary = super().fit()
        if self.rank == 0:
            self.record_path.write_text(json.dumps(self.record, indent=1))
        return summary


def main(argv: list[str]) -> int:
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]  # the launcher's
    if len(argv) < 2:
        raise SystemExit(__doc__)
    RecordingTrainer.record_path = Path(argv[0])
    trainer_mod.PPOTrainer = RecordingTrainer  # run_ppo looks the class up at call time
    return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
