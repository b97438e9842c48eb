"""Calling reward functions: record columns as keyword arguments, several weighted functions, a
worker pool with a per-batch timeout, and failures that cost one batch's rewards, never the run.

``RewardFunctions([RewardTerm(name, fn, weight), ...], workers, timeout_s)`` scores one batch with
``submit(...)`` (returns at once; the pool works while the caller runs its forwards) and
``PendingRewards.result()``. The combined score of a sample is ``sum(weight * score)`` over the
functions that scored it (a function may return None for samples it does not apply to, as in TRL);
it is invalid when no function scored it. A function that raises or, in the pool, runs past
``timeout_s`` makes the whole batch invalid: the error is printed once per batch and counted.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import math
import multiprocessing as mp
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tritonrlhf.engine.config import ConfigError
from tritonrlhf.engine.rewards import RewardBatch

# Keyword arguments every reward call may carry besides the record's columns (which therefore
# cannot take these names: tritonrlhf.engine.data.RESERVED_COLUMNS).
CALL_KEYWORDS = ("finish_reasons",)


@dataclass
class RewardTerm:
    """One reward function: ``fn`` is a callable, a ``"module:function"`` spec (needed in a pool,
    where each worker imports it) or an ``http(s)://`` endpoint (``HttpReward``; called from a thread,
    its own concurrency and timeouts apply). ``name`` labels its ``reward/<name>`` metric."""

    name: str
    fn: Callable[..., Any] | str
    weight: float = 1.0


@dataclass
class RewardScores:
    """One batch's rewards.

    scores:   [B] combined raw scores, NaN where invalid
    parts:    name -> [B] each function's own score (NaN where it gave none)
    info:     [B] per-sample dicts from ``RewardBatch.info`` (merged over functions; None where empty)
    errors:   functions that raised on this batch; timeouts: functions that ran past ``timeout_s``
    """

    scores: list[float]
    parts: dict[str, list[float]] = field(default_factory=dict)
    info: list[dict[str, Any] | None] = field(default_factory=list)
    errors: int = 0
    timeouts: int = 0


def as_score(x: Any) -> float:
    if x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _parameters(fn: Callable[..., Any]) -> tuple[set[str], set[str], bool]:
    """(keyword names it takes, those it requires, whether it takes ``**kwargs``) beyond the first two."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: give it everything
        return set(), set(), True
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][2:]
    names = {p.name for p in named}
    required = {p.name for p in named if p.default is p.empty}
    return names, required, var_kw


def call_reward(
    fn: Callable[..., Any], prompts: list[str], responses: list[str], keywords: dict[str, list[Any]]
) -> tuple[list[float], list[dict[str, Any] | None]]:
    """``fn(prompts, responses, **the keywords it takes)`` -> (scores [B], info [B]); raises what ``fn`` raises,
    or ValueError when it returns the wrong number of scores."""
    names, _, var_kw = _parameters(fn)
    kwargs = keywords if var_kw else {k: v for k, v in keywords.items() if k in names}
    out = fn(prompts, responses, **kwargs)
    info: list[dict[str, Any] | None] = [None] * len(prompts)
    if isinstance(out, RewardBatch):
        if out.info:
            if len(out.info) != len(prompts):
                raise ValueError(f"RewardBatch.info has {len(out.info)} entries for {len(prompts)} samples")
            info = list(out.info)
        out = out.scores
    raw = list(out)
    if len(raw) != len(prompts):
        raise ValueError(f"returned {len(raw)} scores for {len(prompts)} samples")
    return [as_score(r) for r in raw], info


# --------------------------------------------------------------------------- worker pool
_WORKER_FNS: dict[str, Callable[..., Any]] = {}


def _worker_call(spec: str, prompts: list[str], responses: list[str], keywords: dict[str, list[Any]]):
    """In a pool worker: import ``spec`` once, then score."""
    from tritonrlhf.engine.tasks import load_callable

    fn = _WORKER_FNS.get(spec)
    if fn is None:
        fn = _WORKER_FNS[spec] = load_callable(spec)
    return call_reward(fn, prompts, responses, keywords)


