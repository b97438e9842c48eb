"""HttpReward against the real server (a function, a tiny reward model) and against misbehaving servers.

Everything runs on 127.0.0.1; every process a test starts is killed before it ends.
"""

from __future__ import annotations

import json
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.engine._scripts.launch import REPO, Launch, free_port, start_reward_server
from tritonrlhf.engine.rewards import RewardBatch, RewardError
from tritonrlhf.engine.rewards.http import HttpReward
from tritonrlhf.engine.rewards.serve import call_reward

TOKEN = "s3cret-token-0123456789"
TOKEN_ENV = "TEST_REWARD_TOKEN"
FN = f"{REPO}/tests/engine/_scripts/reward_fns.py:echo_reward"


def _serve(tmp: Path, *args: str, port: int | None = None, name: str = "serve", **env: str):
    return start_reward_server(tmp, *args, port=port, name=name, **env)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[tuple[Launch, str]]:
    launch, url = _serve(
        tmp_path_factory.mktemp("srv"), "--function", FN, "--auth-env", TOKEN_ENV, **{TOKEN_ENV: TOKEN}
    )
    yield launch, url
    launch.kill_group()


# --------------------------------------------------------------------------- the real server
def test_function_server_scores_in_order_across_concurrent_chunks(auth_server, monkeypatch):
    launch, url = auth_server
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    client = HttpReward(url, batch_size=2, max_concurrency=3, auth_env=TOKEN_ENV, timeout_s=10)
    prompts = [f"p{i}" for i in range(7)]
    responses = ["a", "bb", "invalid", "ccc", "7", "dddd", "x"]
    answers = ["z", "z", "z", "z", "7", "z", "z"]
    reasons = ["stop", "length"] * 3 + ["stop"]
    out = client(prompts, responses, finish_reasons=reasons, answer=answers)
    assert isinstance(out, RewardBatch)
    assert out.scores == [1.0, 2.0, None, 3.0, 101.0, 4.0, 1.0]
    assert out.info == [{"prompt": p, "answer": a, "finish": f} for p, a, f in zip(prompts, answers, reasons)]
    assert client([], [], answer=[]).scores == []
    # a fresh client per call is cheap; one holding no token pickles (a process pool can take it)
    assert pickle.loads(pickle.dumps(client)).url == url


def test_401_without_the_token_is_not_retried_and_the_token_never_shows(auth_server, monkeypatch):
    launch, url = auth_server
    errors = []
    for env_value in (None, "wrong-token"):
        if env_value is None:
            monkeypatch.delenv(TOKEN_ENV, raising=False)
        else:
            monkeypatch.setenv(TOKEN_ENV, env_value)
        client = HttpReward(url, auth_env=TOKEN_ENV, retries=3, backoff_s=5.0)
        t0 = time.monotonic()
        with pytest.raises(RewardError) as e:
            client(["p"], ["r"], answer=["a"])
        assert time.monotonic() - t0 < 3.0  # no backoff: a 4xx is final
        errors.append(str(e.value))
    assert "not set" in errors[0] and TOKEN_ENV in errors[0]
    assert "401" in errors[1]
    no_auth = HttpReward(url)
    with pytest.raises(RewardError, match="401"):
        no_auth(["p"], ["r"], answer=["a"])
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    client = HttpReward(url, auth_env=TOKEN_ENV, headers={"X-Extra": "value"})
    assert client(["p"], ["r"], answer=["r"]).scores == [101.0]
    shown = " ".join([repr(client), str(vars(client)), *errors, launch.output])
    assert TOKEN not in shown and TOKEN not in pickle.dumps(client).decode("latin-1")
    assert "auth_env='TEST_REWARD_TOKEN'" in repr(client) and "value" not in repr(client)


def test_a_server_that_dies_mid_run_fails_that_batch_then_the_client_recovers(tmp_path):
    launch, url = _serve(tmp_path, "--function", FN, name="first")
    port = launch.port
    client = HttpReward(url, timeout_s=20, retries=2, backoff_s=0.2)
    try:
        assert client(["p"], ["ok"], answer=["ok"]).scores == [102.0]
        failure: dict = {}

        def score_slow() -> None:
            t0 = time.monotonic()
            try:
                client(["p", "q"], ["slow", "x"], answer=["a", "b"])
            except RewardError as e:
                failure["error"] = e
            failure["seconds"] = time.monotonic() - t0

        th = threading.Thread(target=score_slow)
        th.start()
        deadline = time.monotonic() + 20
        while "slow sample: sleeping" not in launch.output and time.monotonic() < deadline:
            time.sleep(0.05)  # until the slow request is inside the function
        launch.kill_group()
        th.join(30)
        assert not th.is_alive()
        assert isinstance(failure.get("error"), RewardError), failure
        assert "3 tries" in str(failure["error"]) and failure["seconds"] < 10
    finally:
        launch.kill_group()
    again, _ = _serve(tmp_path, "--function", FN, port=port, name="second")
    try:
        assert client(["p"], ["back"], answer=["back"]).scores == [104.0]
    finally:
        again.kill_group()


