"""Serve a reward function over HTTP, speaking ``HttpReward``'s protocol (``tritonrlhf.engine.rewards.http``).

    python -m tritonrlhf.engine.rewards.serve --function tritonrlhf.engine.rewards.math:math_reward \\
        --host 127.0.0.1 --port 8000 [--auth-env REWARD_TOKEN]

``POST /score`` takes ``{"prompts", "responses", "finish_reasons", "columns"}`` and answers
``{"rewards": [...], "info": [...]}``; ``GET /health`` answers ``{"status": "ok"}``. The function
gets the columns and finish reasons as keyword arguments as in the engine (those it names, or all
with ``**kwargs``). With ``--auth-env VAR`` every request needs ``Authorization: Bearer $VAR``
(401 otherwise); the token is read once at start and never printed. A request the function fails
on answers 500 (the client retries, then gives invalid rewards); a malformed one 400.

A reward model checkpoint is served by ``python -m tritonrlhf.engine.rl.serve_reward
--reward-model DIR`` (same options): scoring a model needs the RL layer's scorer, which this
core module may not import.
"""

from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tritonrlhf.engine.rewards import RewardBatch, functions

MAX_BODY = 256 * 2**20  # bytes; a larger request is refused with 413

ModelLoader = Callable[[argparse.Namespace], Callable[..., Any]]


def call_reward(
    fn: Callable[..., Any],
    prompts: list[str],
    responses: list[str],
    finish_reasons: list[str] | None = None,
    columns: dict[str, list[Any]] | None = None,
) -> RewardBatch:
    """Call ``fn`` per the reward contract (``functions.call_reward``: the columns and
    ``finish_reasons`` it names, or all with ``**kwargs``); scores as floats or None (invalid), for JSON."""
    keywords: dict[str, list[Any]] = dict(columns or {})
    if finish_reasons:
        keywords["finish_reasons"] = list(finish_reasons)
    scores, info = functions.call_reward(fn, prompts, responses, keywords)
    return RewardBatch([s if math.isfinite(s) else None for s in scores], info if any(info) else [])


def _list_of(doc: dict[str, Any], key: str, n: int | None) -> list[Any]:
    v = doc.get(key, [])
    if not isinstance(v, list) or (n is not None and len(v) != n):
        raise ValueError(f'"{key}" must be a list' + (f" of {n} values" if n is not None else ""))
    return v


def parse_request(raw: bytes) -> tuple[list[str], list[str], list[str] | None, dict[str, list[Any]]]:
    """(prompts, responses, finish_reasons or None, columns) from a request body; ValueError if malformed."""
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("the body must be a JSON object")
    prompts = _list_of(doc, "prompts", None)
    n = len(prompts)
    responses = _list_of(doc, "responses", n)
    reasons = _list_of(doc, "finish_reasons", None) or None
    if reasons is not None and len(reasons) != n:
        raise ValueError(f'"finish_reasons" must be empty or a list of {n} values')
    columns = doc.get("columns", {})
    if not isinstance(columns, dict):
        raise ValueError('"columns" must be an object of lists')
    for name in columns:
        _list_of(columns, name, n)
    return prompts, responses, reasons, columns


class RewardServer(ThreadingHTTPServer):
    """A threaded HTTP server scoring with ``fn``; ``token`` (or None) is the bearer token required."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fn: Callable[..., Any], token: str | None = None) -> None:
        super().__init__(address, _Handler)
        self.fn = fn
        self.token = token

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/score"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") != "/health":
            return self._send(404, {"error": f"no such path {self.path!r}; GET /health, POST /score"})
        self._send(200, {"status": "ok"})

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") != "/score":
            return self._send(404, {"error": f"no such path {self.path!r}; POST /score"})
        if not self._authorized():
            return self._send(401, {"error": "missing or wrong bearer token"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._send(413, {"error": f"request of {length} bytes exceeds {MAX_BODY}"})
        try:
            prompts, responses, reasons, columns = parse_request(self.rfile.read(length))
        except ValueError as e:  # json.JSONDecodeError included
            return self._send(400, {"error": f"malformed request: {e}"})
        try:
            out = call_reward(self.server.fn, prompts, responses, reasons, columns)
        except Exception as e:  # noqa: BLE001 - any failure of the function is the service's 500
            traceback.print_exc()
            return self._send(500, {"error": f"the reward function failed: {e!r}"})
        body: dict[str, Any] = {"rewards": out.scores}
        if out.info:
            body["info"] = out.info
        self._send(200, body)

    def _authorized(self) -> bool:
        if self.server.token is None:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.server.token}".encode())

    def _send(self, code: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, default=str).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        sys.stderr.write(f"[serve] {self.address_string()} {format % args}\n")


def read_token(auth_env: str) -> str | None:
    """The bearer token from ``$auth_env`` (None without auth_env); SystemExit if it is unset."""
    if not auth_env:
        return None
    token = os.environ.get(auth_env, "")
    if not token:
        raise SystemExit(f"--auth-env {auth_env}: that environment variable is not set (or empty)")
    return token


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Serve a reward function or reward model over HTTP (POST /score)."
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--function", help="a reward function, 'module:function' or 'path/to/file.py:function'")
    what.add_argument("--reward-model", help="a reward model checkpoint directory (a one-label classifier)")
    p.add_argument("--tokenizer", help="the reward model's tokenizer directory (default: --reward-model)")
    p.add_argument("--device", default="cpu", help="where the reward model runs (default cpu)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--auth-env", default="", help="require 'Authorization: Bearer $VAR' on every request")
    return p


def main(argv: Sequence[str] | None = None, load_model: ModelLoader | None = None) -> None:
    """Parse the command line, build the scorer, serve until interrupted.

    ``load_model(args)`` builds the callable for ``--reward-model`` (the RL layer passes it).
    """
    args = build_parser().parse_args(argv)
    token = read_token(args.auth_env)
    if args.reward_model:
        if load_model is None:
            raise SystemExit(
                "--reward-model: run python -m tritonrlhf.engine.rl.serve_reward, which can load models"
            )
        fn = load_model(args)
        what = f"reward model {args.reward_model}"
    else:
        from tritonrlhf.engine.tasks import load_callable

        fn = load_callable(args.function)
        what = f"reward function {args.function}"
    server = RewardServer((args.host, args.port), fn, token)
    auth = f", bearer token from ${args.auth_env}" if token else ""
    print(f"[serve] {what} on {server.url}{auth}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