class PendingRewards:
    """A batch being scored; ``result()`` waits for it (at most ``timeout_s`` per function in a pool)."""

    def __init__(self, owner: RewardFunctions, n: int, futures: list[Any]) -> None:
        self.owner, self.n, self.futures = owner, n, futures

    def result(self) -> RewardScores:
        owner, n = self.owner, self.n
        parts: dict[str, list[float]] = {}
        info: list[dict[str, Any] | None] = [None] * n
        errors = timeouts = 0
        deadline = time.monotonic() + owner.timeout_s
        for term, fut in zip(owner.terms, self.futures):
            try:
                if isinstance(fut, cf.Future):
                    scores, extra = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    scores, extra = fut()
            except cf.TimeoutError:
                timeouts += 1
                if owner.workers:
                    owner.restart_pool()
                print(
                    f"[reward] {term.name}: no result within reward.timeout_s={owner.timeout_s:g}s; "
                    "this batch's rewards are invalid",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            except Exception as e:  # noqa: BLE001 - a reward failure costs the batch, not the run
                errors += 1
                print(
                    f"[reward] {term.name} failed: {e!r}; this batch's rewards are invalid", file=sys.stderr
                )
                continue
            parts[term.name] = scores
            for i, x in enumerate(extra):
                if x:
                    info[i] = {**(info[i] or {}), **x}
        if errors or timeouts:
            return RewardScores(
                [math.nan] * n, {t.name: [math.nan] * n for t in owner.terms}, info, errors, timeouts
            )
        total = []
        for i in range(n):
            got = [(t.weight, parts[t.name][i]) for t in owner.terms if math.isfinite(parts[t.name][i])]
            total.append(sum(w * s for w, s in got) if got else math.nan)
        return RewardScores(total, parts, info)


class RewardFunctions:
    """Several weighted reward functions, called in this process (``workers=0``) or in a pool of
    ``workers`` processes (spawned; each imports the functions by their ``module:function`` spec)
    with ``timeout_s`` per batch. Call ``check_columns`` at start-up, ``close`` at the end."""

    def __init__(
        self,
        terms: Sequence[RewardTerm],
        workers: int = 0,
        timeout_s: float = 60.0,
        http: dict[str, Any] | None = None,
    ) -> None:
        if not terms:
            raise ConfigError("reward: no reward function given")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward.functions: names must differ (give each a name), got {names}")
        if workers < 0 or timeout_s <= 0:
            raise ConfigError(
                f"reward.workers must be >= 0 and reward.timeout_s > 0, got {workers}, {timeout_s}"
            )
        self.terms = list(terms)
        self.workers, self.timeout_s = int(workers), float(timeout_s)
        self._fns: list[Callable[..., Any]] = []
        self._remote: list[bool] = []  # HTTP endpoints: called from a thread, never in the pool
        for t in self.terms:
            remote = isinstance(t.fn, str) and t.fn.startswith(("http://", "https://"))
            if remote:
                from tritonrlhf.engine.rewards.http import HttpReward

                self._fns.append(HttpReward(t.fn, **(http or {})))
            elif isinstance(t.fn, str):
                from tritonrlhf.engine.tasks import load_callable

                self._fns.append(load_callable(t.fn))
            elif workers:
                raise ConfigError(f"reward function {t.name!r}: a worker pool needs a 'module:function' spec")
            else:
                self._fns.append(t.fn)
            self._remote.append(remote)
        self._pool: cf.ProcessPoolExecutor | None = None
        self._threads: cf.ThreadPoolExecutor | None = None

    @property
    def background(self) -> bool:
        """Whether ``submit`` returns before scoring is done (a worker pool, or an HTTP endpoint)."""
        return self.workers > 0 or any(self._remote)

    def check_columns(self, columns: Sequence[str], where: str = "data.prompts") -> None:
        """ConfigError when a function requires a keyword that neither the records' columns nor the
        call provide (e.g. ``answer`` with a data set that has no ``answer`` column)."""
        have = set(columns) | set(CALL_KEYWORDS)
        for term, fn in zip(self.terms, self._fns):
            _, required, _ = _parameters(fn)
            missing = sorted(required - have)
            if missing:
                raise ConfigError(
                    f"reward function {term.name!r} requires {missing}, which the records of {where} do not "
                    f"have (their columns: {sorted(columns) or 'none'}); add the column or give it a default"
                )

    def restart_pool(self) -> None:
        """Kill the pool's workers (a stuck function keeps its worker busy forever); the next batch starts anew."""
        pool, self._pool = self._pool, None
        if pool is not None:
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        return self._pool

    def submit(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        columns: dict[str, list[Any]] | None = None,
        finish_reasons: Sequence[str] | None = None,
    ) -> PendingRewards:
        """Start scoring one batch (columns: name -> [B] values); ``.result()`` gives its ``RewardScores``."""
        prompts, responses = list(prompts), list(responses)
        keywords = {k: list(v) for k, v in (columns or {}).items()}
        if finish_reasons is not None:
            keywords["finish_reasons"] = list(finish_reasons)
        futures: list[Any] = []
        for term, fn, remote in zip(self.terms, self._fns, self._remote):
            if remote:  # I/O: a thread waits on the service while the caller goes on
                if self._threads is None:
                    self._threads = cf.ThreadPoolExecutor(max(1, sum(self._remote)), "reward-http")
                futures.append(self._threads.submit(call_reward, fn, prompts, responses, keywords))
            elif self.workers:
                futures.append(self._get_pool().submit(_worker_call, term.fn, prompts, responses, keywords))
            else:
                futures.append(lambda fn=fn: call_reward(fn, prompts, responses, keywords))
        return PendingRewards(self, len(prompts), futures)

    def __call__(self, prompts, responses, columns=None, finish_reasons=None) -> RewardScores:
        return self.submit(prompts, responses, columns, finish_reasons).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None


def reward_functions(cfg: Any) -> RewardFunctions:
    """The ``RewardFunctions`` of a ``RewardConfig``: ``kind=function`` (``function`` or ``functions``)
    or ``kind=http`` (``tritonrlhf.engine.rewards.http.HttpReward`` on ``reward.url``)."""
    if cfg.kind == "http":
        from tritonrlhf.engine.rewards.http import HttpReward

        fn = HttpReward(cfg.url, **_http_options(cfg.http))
        return RewardFunctions([RewardTerm("http", fn)], workers=0, timeout_s=cfg.timeout_s)
    terms = [RewardTerm(name, spec, weight) for name, spec, weight in cfg.terms()]
    return RewardFunctions(terms, workers=cfg.workers, timeout_s=cfg.timeout_s, http=_http_options(cfg.http))


def _http_options(h: Any) -> dict[str, Any]:
    """``HttpReward``'s keyword arguments from ``reward.http``."""
    keys = ("timeout_s", "retries", "backoff_s", "max_concurrency", "batch_size", "auth_env")
    return {k: getattr(h, k) for k in keys}
