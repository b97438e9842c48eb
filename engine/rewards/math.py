"""A math reward: the response's final answer against the record's ``answer``, checked with math-verify.

``math_reward(prompts, responses, answer)`` scores 1.0 when the final answer of a response equals
the record's ``answer`` symbolically, else 0.0. Extraction and comparison are math-verify's
(``parse`` / ``verify``, the verifier behind open-r1 and lighteval):

- the final answer is the last ``\\boxed{...}`` if there is one, else the answer after an anchor
  ("the final answer is", "answer:"), else the last LaTeX expression or plain number/expression
  of the text ("so it is 12 and 7" gives 7);
- equivalence is symbolic and numeric: ``1/2``, ``0.5``, ``\\frac{1}{2}`` and ``2/4`` are equal;
  ``2\\sqrt{2}`` equals ``\\sqrt{8}``; ``x=3`` equals ``3``; sets compare unordered and intervals
  by their ends; decimals are compared rounded to 6 places (``0.333333`` is ``1/3``, ``0.333`` is
  not); ``1,000`` is 1000.
- percentages: ``50%`` equals ``0.5`` (a percentage is its fraction), and where the gold answer
  itself is a percentage the bare number (``50`` for ``50%``) also counts, as math-verify decides.
  A bare ``50`` against a gold ``0.5`` is wrong.
- a gold answer is read as LaTeX (``$...$`` is added when it has no delimiters), so a record can
  hold ``\\frac{1}{2}``, ``[0,1)`` or ``\\{1,2\\}`` as well as ``0.5``; a list of answers accepts any.

A response that cannot be parsed scores 0 (never an exception); a comparison that runs past
``TIMEOUT_S`` scores 0 too (not invalid: a response must not escape its penalty by being slow to
check); a record without an answer scores None (invalid).

The timeout: math-verify's own timeouts use ``signal.alarm``, which only works in a process's main
thread, so they are switched off here. In the main thread each sample's parse and comparison run
under our own ``SIGALRM`` interval timer (``TIMEOUT_S``, fractional seconds; any timer and handler
the caller had are restored). Called from any other thread (an HTTP server's handler, a thread
pool), the batch is sent to a helper process (a fresh interpreter started once per process and
reused, one batch at a time; a forked child starts its own) whose main thread applies the same
per-sample timer. A helper that stops answering (a C-level computation that no signal interrupts)
is killed after the whole batch's bound, and that batch raises ``RewardError``. A main-thread
caller's own ``SIGALRM`` timer keeps its time, but one that falls due during a check fires just after it.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tritonrlhf.engine.rewards import RewardError

TIMEOUT_S = 5.0  # per sample: parsing the response and comparing it with the answer
_HELPER_START_S = 120.0  # the helper's first batch also pays the import of sympy and math-verify


class _Timeout(BaseException):
    """Raised by our SIGALRM handler; a BaseException so math-verify's ``except Exception`` lets it through."""


# --------------------------------------------------------------------------- one comparison
def _parsers() -> tuple[Any, Any]:
    """math-verify's ``parse`` and ``verify``, imported on first use (sympy takes seconds to import)."""
    import math_verify
    from math_verify import grader, parser

    # We pass timeouts of None (their signal-based timer cannot run outside the main thread) and time
    # out ourselves: silence the warning that says so.
    grader.TIMEOUT_WARNING_SHOWN = parser.TIMEOUT_WARNING_SHOWN = True
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify.parse, math_verify.verify


def _parse_gold(answer: str) -> list[Any]:
    """The gold answer's parses: as LaTeX first (delimiters added when it has none), else as written."""
    parse, _ = _parsers()
    text = answer.strip()
    if "$" not in text and "\\boxed" not in text and "\\(" not in text and "\\[" not in text:
        gold = parse(f"${text}$", parsing_timeout=None)
        if gold:
            return gold
    return parse(text, parsing_timeout=None)


def _parse_response(response: str) -> list[Any]:
    """The response's final answer parses; a short bare LaTeX response (``\\sqrt{8}``) is read whole."""
    parse, _ = _parsers()
    found = parse(response, parsing_timeout=None)
    text = response.strip()
    if not found and text and len(text) <= 200 and "$" not in text:
        found = parse(f"${text}$", parsing_timeout=None)
    return found


def is_equivalent(response: str, answer: Any) -> bool:
    """Whether ``response``'s final answer equals ``answer`` (one value or a list of accepted values).

    No timeout here (see ``verify_answers``); never raises on unparsable text (False).
    """
    _, verify = _parsers()
    golds = answer if isinstance(answer, (list, tuple)) else [answer]
    found = _parse_response(str(response))
    if not found:
        return False
    for g in golds:
        gold = _parse_gold(str(g))
        if gold and verify(gold, found, timeout_seconds=None):
            return True
    return False


def _verify_with_alarm(response: str, answer: Any, timeout_s: float) -> float:
    """1.0 / 0.0 for one sample under a SIGALRM timer of ``timeout_s``; main thread only."""
    old_handler = signal.signal(signal.SIGALRM, _raise_timeout)
    old_delay, _ = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    start = time.monotonic()
    try:
        try:
            return 1.0 if is_equivalent(response, answer) else 0.0
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)  # disarmed inside the try that catches _Timeout
    except _Timeout:
        return 0.0
    except Exception:  # noqa: BLE001 - whatever sympy raises on odd input is a wrong answer, not a crash
        return 0.0
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # the caller's own timer, less the time we took
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-3))


def _raise_timeout(signum: int, frame: Any) -> None:
    raise _Timeout


