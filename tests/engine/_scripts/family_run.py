"""SFT, RM, PPO (vLLM weight swaps), DPO and eval on one tiny model family, in one process.

Run: ``python tests/engine/_scripts/family_run.py ROOT NAME=family=qwen2,tie_word_embeddings=true ...``
(each ``NAME=`` is one family run into ``ROOT/NAME``, its comma-separated ``model.tiny`` overrides after it).
Each stage goes through the real ``tritonrlhf.engine.cli.main`` with the demo task's data (written small into
``ROOT/data``): SFT builds the tiny model of the given family from scratch, RM and DPO start from
the SFT checkpoint, PPO runs ``configs/ppo_tiny.yaml`` from it with the RM as reward (vLLM in-process,
DeepSpeed ZeRO-2, weights pushed into vLLM after every step), and eval samples the PPO and DPO
policies with vLLM. One process for every family saves the interpreter and import start-up of each stage. Writes
``ROOT/NAME/<stage>/`` per stage, ``ROOT/NAME/times.json`` (seconds per stage) and
``ROOT/NAME/status.json``; a failing stage ends its family's run, and the next family still runs. Used by ``tests/engine/test_families.py``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from tritonrlhf.engine import cli  # noqa: E402

PPO_STEPS = 4  # 3 weight swaps checked: the gaps of steps 2-4 are measured on swapped weights


def stages(root: Path, tiny: list[str]) -> list[tuple[str, list[str]]]:
    data, sft, rm = root / "data", root / "sft", root / "rm"
    pairs = [f"model.path={sft}", f"data.train={data / 'preferences.jsonl'}", "data.eval_size=8"]
    small = ["train.batch_size=8", "train.micro_batch_size=8"]
    return [
        (
            "sft",
            [
                f"output_dir={sft}",
                f"data.train={data / 'sft.jsonl'}",
                "total_steps=4",
                "data.eval_size=8",
                *small,
                *tiny,
            ],
        ),
        ("rm", [f"output_dir={rm}", *pairs, "total_steps=2", *small]),
        (
            "ppo",
            [
                "--config",
                str(REPO / "configs" / "ppo_tiny.yaml"),
                f"output_dir={root / 'ppo'}",
                f"model.path={sft}",
                "reward.kind=model",
                f"reward.model_path={rm}",
                "critic.init_from=reward",
                f"data.prompts={data / 'prompts.jsonl'}",
                f"total_steps={PPO_STEPS}",
                "ppo.rollout_batch_size=8",
                "ppo.mini_batch_size=8",
                "logging.tensorboard=false",
            ],
        ),
        ("dpo", [f"output_dir={root / 'dpo'}", *pairs, "total_steps=2", "optim.warmup_steps=0", *small]),
        (
            "eval",
            [
                f"output_dir={root / 'eval'}",
                "models.policies="
                + json.dumps({"ppo": str(root / "ppo" / "final"), "dpo": str(root / "dpo")}),
                f"models.baseline={sft}",
                f"models.reference={sft}",
                f"models.reward_model={rm}",
                "models.gold=tritonrlhf.engine.demo.task:gold_reward",
                f"data.prompts={data / 'eval_prompts.jsonl'}",
                "data.num_prompts=4",
            ],
        ),
    ]


def run_family(root: Path, tiny: list[str]) -> int:
    """Every stage into ``root``; ``root/times.json`` gets each stage's seconds. Returns the first
    non-zero exit status (the later stages are then skipped), or 0."""
    from tritonrlhf.engine.demo.task import write_demo_data

    write_demo_data(root / "data", seed=0, n_sft=64, n_pairs=48, n_prompts=16)
    times: dict[str, float] = {}
    for name, args in stages(root, tiny):
        t0 = time.perf_counter()
        print(f"[family_run] {root.name} {name}: {' '.join(args)}", flush=True)
        rc = cli.main([name, *args])
        times[name] = time.perf_counter() - t0
        (root / "times.json").write_text(json.dumps(times, indent=1))
        if rc:
            return rc
    return 0


def main(argv: list[str]) -> int:
    """``ROOT NAME=k=v,k=v ...``: each family into ``ROOT/NAME``, one after the other; a failing
    family is recorded in ``ROOT/NAME/status.json`` (with the exception) and the next one runs."""
    import traceback

    root, failed = Path(argv[0]), 0
    for spec in argv[1:]:
        name, _, overrides = spec.partition("=")
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        status: dict[str, object] = {"overrides": overrides.split(",")}
        try:
            status["rc"] = run_family(out, [f"model.tiny.{o}" for o in overrides.split(",")])
        except Exception:  # noqa: BLE001 - recorded for the test, which shows it
            status["rc"], status["error"] = 1, traceback.format_exc()
            print(status["error"], flush=True)
        (out / "status.json").write_text(json.dumps(status, indent=1))
        failed += status["rc"] != 0
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
