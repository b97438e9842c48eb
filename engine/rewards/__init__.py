"""Reward functions for verifiable tasks, and how the engine calls them.

A reward function (``reward.function`` / ``reward.functions[].fn``, named ``"module:function"`` or
``"path/to/file.py:function"``) is called once per batch of finished samples:

```python
def reward(prompts: list[str], responses: list[str], answer: list[str], **kwargs) -> list[float | None]:
    ...
```

- ``prompts`` and ``responses`` are decoded texts, one per sample (a prompt repeats once per sample of
  its group).
- Every column of a prompt record other than ``prompt`` / ``messages`` (``answer``, ``tests``, any
  name) arrives as a keyword argument of that name holding one value per sample, as TRL passes
  dataset columns; so does ``finish_reasons`` (``"stop"`` or ``"length"``). A function receives the
  keywords it names, or all of them if it takes ``**kwargs``.
- It returns one score per sample; ``None`` or a non-finite value marks that sample's reward invalid
  (the trainer leaves it out). It may instead return a ``RewardBatch`` whose ``info`` (one dict per
  sample, e.g. the failing test case) is written to the samples log.
- An exception (or, in a worker pool, a timeout) makes that batch's rewards invalid, logged and
  counted (``reward/errors``, ``reward/timeouts``); it never stops the run.

Ready-made functions: ``tritonrlhf.engine.rewards.code:code_reward`` (the record's ``tests`` run
against the response's code in the sandbox, ``sandbox``), ``tritonrlhf.engine.rewards.math:math_reward``
(the final answer against the record's ``answer`` with math-verify). ``reward.kind=http`` scores over
HTTP (``http``; ``python -m tritonrlhf.engine.rewards.serve`` serves any reward function,
``python -m tritonrlhf.engine.rl.serve_reward`` a reward model). ``functions`` calls them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewardBatch:
    """A reward function's richer return value.

    scores: [B] one per sample; None (or NaN) = invalid.
    info:   [B] a JSON-serialisable dict per sample (or None), kept in ``samples.jsonl`` as ``reward_info``.
    """

    scores: list[float | None]
    info: list[dict[str, Any] | None] = field(default_factory=list)


class RewardError(RuntimeError):
    """A reward could not be computed for a whole batch (a remote service failed, a worker timed out)."""