def _score_in_main_thread(
    responses: Sequence[str], answers: Sequence[Any], timeout_s: float
) -> list[float | None]:
    _parsers()  # the first import takes seconds: not inside a sample's timer
    return [None if _missing(a) else _verify_with_alarm(r, a, timeout_s) for r, a in zip(responses, answers)]


def _missing(answer: Any) -> bool:
    return answer is None or (isinstance(answer, str) and not answer.strip()) or answer == []


# --------------------------------------------------------------------------- the helper process
def _helper_main(fd: int) -> None:
    """The helper's loop on the socket ``fd``: (responses, answers, timeout_s) in, scores out, in its main thread."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        responses, answers, timeout_s = job
        conn.send(_score_in_main_thread(responses, answers, timeout_s))


class _Helper:
    """One helper process per calling process, started on first use, one batch at a time.

    A fresh interpreter (``python -c``, not multiprocessing's spawn, which would re-run the
    caller's ``__main__``) talks over a socket pair; it exits when the parent's end closes.
    """

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """Drop the helper without stopping it: in a forked child, whose parent still owns it."""
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.conn: Any = None

    def score(self, responses: list[str], answers: list[Any], timeout_s: float) -> list[float | None]:
        with self.lock:
            first = self.proc is None or self.proc.poll() is not None
            if first:
                self._start()
            bound = len(responses) * timeout_s * 2 + 5.0 + (_HELPER_START_S if first else 0.0)
            try:
                self.conn.send((responses, answers, timeout_s))
                if self.conn.poll(bound):
                    return self.conn.recv()
            except (EOFError, OSError) as e:
                self._kill()
                raise RewardError(f"math_reward: the verifier's helper process died ({e!r})") from e
            self._kill()
            raise RewardError(
                f"math_reward: the verifier's helper process gave no answer for {len(responses)} samples "
                f"in {bound:.0f} s (a comparison no signal could interrupt); killed, restarted on the next batch"
            )

    def _start(self) -> None:
        from multiprocessing.connection import Connection

        import tritonrlhf

        self._kill()
        ours, theirs = socket.socketpair()
        root = str(Path(tritonrlhf.__file__).resolve().parents[1])  # where ``tritonrlhf`` imports from
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        code = f"from tritonrlhf.engine.rewards.math import _helper_main; _helper_main({theirs.fileno()})"
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()], env=env)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())

    def _kill(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = self.conn = None

    def close(self) -> None:
        """Stop the helper (tests, exit)."""
        with self.lock:
            self._kill()


_HELPER = _Helper()
atexit.register(_HELPER.close)
os.register_at_fork(after_in_child=_HELPER.forget)


# --------------------------------------------------------------------------- the reward function
def verify_answers(
    responses: Sequence[str], answers: Sequence[Any], timeout_s: float = TIMEOUT_S
) -> list[float | None]:
    """[B] 1.0 / 0.0 per (response, answer) pair, None where the answer is missing.

    ``timeout_s`` bounds each sample's parse and comparison (0.0 past it). Works from any thread:
    off the main thread the batch runs in a helper process (see the module docstring).
    """
    if len(responses) != len(answers):
        raise ValueError(f"math_reward: {len(responses)} responses but {len(answers)} answers")
    if not responses:
        return []
    if threading.current_thread() is threading.main_thread():
        return _score_in_main_thread(list(responses), list(answers), timeout_s)
    return _HELPER.score([str(r) for r in responses], list(answers), timeout_s)


def math_reward(
    prompts: list[str], responses: list[str], answer: list[Any], **kwargs: Any
) -> list[float | None]:
    """The reward function for math records (``reward.function: tritonrlhf.engine.rewards.math:math_reward``).

    [B] 1.0 when a response's final answer equals its record's ``answer`` column, 0.0 when it does
    not (or cannot be parsed, or the check runs past ``TIMEOUT_S``), None when the record has no answer.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"math_reward: {len(prompts)} prompts but {len(responses)} responses")
    return verify_answers(responses, answer)


# --------------------------------------------------------------------------- a generated task
_OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}


def arithmetic_records(
    n: int, seed: int, ops: Sequence[str] = ("add",), max_operand: int = 9
) -> list[dict[str, str]]:
    """``n`` records ``{"prompt": "add 3 4:", "answer": "7"}`` for a verifiable demo task.

    Written in the toy tokenizer's alphabet (lowercase words, digits, spaces, ``:``), so a tiny
    policy can read and write them. ``ops`` from add, sub (``a >= b``, no negatives), mul; operands
    in ``[0, max_operand]``. Deterministic in ``seed``; the global ``random`` state is untouched.
    """
    if n <= 0:
        raise ValueError(f"arithmetic_records: n must be > 0, got {n}")
    unknown = [op for op in ops if op not in _OPS]
    if not ops or unknown:
        raise ValueError(
            f"arithmetic_records: ops must be a non-empty subset of {list(_OPS)}, got {list(ops)}"
        )
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        op = rng.choice(list(ops))
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if op == "sub" and a < b:
            a, b = b, a
        records.append({"prompt": f"{op} {a} {b}:", "answer": str(_OPS[op](a, b))})
    return records


def write_arithmetic_jsonl(path: str | Path, n: int, seed: int, **kwargs: Any) -> Path:
    """Write ``arithmetic_records(n, seed, **kwargs)`` to ``path`` as JSON lines; returns the path."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for rec in arithmetic_records(n, seed, **kwargs):
            f.write(json.dumps(rec) + "\n")
    return path
