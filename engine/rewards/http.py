"""Rewards over HTTP: a reward function that posts batches to a scoring service (``reward.kind=http``).

The protocol (served by ``tritonrlhf.engine.rewards.serve``; an RM or an LLM judge elsewhere can
speak it too): ``POST <url>`` with a JSON body

    {"prompts": [...], "responses": [...], "finish_reasons": [...], "columns": {"answer": [...], ...}}

(one entry per sample in every list) answered by ``200`` and

    {"rewards": [0.5, null, ...], "info": [{...}, null, ...]}

``rewards`` holds one number or ``null`` (invalid) per sample; ``info`` is optional, one JSON object
(or null) per sample, kept in the samples log. ``GET /health`` answers ``{"status": "ok"}``.

``HttpReward`` splits a call into chunks of ``batch_size`` posted concurrently (at most
``max_concurrency`` in flight per call). A chunk that meets a connection error, a timeout or a 5xx
is retried up to ``retries`` times with exponential backoff (``backoff_s * 2**k``); a 4xx, or an
answer of the wrong shape, is not retried. A chunk that still fails makes the whole call raise
``RewardError`` (the engine turns that into invalid rewards for the batch, logged and counted).
The bearer token is read from the environment variable named by ``auth_env`` on every call, so it
never sits in an attribute, a pickle, a repr, a config file or a log line.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from tritonrlhf.engine.rewards import RewardBatch, RewardError

# Errors worth another try: the server is (re)starting, restarting a connection, slow or overloaded.
_TRANSIENT = (ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException, urllib.error.URLError)


class _Permanent(RewardError):
    """A failure that another try would repeat (4xx, an answer of the wrong shape)."""


class HttpReward:
    """A reward function (the engine's contract) that scores batches on a remote service.

    url:             the scoring endpoint, e.g. ``http://127.0.0.1:8000/score``.
    timeout_s:       seconds per socket operation (connect, and each read of the answer); a server
                     that accepts but never answers fails the try after this long.
    retries:         further tries of a chunk after a connection error, a timeout or a 5xx.
    backoff_s:       the wait before the first retry, doubled before each next one.
    max_concurrency: chunks in flight at once within one call.
    batch_size:      samples per request.
    auth_env:        name of the environment variable holding a bearer token ("" = no auth header).
    headers:         extra request headers (their names are shown by ``repr``, never their values).
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_concurrency: int = 4,
        batch_size: int = 64,
        auth_env: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"HttpReward: url must start with http:// or https://, got {url!r}")
        if not (
            timeout_s > 0 and retries >= 0 and backoff_s >= 0 and max_concurrency >= 1 and batch_size >= 1
        ):
            raise ValueError(
                "HttpReward: need timeout_s > 0, retries >= 0, backoff_s >= 0, max_concurrency >= 1, "
                f"batch_size >= 1; got {timeout_s}, {retries}, {backoff_s}, {max_concurrency}, {batch_size}"
            )
        self.url = url
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_concurrency = int(max_concurrency)
        self.batch_size = int(batch_size)
        self.auth_env = auth_env
        self.headers = dict(headers or {})

    def __repr__(self) -> str:
        auth = f", auth_env={self.auth_env!r}" if self.auth_env else ""
        extra = f", headers={sorted(self.headers)}" if self.headers else ""
        return (
            f"HttpReward({self.url!r}, timeout_s={self.timeout_s}, retries={self.retries}, "
            f"batch_size={self.batch_size}, max_concurrency={self.max_concurrency}{auth}{extra})"
        )

    def __call__(
        self,
        prompts: list[str],
        responses: list[str],
        finish_reasons: list[str] | None = None,
        **columns: Any,
    ) -> RewardBatch:
        """[B] rewards (None = invalid) and per-sample ``info`` (empty when the service sends none).

        Raises RewardError when a chunk fails after its retries, or the answer is malformed.
        """
        n = len(prompts)
        if len(responses) != n:
            raise ValueError(f"HttpReward: {n} prompts but {len(responses)} responses")
        for name, values in columns.items():
            if len(values) != n:
                raise ValueError(f"HttpReward: column {name!r} has {len(values)} values for {n} samples")
        if n == 0:
            return RewardBatch([], [])
        headers = {"Content-Type": "application/json", **self.headers, **self._auth_header()}
        bodies = []
        for lo in range(0, n, self.batch_size):
            hi = min(lo + self.batch_size, n)
            payload = {
                "prompts": list(prompts[lo:hi]),
                "responses": list(responses[lo:hi]),
                "finish_reasons": list(finish_reasons[lo:hi]) if finish_reasons is not None else [],
                "columns": {k: list(v[lo:hi]) for k, v in columns.items()},
            }
            try:
                bodies.append((lo, hi, json.dumps(payload, default=_jsonable).encode()))
            except (TypeError, ValueError) as e:
                raise RewardError(f"HttpReward: a batch is not JSON-serialisable ({e})") from e
        stop = threading.Event()  # a failed chunk stops the others' retries
        pool = ThreadPoolExecutor(min(self.max_concurrency, len(bodies)), thread_name_prefix="http-reward")
        futures = [pool.submit(self._post_chunk, body, hi - lo, headers, stop) for lo, hi, body in bodies]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            stop.set()
        # On failure: no waiting for chunks still in flight (each ends within timeout_s, retrying no more).
        pool.shutdown(wait=failed is None, cancel_futures=True)
        if failed is not None:
            k = futures.index(failed)
            lo, hi, _ = bodies[k]
            raise RewardError(
                f"HttpReward: samples {lo}-{hi - 1} of {n} (chunk {k + 1}/{len(bodies)}) failed: {failed.exception()}"
            ) from failed.exception()
        results = [f.result() for f in futures]
        scores = [s for chunk, _ in results for s in chunk]
        if all(info is None for _, info in results):
            return RewardBatch(scores, [])
        info = [d for (chunk, i) in results for d in (i if i is not None else [None] * len(chunk))]
        return RewardBatch(scores, info)

    def _auth_header(self) -> dict[str, str]:
        """``Authorization: Bearer <token>`` from ``$auth_env`` now; {} without auth_env."""
        if not self.auth_env:
            return {}
        token = os.environ.get(self.auth_env, "")
        if not token:
            raise RewardError(
                f"HttpReward: auth_env={self.auth_env!r} names an environment variable that is not set "
                "(or empty); export the service's token under that name"
            )
        return {"Authorization": f"Bearer {token}"}

    def _post_chunk(
        self, body: bytes, n: int, headers: dict[str, str], stop: threading.Event
    ) -> tuple[list[float | None], list[Any] | None]:
        """One chunk's (scores, info or None), with retries; raises RewardError with the last cause."""
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                if stop.wait(self.backoff_s * 2 ** (attempt - 1)):
                    raise RewardError(f"abandoned after {attempt} tries ({last})")
            try:
                return _parse_answer(self._post(body, headers), n)
            except _Permanent:
                raise
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    raise _Permanent(f"HTTP {e.code} {e.reason}{_error_detail(e)}") from e
                last = f"HTTP {e.code} {e.reason}{_error_detail(e)}"
            except _TRANSIENT as e:
                last = _describe(e, self.timeout_s)
        raise RewardError(f"{self.retries + 1} tries to {self.url} failed; the last: {last}")

    def _post(self, body: bytes, headers: dict[str, str]) -> bytes:
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with _opener(self.url).open(req, timeout=self.timeout_s) as resp:
            return resp.read()


