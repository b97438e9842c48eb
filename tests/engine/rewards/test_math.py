"""The math verifier: a table of equivalent and non-equivalent answers, timeouts, threads, the arithmetic set."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tritonrlhf.engine.models import ALPHABET
from tritonrlhf.engine.rewards import math as mr

# (response, gold answer, expected reward)
TABLE = [
    # fractions, decimals, LaTeX
    ("1/2", "0.5", 1.0),
    ("0.5", "1/2", 1.0),
    ("$\\frac{1}{2}$", "0.5", 1.0),
    ("\\frac{1}{2}", "1/2", 1.0),  # bare LaTeX, read whole
    ("2/4", "\\frac{1}{2}", 1.0),
    ("0.333333", "1/3", 1.0),  # compared rounded to 6 places
    ("0.333", "1/3", 0.0),
    ("0.6", "1/2", 0.0),
    # percentages: a percentage is its fraction; a gold percentage also accepts its bare number
    ("50%", "0.5", 1.0),
    ("0.5", "50%", 1.0),
    ("50", "50%", 1.0),
    ("50", "0.5", 0.0),
    # boxed answers, equations, radicals
    ("\\boxed{3}", "3", 1.0),
    ("so we get \\boxed{4}, and 3 is wrong", "4", 1.0),  # the box wins over the last number
    ("x=3", "3", 1.0),
    ("$x = 3$", "3", 1.0),
    ("3", "x=3", 1.0),
    ("$\\sqrt{8}$", "2\\sqrt{2}", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("$\\sqrt{7}$", "2\\sqrt{2}", 0.0),
    # sets and intervals
    ("$\\{2, 1\\}$", "\\{1,2\\}", 1.0),
    ("$\\{1, 3\\}$", "\\{1,2\\}", 0.0),
    ("$[0, 1)$", "[0,1)", 1.0),
    ("$[0, 1]$", "[0,1)", 0.0),
    # plain text: anchors, the last number
    ("The answer is 42.", "42", 1.0),
    ("I think 3 then 5, so the answer is 7", "7", 1.0),
    ("it is 12 and 7", "7", 1.0),
    ("the answer is 8, not 7", "7", 0.0),
    ("12.0", "12", 1.0),
    ("1,000", "1000", 1.0),
    ("7777", "7", 0.0),
    # unparsable or empty responses: 0, never an exception
    ("", "7", 0.0),
    ("no idea!", "7", 0.0),
    ("\\boxed{\\frac{", "7", 0.0),
    ("$$$$\\\\}{", "1/2", 0.0),
    # the answer column may hold numbers or a list of accepted answers
    ("7", 7, 1.0),
    ("0.25", 0.25, 1.0),
    ("$\\frac{1}{4}$", ["0.2", "1/4"], 1.0),
]


def test_table():
    responses, answers, expected = zip(*TABLE)
    got = mr.math_reward(["q"] * len(TABLE), list(responses), list(answers))
    wrong = [(r, a, e, g) for r, a, e, g in zip(responses, answers, expected, got) if g != e]
    assert not wrong, f"(response, answer, expected, got): {wrong}"


def test_missing_answer_is_invalid_and_lengths_checked():
    assert mr.math_reward(["q", "q", "q"], ["7", "7", "7"], [None, "", "7"]) == [None, None, 1.0]
    assert mr.math_reward([], [], []) == []
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        mr.math_reward(["a", "b"], ["1"], ["1"])


# sympy integrates this for minutes, in Python code a signal interrupts
SLOW = "\\boxed{\\int_0^1 e^{-x^2} \\sin(x^{10}) dx}"


def test_timeout_in_main_thread_scores_zero_and_restores_the_callers_timer(monkeypatch):
    mr._parsers()
    fired = []
    import signal

    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 30.0)  # a caller's own timer
    try:
        t0 = time.monotonic()
        got = mr.verify_answers([SLOW, "\\boxed{1}"], ["1", "1"], timeout_s=0.5)
        elapsed = time.monotonic() - t0
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert signal.getsignal(signal.SIGALRM) is not mr._raise_timeout
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert got == [0.0, 1.0]
    assert elapsed < 5.0
    assert 20.0 < remaining <= 30.0 and not fired


@pytest.mark.slow  # a second interpreter imports sympy and math-verify (seconds)
def test_from_a_worker_thread_uses_a_helper_process_with_the_same_timeout():
    out: dict = {}

    def work() -> None:
        try:
            t0 = time.monotonic()
            out["first"] = mr.verify_answers([SLOW, "\\boxed{1}", "1/2"], ["1", "1", "0.5"], timeout_s=0.5)
            out["t_first"] = time.monotonic() - t0
            out["again"] = mr.math_reward(["q"], ["x = 3"], ["3"])
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            out["error"] = e

    try:
        th = threading.Thread(target=work)
        th.start()
        th.join(120)
        assert not th.is_alive()
        assert "error" not in out, out.get("error")
        assert out["first"] == [0.0, 1.0, 1.0]
        assert out["again"] == [1.0]
        helper = mr._HELPER.proc
        assert helper is not None and helper.poll() is None  # reused, still up
    finally:
        mr._HELPER.close()
    assert helper.poll() is not None  # closed: no process left behind


def test_arithmetic_records_are_deterministic_in_the_toy_alphabet_and_verifiable(tmp_path):
    recs = mr.arithmetic_records(50, seed=3, ops=("add", "sub", "mul"))
    assert recs == mr.arithmetic_records(50, seed=3, ops=("add", "sub", "mul"))
    assert recs != mr.arithmetic_records(50, seed=4, ops=("add", "sub", "mul"))
    assert mr.arithmetic_records(2, seed=0)[0]["prompt"].startswith("add ")
    for r in recs:
        assert set(r["prompt"] + r["answer"]) <= set(ALPHABET), r
        op, a, b = r["prompt"].rstrip(":").split()
        assert (
            int(r["answer"]) == {"add": int(a) + int(b), "sub": int(a) - int(b), "mul": int(a) * int(b)}[op]
        )
    prompts = [r["prompt"] for r in recs[:5]]
    answers = [r["answer"] for r in recs[:5]]
    assert mr.math_reward(prompts, answers, answers) == [1.0] * 5
    assert mr.math_reward(prompts, [str(int(a) + 1) for a in answers], answers) == [0.0] * 5
    path = mr.write_arithmetic_jsonl(tmp_path / "d" / "arith.jsonl", 4, seed=1)
    assert [json.loads(line) for line in path.read_text().splitlines()] == mr.arithmetic_records(4, seed=1)
    with pytest.raises(ValueError, match="ops"):
        mr.arithmetic_records(3, 0, ops=("div",))
