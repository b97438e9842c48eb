"""``tests/engine/_scripts/launch.py``'s ``free_port``: parallel test processes never share a port."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.engine._scripts import launch


def test_free_port_skips_the_ports_another_process_holds(monkeypatch) -> None:
    """A child reserves two ports and keeps running; this process, made to start its search where
    the child's started (same pid key), gets neither, though nothing listens on them."""
    code = "from tests.engine._scripts.launch import free_port; print(free_port(), free_port(), flush=True); input()"
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=launch.REPO,
        env=dict(os.environ, PYTHONPATH=str(launch.REPO)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        held = {int(p) for p in child.stdout.readline().split()}
        assert len(held) == 2 and all(p in launch._port_range() for p in held)
        monkeypatch.setattr(launch, "_held", {})
        monkeypatch.setattr(os, "getpid", lambda: child.pid)
        mine = [launch.free_port() for _ in range(2)]
        assert held.isdisjoint(mine) and len(set(mine)) == 2, (held, mine)
        assert all(launch._bindable(p) for p in held)  # reserved, not bound: only the lock kept them
    finally:
        child.communicate("\n", timeout=30)
