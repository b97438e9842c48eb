"""Command line: ``python -m tritonrlhf.engine.cli STAGE --config FILE [dotted.key=value ...]``.

The same module runs under ``deepspeed --num_gpus N --module tritonrlhf.engine.cli ppo ...`` and
``torchrun``; the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK) decides
the world. Config errors print one clear line and exit with status 2 before any
work starts.

Layering: the core (this folder's modules) imports nothing from ``tritonrlhf.engine.rl``,
``tritonrlhf.engine.stages`` or ``tritonrlhf.engine.demo``. This module is the one exception, as the entry
point: each command imports its stage's module (``tritonrlhf.engine.rl.trainer``,
``tritonrlhf.engine.stages.sft``, ...) by module path inside the command's function, never at
module level, so ``import engine.cli`` stays cheap and the core stays below the layers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from tritonrlhf.engine.config import ConfigError, PPOConfig, load_config


def _ppo(config: str | None, overrides: list[str]) -> Any:
    cfg = load_config(PPOConfig, config, overrides)
    # The cheap checks first, in about a second: before torch.distributed and the heavy imports.
    # The launcher's WORLD_SIZE, less the rollout ranks in split placement, is the world the
    # trainer will see (it validates again there).
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if cfg.placement.mode == "split":
        world = max(1, world - cfg.placement.rollout_ranks)
    cfg.validate(world)
    # Checkpoint kinds (config.json only): a reward model given as the policy, or a causal LM as
    # the reward, fails here rather than after the policy has loaded. The loaders check again.
    from tritonrlhf.engine.models import require_checkpoint_kind

    if cfg.model.path:
        require_checkpoint_kind(cfg.model.path, "model.path", "causal_lm")
    if cfg.reward.kind == "model":
        require_checkpoint_kind(cfg.reward.model_path, "reward.model_path", "seq_cls")
    from tritonrlhf.engine.rl.trainer import run_ppo

    return run_ppo(cfg)


def _lazy(module: str, fn: str) -> Callable[[str | None, list[str]], Any]:
    """Import a stage's ``main_*`` from ``module`` only when that stage runs (heavy imports stay lazy)."""

    def run(config: str | None, overrides: list[str]) -> Any:
        import importlib

        return getattr(importlib.import_module(module), fn)(config, overrides)

    return run


STAGES: dict[str, Callable[[str | None, list[str]], Any]] = {
    "sft": _lazy("tritonrlhf.engine.stages.sft", "main_sft"),
    "rm": _lazy("tritonrlhf.engine.stages.rm", "main_rm"),
    "ppo": _ppo,
    "dpo": _lazy("tritonrlhf.engine.stages.dpo", "main_dpo"),
    "bon": _lazy("tritonrlhf.engine.stages.best_of_n", "main_bon"),
    "eval": _lazy("tritonrlhf.engine.stages.evaluate", "main_eval"),
    "redteam": _lazy("tritonrlhf.engine.stages.redteam", "main_redteam"),
    "label": _lazy("tritonrlhf.engine.stages.label", "main_label"),
    "revise": _lazy("tritonrlhf.engine.stages.revise", "main_revise"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tritonrlhf.engine.cli", description=__doc__.splitlines()[0]
    )
    parser.add_argument("stage", choices=sorted(STAGES), help="which stage to run")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. actor.lr=1e-6")
    args = parser.parse_intermixed_args(argv)
    try:
        STAGES[args.stage](args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
