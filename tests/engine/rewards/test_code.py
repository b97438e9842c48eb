"""The coding reward: fraction of the record's tests passed, the first failing case in info."""

from __future__ import annotations

import pytest

from tritonrlhf.engine.rewards import RewardBatch
from tritonrlhf.engine.rewards.code import extract_code, make_code_reward, parse_tests
from tritonrlhf.engine.rewards.sandbox import SandboxConfig, SandboxUnavailable, check_isolation

CFG = SandboxConfig(cpu_s=2, wall_s=2.0, memory_mb=512, max_procs=16, output_bytes=4096)

ADD_OK = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
ADD_HALF = "```python\ndef add(a, b):\n    return a + b if a > 0 else 1\n```"
ADD_BAD = "```python\ndef add(a, b):\n    return a - b\n```"
ASSERTS = [
    "assert add(1, 2) == 3",
    "assert add(2, 2) == 4",
    "assert add(-1, 1) == 0",
    "assert add(-2, -3) == -5",
]

ECHO_OK = "```py\nn = int(input())\nprint(n * 2)\n```"
ECHO_HALF = "n = int(input())\nprint(n * 2 if n < 10 else n)"
ECHO_LOOP = "```python\nwhile True:\n    pass\n```"
PAIRS = [
    {"input": "1\n", "output": "2\n"},
    {"input": "3\n", "output": "6"},
    {"input": "10\n", "output": "20\n"},
]


@pytest.fixture(scope="module")
def reward():
    try:
        check_isolation(CFG)
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox on this machine: {e}")
    return make_code_reward(CFG, workers=2)


def test_extract_code():
    assert extract_code(ADD_OK) == "def add(a, b):\n    return a + b\n"
    assert extract_code("```\nprint(1)\n```\n```python\nprint(2)\n```") == "print(2)\n"
    assert extract_code("print(3)") == "print(3)"


def test_parse_tests_forms():
    assert parse_tests("assert f(1) == 1\nassert f(2) == 2") == [
        {"assert": "assert f(1) == 1"},
        {"assert": "assert f(2) == 2"},
    ]
    setup = "import math\nassert f(1) == math.pi"
    assert parse_tests(setup) == [{"assert": setup}]
    assert parse_tests('[{"input": "1", "output": "2"}]') == [{"input": "1", "output": "2"}]
    assert parse_tests({"inputs": ["1", "2"], "outputs": ["2", "4"]}) == [
        {"input": "1", "output": "2"},
        {"input": "2", "output": "4"},
    ]
    assert parse_tests(None) == [] and parse_tests("") == []


def test_assert_style_pass_partial_fail(reward):
    out = reward(
        ["p"] * 4, [ADD_OK, ADD_HALF, ADD_BAD, ADD_OK], tests=[ASSERTS, ASSERTS, ASSERTS, "\n".join(ASSERTS)]
    )
    assert isinstance(out, RewardBatch)
    assert out.scores == [1.0, 0.5, 0.0, 1.0]
    assert out.info[0] == {"passed": 4, "total": 4, "first_failure": None}
    failure = out.info[1]["first_failure"]
    assert failure["case"] == 2 and failure["test"] == "assert add(-1, 1) == 0"
    assert "AssertionError" in failure["stderr"] and failure["returncode"] == 1


def test_stdio_pass_partial_fail_with_timeout(reward):
    out = reward(["p"] * 3, [ECHO_OK, ECHO_HALF, ECHO_LOOP], tests=[PAIRS] * 3)
    assert out.scores == [1.0, pytest.approx(2 / 3), 0.0]
    half = out.info[1]["first_failure"]
    assert half == {
        "case": 2,
        "input": "10\n",
        "expected": "20\n",
        "got": "10\n",
        "stderr": "",
        "returncode": 0,
        "timed_out": False,
        "output_limited": False,
    }
    assert out.info[2]["first_failure"]["timed_out"] or out.info[2]["first_failure"]["returncode"] < 0


def test_missing_tests_invalid_and_long_output_cut(reward):
    flood = "print('y' * 100000)"
    out = reward(["p", "p"], [ECHO_OK, flood], tests=[None, [{"input": "", "output": "n"}]])
    assert out.scores[0] is None and out.info[0] == {"error": "no usable tests"}
    got = out.info[1]["first_failure"]["got"]
    assert out.scores[1] == 0.0 and len(got) < 600 and got.endswith("more chars]")
