"""Tasks with verifiable rewards, and the loader for reward callables named in config.

A reward callable has the signature ``fn(prompts: list[str], responses: list[str], **columns) -> list[float]``
(one score per pair, responses decoded without special tokens; the prompt record's other columns and
``finish_reasons`` as keyword arguments where it takes them: ``tritonrlhf.engine.rewards``) and is
named in config as ``"module:function"`` (or ``"path/to/file.py:function"``).

The toy task ("say"): each prompt ends ``say <c>:`` for a target letter ``c`` drawn
from ``TOY_TARGETS``; the reward is the fraction of response characters equal to
``c``. It is dense (every character counts), bounded in [0, 1], deterministic, and
climbable from a random tiny model in two stages a few PPO steps apart:
  1. an unconditional shift of the output distribution onto the few target letters
     lifts the mean reward from about 1/64 to about 1/len(TOY_TARGETS);
  2. copying the letter at a fixed offset from the end of the prompt (two positions
     back) takes it towards 1, which one attention head can learn.
Emitting <eos> at once gives an empty response and reward 0, so stopping early is
not a shortcut.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

from tritonrlhf.engine.config import ConfigError

RewardFn = Callable[[list[str], list[str]], list[float]]

TOY_TARGETS = "abcd"
_SAY = re.compile(r"say (\S):")


def toy_prompts(n: int, seed: int) -> list[str]:
    """``n`` toy prompts like ``"7 2 say b:"``: 0-3 random digits (filler), then the instruction.

    Deterministic in ``seed``; the global ``random`` state is untouched.
    """
    if n <= 0:
        raise ValueError(f"toy_prompts: n must be > 0, got {n}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        filler = " ".join(rng.choice("0123456789") for _ in range(rng.randint(0, 3)))
        target = rng.choice(TOY_TARGETS)
        out.append(f"{filler} say {target}:".lstrip())
    return out


def toy_target(prompt: str) -> str:
    """The character the toy reward asks for: ``c`` in the last ``say c:``, else the last alphanumeric."""
    found = _SAY.findall(prompt)
    if found:
        return found[-1]
    for ch in reversed(prompt):
        if ch.isalnum():
            return ch
    raise ValueError(f"toy_reward: prompt has no target character: {prompt!r}")


def toy_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of each response's characters equal to its prompt's target, in [0, 1].

    Case-insensitive (the toy tokenizer lowercases); an empty response scores 0.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"toy_reward: {len(prompts)} prompts but {len(responses)} responses")
    scores = []
    for prompt, response in zip(prompts, responses):
        target = toy_target(prompt).lower()
        text = response.lower()
        scores.append(text.count(target) / len(text) if text else 0.0)
    return scores


def target_reward(prompts: list[str], responses: list[str], target: list[str], **kwargs) -> list[float]:
    """``toy_reward`` from the ground-truth column instead of the prompt's text: the fraction of each
    response's characters equal to its record's ``target`` (the toy prompts carry it; a JSONL of
    ``{"prompt": ..., "target": "b"}`` records does too). The same values as ``toy_reward`` on toy
    prompts; the way a verifiable task's reward reads its answer column."""
    if not len(prompts) == len(responses) == len(target):
        raise ValueError(
            f"target_reward: {len(prompts)} prompts, {len(responses)} responses, {len(target)} targets"
        )
    out = []
    for response, want in zip(responses, target):
        text, want = response.lower(), str(want).lower()
        out.append(text.count(want) / len(text) if text else 0.0)
    return out


def stopped(prompts: list[str], responses: list[str], finish_reasons: list[str]) -> list[float]:
    """1 for a response that ended with its stop token, 0 for one cut at ``rollout.max_new_tokens``."""
    return [float(r == "stop") for r in finish_reasons]


def load_callable(spec: str) -> RewardFn:
    """Import ``"module:function"`` or ``"path/to/file.py:function"``; ConfigError if it cannot.

    Call this at start-up, before any rollout, so a typo fails in seconds.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"reward function must look like 'module:function', got {spec!r}")
    module_name, attr = spec.split(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"reward function {spec!r}: file does not exist: {path}")
        mod_spec = importlib.util.spec_from_file_location(f"_reward_{path.stem}", path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - any import failure is a config error
            raise ConfigError(f"reward function {spec!r}: importing {path} failed: {e!r}") from e
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"reward function {spec!r}: cannot import module {module_name!r}: {e}") from e
        except Exception as e:  # noqa: BLE001 - the module raised while importing
            raise ConfigError(f"reward function {spec!r}: importing {module_name!r} failed: {e!r}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ConfigError(
            f"reward function {spec!r}: module {module_name!r} has no {attr!r} (callables: {names})"
        )
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {attr!r} is not callable")
    return fn
