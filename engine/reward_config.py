"""The ``reward`` section of every stage's config: functions (``module:function`` or an HTTP
endpoint, with weights, a worker pool and a timeout), a reward model, or a service over HTTP.
Re-exported by ``engine/config.py``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tritonrlhf.engine.config_loader import ConfigError, check_positive


def is_url(spec: str) -> bool:
    """Whether a reward spec names an HTTP endpoint rather than ``module:function``."""
    return spec.startswith(("http://", "https://"))


def _function_name(spec: str) -> str:
    """The default ``reward/<name>`` of a spec: the function's name, or ``http`` for an endpoint."""
    return "http" if is_url(spec) else spec.rsplit(":", 1)[-1]


@dataclass
class RewardFunctionConfig:
    """One of ``reward.functions``: a ``module:function`` (or ``file.py:function``, or an ``http(s)://``
    endpoint speaking ``tritonrlhf.engine.rewards.http``'s protocol), its weight in the sum, and the
    name of its ``reward/<name>`` metric (default: the function's name; ``http`` for an endpoint)."""

    fn: str = ""
    weight: float = 1.0
    name: str = ""


@dataclass
class HttpRewardConfig:
    """``reward.kind=http``: how batches are posted to ``reward.url``
    (``tritonrlhf.engine.rewards.http.HttpReward``). ``auth_env`` names an environment variable whose
    value is sent as ``Authorization: Bearer ...``; the token itself is never written anywhere."""

    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.5
    max_concurrency: int = 4
    batch_size: int = 64
    auth_env: str = ""


@dataclass
class RewardConfig:
    """The frozen reward: Python callables ``module:function``, a sequence-classification model, or a
    service over HTTP (``tritonrlhf.engine.rewards``: the columns of each prompt record reach a
    function as keyword arguments)."""

    kind: str = "function"  # function | model | http
    function: str = "tritonrlhf.engine.tasks:toy_reward"
    # Several weighted functions instead of ``function`` (TRL's reward_funcs + reward_weights):
    # [{fn: module:function, weight: 1.0, name: ...}, ...]; each logged as reward/<name>.
    functions: list[RewardFunctionConfig] = field(default_factory=list)
    # Functions run in this many worker processes (0: in the trainer's process), each batch within
    # timeout_s (pool only); an exception or a timeout makes that batch's rewards invalid, counted.
    workers: int = 0
    timeout_s: float = 60.0
    url: str = ""  # kind=http: where batches are posted
    http: HttpRewardConfig = field(default_factory=HttpRewardConfig)

    model_path: str = ""
    clip: float = 10.0  # scores are clipped to [-clip, clip]; 0 disables
    # Responses cut at rollout.max_new_tokens (no stop token): subtract this from their score
    # (TRL's missing_eos_penalty; 0: off), and score them ("score") or leave them out of the loss
    # ("mask": they still count in their group's baseline).
    missing_eos_penalty: float = 0.0
    on_truncated: str = "score"
    # How a reward model reads samples: auto (its own tokenizer differs from the policy's ->
    # re-tokenized text, else the policy's ids), policy (always the ids), own (always text).
    tokenizer: str = "auto"
    # The text route's layout: auto (the one the RM was trained in: the rm stage records plain in its
    # checkpoint; chat prompts and RMs trained elsewhere take the RM's chat template where it has one),
    # plain (<bos> prompt response <eos> for every sample) or chat (the RM's chat template for every sample).
    layout: str = "auto"

    def validate(self, prefix: str = "reward") -> None:
        """The function / functions / http keys agree; raises ConfigError naming the key."""
        default_fn = type(self)().function
        if self.functions and self.function != default_fn:
            raise ConfigError(f"{prefix}.function and {prefix}.functions are both set: give one")
        for i, f in enumerate(self.functions):
            if not f.fn:
                raise ConfigError(
                    f"{prefix}.functions[{i}].fn is empty (want 'module:function' or an http(s):// URL)"
                )
            if not math.isfinite(f.weight):
                raise ConfigError(f"{prefix}.functions[{i}].weight must be finite, got {f.weight}")
        if self.workers < 0:
            raise ConfigError(f"{prefix}.workers must be >= 0, got {self.workers}")
        check_positive(f"{prefix}.timeout_s", self.timeout_s)
        if self.kind == "http" or any(is_url(f.fn) for f in self.functions):
            if self.kind == "http" and not is_url(self.url):
                raise ConfigError(
                    f"{prefix}.kind=http needs {prefix}.url=http(s)://host:port/..., got {self.url!r}"
                )
            h = self.http
            check_positive(f"{prefix}.http.timeout_s", h.timeout_s)
            if h.retries < 0 or h.max_concurrency < 1 or h.batch_size < 1 or h.backoff_s < 0:
                raise ConfigError(
                    f"{prefix}.http: retries >= 0, backoff_s >= 0, max_concurrency >= 1 and batch_size >= 1, got {h}"
                )

    def terms(self) -> list[tuple[str, str, float]]:
        """``(name, spec, weight)`` of each function (kind=function); a spec is ``module:function``
        or an ``http(s)://`` endpoint (``HttpReward`` with ``reward.http``'s options)."""
        if not self.functions:
            return [(self.function.rsplit(":", 1)[-1], self.function, 1.0)]
        return [(f.name or _function_name(f.fn), f.fn, f.weight) for f in self.functions]
