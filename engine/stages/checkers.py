"""Constraint checkers: does a response violate a written constraint?

Each checker comes from a ``CheckerConfig`` (``kind``):

- ``regex``: a violation when ``pattern`` is found in the response (``re.search``;
  ``ignore_case``);
- ``callable``: ``fn: module:function`` called as ``fn(prompts, responses)``, returning one value
  per response: a bool (True = violation) or a number compared with ``threshold``;
- ``model``: a reward/classifier checkpoint (``AutoModelForSequenceClassification``, one output)
  at ``path``, scoring prompt and response through text with its own tokenizer
  (``tritonrlhf.engine.rl.reward_route.TextRoute``): the layout every stage trains on,
  ``<bos> prompt response <eos>``, or its chat template with ``chat_template: true`` (a classifier
  trained on chats); the score is compared with ``threshold``.

A number is a violation when it is above the threshold (``violation: above``, e.g. a harm
classifier) or below it (``violation: below``, e.g. a reward model whose low scores mark bad
answers). ``check(prompts, responses, finished)`` returns a ``CheckResult``: ``violated [N]`` bool
and ``margin [N]`` float, how far past the threshold each score lies (1/0 for regex and bool
results), which ranks the worst examples. A value that is None or not finite is an error that
names the checker: a constraint that cannot be evaluated must not pass silently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tritonrlhf.engine.config import ConfigError, check_choice


@dataclass
class CheckerConfig:
    kind: str = "regex"  # regex | callable | model
    pattern: str = ""  # regex
    ignore_case: bool = False  # regex
    fn: str = ""  # callable: module:function
    path: str = ""  # model: sequence-classification checkpoint
    threshold: float = 0.0  # callable (numeric results) and model
    chat_template: bool = False  # model: render with its chat template (else <bos> prompt response <eos>)
    violation: str = "above"  # above | below the threshold is a violation

    def validate(self, key: str) -> None:
        check_choice(f"{key}.kind", self.kind, ("regex", "callable", "model"))
        check_choice(f"{key}.violation", self.violation, ("above", "below"))
        used = {"regex": {"pattern", "ignore_case"}, "callable": {"fn", "threshold", "violation"}}
        used["model"] = {"path", "threshold", "violation", "chat_template"}
        default = CheckerConfig()
        for name in ("pattern", "ignore_case", "fn", "path", "threshold", "violation", "chat_template"):
            if name not in used[self.kind] and getattr(self, name) != getattr(default, name):
                raise ConfigError(
                    f"{key}.{name} does not apply to kind={self.kind} (it takes {sorted(used[self.kind])})"
                )
        if self.kind == "regex":
            if not self.pattern:
                raise ConfigError(f"{key}.pattern: a regex checker needs a pattern")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ConfigError(f"{key}.pattern {self.pattern!r} is not a valid regex: {e}") from None
        elif self.kind == "callable" and not self.fn:
            raise ConfigError(f"{key}.fn: a callable checker needs fn: module:function")
        elif self.kind == "model":
            if not self.path:
                raise ConfigError(f"{key}.path: a model checker needs a checkpoint path")
            if not Path(self.path).exists():
                raise ConfigError(f"{key}.path: path does not exist: {self.path}")
        if not math.isfinite(self.threshold):
            raise ConfigError(f"{key}.threshold must be finite, got {self.threshold}")


@dataclass
class CheckResult:
    violated: torch.Tensor  # [N] bool
    margin: torch.Tensor  # [N] float32: past the threshold (> 0 when violated), 1/0 for regex and bools


class Checker:
    """One constraint (see the module docstring); built by ``build_checker``."""

    def __init__(self, name: str, cfg: CheckerConfig) -> None:
        self.name, self.cfg = name, cfg
        self.regex = (
            re.compile(cfg.pattern, re.IGNORECASE if cfg.ignore_case else 0) if cfg.kind == "regex" else None
        )
        self.fn = None
        self.scorer: Any = None
        self.tokenizer: Any = None
        if cfg.kind == "callable":
            from tritonrlhf.engine.tasks import load_callable

            self.fn = load_callable(cfg.fn)

    def load_model(self, device: torch.device | None = None) -> None:
        """Load a model checker's checkpoint and tokenizer (kind checked before the weights)."""
        from tritonrlhf.engine.models import load_reward_model, load_tokenizer, require_checkpoint_kind
        from tritonrlhf.engine.rl.reward_route import TextRoute
        from tritonrlhf.engine.rl.scoring import RewardScorer

        key = f"checkers.{self.name}.path"
        config = require_checkpoint_kind(self.cfg.path, key, "seq_cls")
        self.tokenizer = load_tokenizer(self.cfg.path, role=key)
        limit = int(getattr(config, "max_position_embeddings", 0) or 0) or int(
            self.tokenizer.model_max_length
        )
        model = load_reward_model(self.cfg.path, torch.float32, "auto", device, role=key)
        # Through text, as a reward model with its own tokenizer scores (engine.rl.reward_route).
        route = TextRoute(self.tokenizer, limit, chat=self.cfg.chat_template)
        if self.cfg.chat_template and not self.tokenizer.chat_template:
            raise ConfigError(
                f"checkers.{self.name}.chat_template=true, but {self.cfg.path} has no chat template"
            )
        self.scorer = RewardScorer(model=model, text_route=route)

    def _numeric(self, values: Sequence[Any]) -> CheckResult:
        out = []
        for i, v in enumerate(values):
            if isinstance(v, bool):
                out.append((v, 1.0 if v else 0.0))
                continue
            try:
                x = float(v)
            except (TypeError, ValueError):
                x = math.nan
            if not math.isfinite(x):
                raise ValueError(
                    f"checker {self.name!r}: response {i} got {v!r}, not a bool or a finite number"
                )
            m = x - self.cfg.threshold if self.cfg.violation == "above" else self.cfg.threshold - x
            out.append((m > 0, m))
        return CheckResult(
            torch.tensor([o[0] for o in out], dtype=torch.bool),
            torch.tensor([o[1] for o in out], dtype=torch.float32),
        )

    def check(self, prompts: Sequence[str], responses: Sequence[str]) -> CheckResult:
        """``violated`` and ``margin`` ([N]) of each (prompt, response) pair."""
        if len(prompts) != len(responses):
            raise ValueError(f"checker {self.name!r}: {len(prompts)} prompts, {len(responses)} responses")
        if self.regex is not None:
            hits = torch.tensor([self.regex.search(r) is not None for r in responses], dtype=torch.bool)
            return CheckResult(hits, hits.float())
        if self.fn is not None:
            values = list(self.fn(list(prompts), list(responses)))
            if len(values) != len(responses):
                raise ValueError(
                    f"checker {self.name!r}: {len(values)} results for {len(responses)} responses"
                )
            return self._numeric(values)
        if self.scorer is None:
            self.load_model()
        return self._numeric(self._model_scores(prompts, responses).tolist())

    def _model_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """The model's scores; NaN (an error in ``_numeric``) where a text is too long for it."""
        scores, valid = self.scorer.score(list(prompts), list(responses))
        return torch.where(valid, scores, torch.full_like(scores, math.nan))


def build_checkers(cfgs: dict[str, CheckerConfig]) -> list[Checker]:
    """Checkers from the config mapping name -> ``CheckerConfig`` (validated first)."""
    if not cfgs:
        raise ConfigError("checkers: at least one constraint checker is needed (regex, callable or model)")
    for name, c in cfgs.items():
        c.validate(f"checkers.{name}")
    return [Checker(name, c) for name, c in cfgs.items()]
