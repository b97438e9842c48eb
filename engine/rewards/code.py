"""The coding-task reward: a response's code run against the record's ``tests`` in the sandbox.

``tests`` (one per sample, from the prompt record's column) takes one of these forms:

- **asserts**: a list of assert strings, each its own case run as ``code + "\\n" + assert``; or one
  string of Python appended to the code, split into one case per top-level ``assert`` when it holds
  nothing else (otherwise the whole string is one case);
- **stdin/stdout pairs**: a list of ``{"input": ..., "output": ...}`` (or APPS' ``{"inputs": [...],
  "outputs": [...]}``), the code run as a program on each input; its stdout must equal the expected
  output line for line, trailing whitespace and blank lines aside;
- any of the above as a JSON string (as datasets often store it).

The reward is the fraction of cases passed. ``info`` per sample carries ``passed``, ``total`` and the
first failing case (its input, what was expected, what came out and the stderr, each cut to
``_INFO_CHARS``), which the trainer writes to the samples log. A sample without tests scores None.

Every case is a separate program in its own sandboxed process (``SandboxPool``), so one case's crash
or infinite loop costs only that case.
"""

from __future__ import annotations

import ast
import json
import os
import re
import threading
from collections.abc import Callable
from typing import Any

from tritonrlhf.engine.rewards import RewardBatch
from tritonrlhf.engine.rewards.sandbox import SandboxConfig, SandboxPool, SandboxResult

_INFO_CHARS = 500
_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str:
    """The response's last ```python (or unlabelled) fenced block; the whole response if it has none."""
    blocks = _FENCE.findall(response)
    return blocks[-1][1] if blocks else response


def _cut(text: Any) -> str:
    text = text if isinstance(text, str) else json.dumps(text)
    return (
        text
        if len(text) <= _INFO_CHARS
        else text[:_INFO_CHARS] + f"... [{len(text) - _INFO_CHARS} more chars]"
    )


def _split_asserts(src: str) -> list[str]:
    """One case per top-level assert when ``src`` holds only asserts; else ``src`` as one case."""
    try:
        body = ast.parse(src).body
    except SyntaxError:
        return [src]
    if body and all(isinstance(node, ast.Assert) for node in body):
        return [ast.get_source_segment(src, node) or ast.unparse(node) for node in body]
    return [src]


def parse_tests(tests: Any) -> list[dict[str, str]]:
    """Normalise a record's ``tests`` into cases: ``{"assert": src}`` or ``{"input", "output"}``."""
    if isinstance(tests, str):
        stripped = tests.strip()
        if stripped[:1] in "[{":
            try:
                return parse_tests(json.loads(stripped))
            except (json.JSONDecodeError, ValueError):
                pass
        return [{"assert": case} for case in _split_asserts(tests)] if stripped else []
    if isinstance(tests, dict):
        if "inputs" in tests and "outputs" in tests:
            return [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
        if "input" in tests and "output" in tests:
            return [{"input": tests["input"], "output": tests["output"]}]
        raise ValueError(f"tests dict needs input/output or inputs/outputs keys, got {sorted(tests)}")
    if isinstance(tests, (list, tuple)):
        cases = []
        for case in tests:
            if isinstance(case, str):
                cases.append({"assert": case})
            elif isinstance(case, dict) and "input" in case and "output" in case:
                cases.append({"input": str(case["input"]), "output": str(case["output"])})
            else:
                raise ValueError(
                    f"a test case must be an assert string or an input/output dict, got {case!r:.80}"
                )
        return cases
    if tests is None:
        return []
    raise ValueError(f"unsupported tests of type {type(tests).__name__}")


def _normalise(out: str) -> list[str]:
    return [line.rstrip() for line in out.strip().splitlines()]


def _program(code: str, case: dict[str, str]) -> tuple[str, str]:
    if "assert" in case:
        return code + "\n\n" + case["assert"] + "\n", ""
    return code, case["input"]


def _passed(case: dict[str, str], result: SandboxResult) -> bool:
    if not result.ok:
        return False
    return "assert" in case or _normalise(result.stdout) == _normalise(case["output"])


def _failure(index: int, case: dict[str, str], result: SandboxResult) -> dict[str, Any]:
    failure: dict[str, Any] = {"case": index}
    if "assert" in case:
        failure["test"] = _cut(case["assert"])
    else:
        failure.update(input=_cut(case["input"]), expected=_cut(case["output"]), got=_cut(result.stdout))
    failure.update(
        stderr=_cut(result.stderr[-_INFO_CHARS:]),
        returncode=result.returncode,
        timed_out=result.timed_out,
        output_limited=result.output_limited,
    )
    return failure


def make_code_reward(
    cfg: SandboxConfig | None = None, workers: int | None = None
) -> Callable[..., RewardBatch]:
    """A coding reward function whose sandbox runs under ``cfg`` with ``workers`` warm workers.

    The pool starts on the first call (and again in a forked child process, which must not share
    its parent's workers) and stops at interpreter exit.
    """
    cfg = cfg or SandboxConfig()
    state: dict[str, Any] = {"pool": None, "pid": None}
    lock = threading.Lock()

    def pool() -> SandboxPool:
        with lock:
            if state["pool"] is None or state["pid"] != os.getpid():
                state["pool"], state["pid"] = SandboxPool(cfg, workers), os.getpid()
                import atexit

                atexit.register(state["pool"].close)
            return state["pool"]

    def code_reward(prompts: list[str], responses: list[str], tests: list[Any], **kwargs: Any) -> RewardBatch:
        """Fraction of each sample's ``tests`` its response's code passes (see the module docstring)."""
        per_sample: list[list[dict[str, str]] | None] = []
        programs: list[tuple[str, str]] = []
        for response, sample_tests in zip(responses, tests):
            try:
                cases = parse_tests(sample_tests)
            except ValueError:
                cases = None
            per_sample.append(cases)
            code = extract_code(response)
            programs.extend(_program(code, case) for case in cases or [])
        results = pool().map(programs) if programs else []

        scores: list[float | None] = []
        infos: list[dict[str, Any] | None] = []
        at = 0
        for cases in per_sample:
            if not cases:
                scores.append(None)
                infos.append({"error": "no usable tests"})
                continue
            mine, at = results[at : at + len(cases)], at + len(cases)
            passed = [_passed(case, r) for case, r in zip(cases, mine)]
            first = next((i for i, ok in enumerate(passed) if not ok), None)
            scores.append(sum(passed) / len(cases))
            infos.append(
                {
                    "passed": sum(passed),
                    "total": len(cases),
                    "first_failure": None if first is None else _failure(first, cases[first], mine[first]),
                }
            )
        return RewardBatch(scores=scores, info=infos)

    return code_reward


code_reward = make_code_reward()
"""The coding reward with the default ``SandboxConfig`` and one worker per CPU core."""
