"""Code-sandbox throughput: programs per second for a batch, warm pool against one process per program.

Run: ``python benchmarks/bench_sandbox.py [--programs 64] [--workers N] [--repeats 3]``.
Providers, each running the same batch (a small program that computes and prints, as a coding
reward's test case does) with ``--workers`` programs at a time:

- ``subprocess``: ``python -I -c code`` per program, no isolation at all (the floor a naive reward
  pays: one interpreter start-up per program);
- ``sandbox_plain``: ``run_code`` per program (an interpreter start-up plus the isolation steps);
- ``sandbox_pool``: ``SandboxPool.map`` over warm fork-server workers (a fork plus the same steps);
  the pool's own start-up (its workers' interpreters, up to a first answer each) is timed apart
  (``startup_s``), paid once per training run.

Rows go to ``benchmarks/results/sandbox.csv`` with the CPU model, versions and git SHA.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import append_rows, fmt, run_env  # noqa: E402
from tritonrlhf.engine.rewards.sandbox import SandboxConfig, SandboxPool, check_isolation, run_code  # noqa: E402

PROGRAM = "def f(n):\n    return sum(i * i for i in range(n))\n\nassert f({n}) == {want}\nprint(f({n}))\n"
FIELDS = [
    "timestamp", "device", "cpu_threads", "torch", "python", "git_sha",
    "provider", "workers", "programs", "repeat", "seconds", "programs_per_s", "speedup_vs_subprocess", "startup_s",
]  # fmt: skip


def batch(n: int) -> list[str]:
    return [PROGRAM.format(n=100 + i, want=sum(j * j for j in range(100 + i))) for i in range(n)]


def run_subprocess(programs: list[str], workers: int) -> list[bool]:
    def one(code: str) -> bool:
        return (
            subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, timeout=60).returncode
            == 0
        )

    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, programs))


def run_plain(programs: list[str], workers: int, cfg: SandboxConfig) -> list[bool]:
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda code: run_code(code, "", cfg).ok, programs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sandbox.csv")
    args = ap.parse_args()

    cfg = SandboxConfig()
    check_isolation(cfg)
    programs = batch(args.programs)
    env = run_env(torch.device("cpu"))
    env.pop("triton", None)
    env["cpu_threads"] = str(os.cpu_count())
    rows = []
    start = time.perf_counter()
    pool = SandboxPool(cfg, workers=args.workers)
    pool.map([("pass", "")] * args.workers)  # the workers' interpreters are up once each answered
    startup = time.perf_counter() - start
    providers = {
        "subprocess": lambda: run_subprocess(programs, args.workers),
        "sandbox_plain": lambda: run_plain(programs, args.workers, cfg),
        "sandbox_pool": lambda: [r.ok for r in pool.map([(code, "") for code in programs])],
    }
    try:
        base = {}
        for repeat in range(args.repeats):
            for name, fn in providers.items():
                t = time.perf_counter()
                ok = fn()
                seconds = time.perf_counter() - t
                assert all(ok), f"{name}: {ok.count(False)} programs failed"
                if name == "subprocess":
                    base[repeat] = seconds
                rows.append(
                    {
                        **env,
                        "provider": name,
                        "workers": args.workers,
                        "programs": args.programs,
                        "repeat": repeat,
                        "seconds": fmt(seconds),
                        "programs_per_s": fmt(args.programs / seconds),
                        "speedup_vs_subprocess": fmt(base[repeat] / seconds, 3),
                        "startup_s": fmt(startup) if name == "sandbox_pool" else "",
                    }
                )
                print(
                    f"{name:14s} repeat {repeat}: {seconds:7.3f} s, {args.programs / seconds:8.1f} programs/s"
                )
    finally:
        pool.close()
    append_rows(args.out, rows, FIELDS)
    print(f"pool start-up {startup:.3f} s; rows appended to {args.out}")


if __name__ == "__main__":
    main()