def _opener(url: str) -> urllib.request.OpenerDirector:
    """urllib's opener; for a loopback host one that ignores ``http_proxy`` (which would route it away)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _parse_answer(raw: bytes, n: int) -> tuple[list[float | None], list[Any] | None]:
    """(scores, info or None) from a service's answer to an ``n``-sample request; _Permanent if malformed."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise _Permanent(f"the answer is not JSON ({_clip(raw)})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("rewards"), list):
        raise _Permanent(f'the answer has no "rewards" list: {_clip(raw)}')
    rewards = doc["rewards"]
    if len(rewards) != n:
        raise _Permanent(f'"rewards" holds {len(rewards)} values for {n} samples')
    scores: list[float | None] = []
    for r in rewards:
        if r is None:
            scores.append(None)
        elif isinstance(r, (int, float)) and not isinstance(r, bool):
            scores.append(float(r) if math.isfinite(r) else None)
        else:
            raise _Permanent(f'"rewards" must hold numbers or null, found {r!r}')
    info = doc.get("info")
    if info is None:
        return scores, None
    if (
        not isinstance(info, list)
        or len(info) != n
        or not all(d is None or isinstance(d, dict) for d in info)
    ):
        raise _Permanent(f'"info" must be a list of {n} objects or nulls')
    return scores, info


def _jsonable(x: Any) -> Any:
    """numpy / torch scalars and arrays as plain JSON values."""
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _describe(e: BaseException, timeout_s: float) -> str:
    reason = getattr(e, "reason", None)
    if isinstance(e, (TimeoutError, socket.timeout)) or isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within timeout_s={timeout_s:g} ({e})"
    return f"{type(e).__name__}: {reason if reason is not None else e}"


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read()
    except Exception:  # noqa: BLE001 - the detail is optional
        return ""
    finally:
        e.close()
    return f": {_clip(body)}" if body else ""


def _clip(raw: bytes, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def wait_healthy(url: str, timeout_s: float = 30.0) -> None:
    """Wait until ``GET <base of url>/health`` answers 200; RewardError after ``timeout_s``.

    For start-up checks and tests: the base is ``url`` without its last path segment.
    """
    base = url.rsplit("/", 1)[0] if url.count("/") > 2 else url
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            with _opener(base).open(f"{base}/health", timeout=2.0) as resp:
                if resp.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.1)
    raise RewardError(f"{base}/health did not answer within {timeout_s:g} s ({last!r})")