@pytest.mark.slow  # torch and transformers load in the server (seconds)
def test_reward_model_server_matches_the_in_process_scorer(tmp_path):
    from tritonrlhf.engine.config import TinyModelConfig
    from tritonrlhf.engine.models import build_tiny_reward_model, build_tokenizer, save_tokenizer
    from tritonrlhf.engine.rl.serve_reward import reward_model_fn

    rm_dir = tmp_path / "rm"
    tok = build_tokenizer()
    build_tiny_reward_model(tok, TinyModelConfig(max_position_embeddings=64), seed=0).save_pretrained(rm_dir)
    save_tokenizer(tok, rm_dir)
    launch, url = _serve(tmp_path, "--reward-model", str(rm_dir), name="rm")
    try:
        prompts = ["add 1 2:", "say a:", "add 3 4:"]
        responses = ["3", "aaaa", "x" * 100]  # the last is longer than the model's 64 positions
        served = HttpReward(url, batch_size=2)(prompts, responses, finish_reasons=["stop", "length", "stop"])
    finally:
        launch.kill_group()
    local = reward_model_fn(str(rm_dir))(prompts, responses, ["stop", "length", "stop"])
    assert served.scores[2] is None and local[2] is None
    assert served.scores[:2] == pytest.approx(local[:2], abs=1e-5)
    assert served.scores[0] != served.scores[1]


# --------------------------------------------------------------------------- misbehaving servers
class _Stub:
    """An in-process server whose every POST is answered by ``behave(handler, request_number)``."""

    def __init__(self, behave: Callable[[BaseHTTPRequestHandler, int], None]) -> None:
        self.requests = 0
        self.release = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.requests += 1
                behave(self, stub.requests)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def _reply(h: BaseHTTPRequestHandler, code: int, body: bytes) -> None:
    h.send_response(code)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@pytest.fixture
def stub() -> Iterator[Callable[..., _Stub]]:
    made: list[_Stub] = []

    def make(behave) -> _Stub:
        made.append(_Stub(behave))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_a_server_that_hangs_times_out_in_bounded_time(stub):
    s = stub(lambda h, k: s.release.wait(20))
    client = HttpReward(s.url, timeout_s=0.5, retries=1, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match="timeout_s=0.5") as e:
        client(["p"] * 3, ["r"] * 3)
    assert time.monotonic() - t0 < 4.0 and s.requests == 2
    assert "2 tries" in str(e.value)


@pytest.mark.parametrize(
    "body, match",
    [
        (b"<html>oops</html>", "not JSON"),
        (b'{"scores": [1, 2]}', 'no "rewards" list'),
        (b'{"rewards": [1]}', "1 values for 2 samples"),
        (b'{"rewards": [1, "high"]}', "numbers or null"),
        (b'{"rewards": [1, true]}', "numbers or null"),
        (b'{"rewards": [1, 2], "info": [1, 2]}', '"info"'),
    ],
)
def test_garbage_answers_raise_without_retries(stub, body, match):
    s = stub(lambda h, k: _reply(h, 200, body))
    with pytest.raises(RewardError, match=match):
        HttpReward(s.url, retries=3, backoff_s=5.0)(["p", "q"], ["r", "s"])
    assert s.requests == 1


def test_5xx_is_retried_with_backoff_then_succeeds_and_4xx_is_not(stub):
    answer = json.dumps({"rewards": [0.5, None, float("nan")]}).encode()
    s = stub(lambda h, k: _reply(h, 503, b"busy") if k <= 2 else _reply(h, 200, answer))
    t0 = time.monotonic()
    out = HttpReward(s.url, retries=3, backoff_s=0.1)(["p"] * 3, ["r"] * 3)
    assert out.scores == [0.5, None, None] and out.info == []
    assert s.requests == 3 and time.monotonic() - t0 >= 0.3  # waited 0.1 + 0.2
    s5 = stub(lambda h, k: _reply(h, 500, b"down"))
    with pytest.raises(RewardError, match="HTTP 500") as e:
        HttpReward(s5.url, retries=2, backoff_s=0.01)(["p"], ["r"])
    assert s5.requests == 3 and "'down'" in str(e.value)
    s4 = stub(lambda h, k: _reply(h, 422, b"bad columns"))
    with pytest.raises(RewardError, match="HTTP 422"):
        HttpReward(s4.url, retries=3, backoff_s=5.0)(["p"], ["r"])
    assert s4.requests == 1


def test_chunks_in_flight_stay_within_max_concurrency(stub):
    lock, live, peak = threading.Lock(), [0], [0]

    def behave(h: BaseHTTPRequestHandler, k: int) -> None:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.15)
        with lock:
            live[0] -= 1
        _reply(h, 200, json.dumps({"rewards": [float(k)]}).encode())

    s = stub(behave)
    out = HttpReward(s.url, batch_size=1, max_concurrency=2)(["p"] * 6, ["r"] * 6)
    assert sorted(out.scores) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and s.requests == 6
    assert peak[0] == 2


def test_nothing_listening_fails_fast():
    client = HttpReward(f"http://127.0.0.1:{free_port()}/score", retries=2, backoff_s=0.01, timeout_s=2)
    with pytest.raises(RewardError, match="3 tries.*(Connection refused|ConnectionRefused)"):
        client(["p"], ["r"])


def test_call_reward_passes_the_columns_a_function_names():
    def named(prompts, responses, answer):
        return [float(a == r) for a, r in zip(answer, responses)]

    def takes_all(prompts, responses, **kw):
        return RewardBatch([len(kw)] * len(prompts), [{"keys": sorted(kw)}] * len(prompts))

    cols = {"answer": ["1", "2"], "tests": [[], []]}
    assert call_reward(named, ["p", "q"], ["1", "3"], ["stop", "stop"], cols).scores == [1.0, 0.0]
    out = call_reward(takes_all, ["p", "q"], ["1", "3"], ["stop", "stop"], cols)
    assert out.scores == [3.0, 3.0] and out.info[0] == {"keys": ["answer", "finish_reasons", "tests"]}
    assert call_reward(lambda p, r: [None, "x"], ["p", "q"], ["a", "b"]).scores == [None, None]
