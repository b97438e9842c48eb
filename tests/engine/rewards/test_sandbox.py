"""The code sandbox holds hostile programs: loops, memory and fork bombs, writes, sockets, floods."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tritonrlhf.engine.rewards.sandbox import (
    SandboxConfig,
    SandboxPool,
    SandboxUnavailable,
    check_isolation,
    run_code,
)

CFG = SandboxConfig(cpu_s=2, wall_s=3.0, memory_mb=512, file_mb=1, max_procs=16, output_bytes=4096)


@pytest.fixture(scope="module")
def cfg() -> SandboxConfig:
    try:
        check_isolation(CFG)
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox on this machine: {e}")
    return CFG


def _procs_of_sandbox_uids(cfg: SandboxConfig) -> list[int]:
    """Processes (zombies aside) running as one of the sandbox's uids."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{name}").st_uid
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cfg.uid_base <= uid < cfg.uid_base + 4096 and state != "Z":
            pids.append(int(name))
    return pids


def test_normal_run_stdin_stdout_exit(cfg):
    r = run_code(
        "import sys\nx = input()\nprint(x[::-1])\nprint('err', file=sys.stderr)\nsys.exit(3)", "abc\n", cfg
    )
    assert (r.returncode, r.stdout, r.stderr) == (3, "cba\n", "err\n")
    assert not r.timed_out and not r.output_limited


def test_exception_traceback_and_own_directory(cfg):
    r = run_code(
        "import os\nopen('f.txt', 'w').write('ok')\nprint(os.getcwd() == os.environ['HOME'])\n1/0", "", cfg
    )
    assert r.returncode == 1 and r.stdout == "True\n"
    assert "ZeroDivisionError" in r.stderr and "main.py" in r.stderr and "_sandbox_worker" not in r.stderr


def test_caller_environment_not_visible(cfg, monkeypatch):
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "hunter2")
    code = (
        "import os\nprint(os.environ.get('SANDBOX_TEST_SECRET'))\n"
        "try:\n    print(open('/proc/self/environ').read())\nexcept OSError as e:\n    print(e)"
    )
    r = run_code(code, "", cfg)
    assert r.returncode == 0 and r.stdout.startswith("None\n") and "hunter2" not in r.stdout


def test_infinite_loop_killed_at_timeout(cfg):
    start = time.monotonic()
    r = run_code("while True:\n    pass", "", cfg)
    assert r.returncode < 0 and time.monotonic() - start < cfg.wall_s + 3
    assert r.timed_out or r.returncode in (-9, -24)  # the wall clock or RLIMIT_CPU (SIGXCPU)


def test_memory_bomb_fails_host_fine(cfg):
    r = run_code("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))", "", cfg)
    assert r.returncode != 0 and not r.timed_out
    assert "MemoryError" in r.stderr or r.returncode < 0
    assert run_code("print(1)", "", cfg).stdout == "1\n"


def test_fork_bomb_bounded_and_gone(cfg):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    r = run_code(bomb, "", cfg)
    assert r.returncode < 0 and time.monotonic() - start < cfg.wall_s + 5
    assert _procs_of_sandbox_uids(cfg) == []


def test_daemon_left_behind_is_killed(cfg):
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent exits')"
    r = run_code(code, "", cfg)
    assert r.returncode == 0 and r.stdout == "parent exits\n"
    assert _procs_of_sandbox_uids(cfg) == []


@pytest.mark.parametrize("path", ["/tmp/sandbox_escape.txt", "/work/sandbox_escape.txt", "/root/escape.txt"])
def test_write_outside_directory_fails(cfg, path):
    r = run_code(f"open({path!r}, 'w').write('x')", "", cfg)
    assert r.returncode == 1 and ("Read-only" in r.stderr or "Permission" in r.stderr)
    assert not os.path.exists(path)


def test_file_size_limit(cfg):
    r = run_code("open('big', 'wb').write(b'x' * (8 << 20))", "", cfg)
    assert r.returncode != 0 and ("File too large" in r.stderr or r.returncode == -25)


def test_no_network_to_loopback_server(cfg):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        r = run_code(code, "", cfg)
        assert r.returncode == 1 and "connected" not in r.stdout and "OSError" in r.stderr
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_gigabyte_of_output_truncated(cfg):
    start = time.monotonic()
    r = run_code(
        "import sys\nblock = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(block)", "", cfg
    )
    assert r.output_limited and len(r.stdout) == cfg.output_bytes
    assert time.monotonic() - start < cfg.wall_s + 3


def test_pool_matches_plain_mode(cfg):
    programs = [
        ("print(input() * 2)", "ab\n"),
        ("import sys\nsys.exit(7)", ""),
        ("raise ValueError('boom')", ""),
        ("open('/etc/x', 'w')", ""),
        ("print(sum(range(1000)))", ""),
    ] * 2
    with SandboxPool(cfg, workers=2) as pool:
        pooled = pool.map(programs)
        bomb = pool.run(
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
        )
        after = pool.run("print('still fine')")
    plain = [run_code(code, stdin, cfg) for code, stdin in programs[:5]]
    key = lambda r: (r.returncode, r.stdout, r.stderr.splitlines()[-1:] if r.stderr else [])  # noqa: E731
    assert [key(r) for r in pooled] == [key(r) for r in plain] * 2
    assert bomb.returncode < 0 and after.stdout == "still fine\n"
    assert _procs_of_sandbox_uids(cfg) == []


def test_refuses_without_network_namespace_unless_opted_out(monkeypatch, tmp_path):
    """Where unshare(CLONE_NEWNET) fails, the sandbox refuses, naming the opt-out."""
    from tritonrlhf.engine.rewards import sandbox

    monkeypatch.setattr(sandbox, "_checked", set())
    worker_src = sandbox._WORKER.read_text().replace(
        '_check(_libc.unshare(ctypes.c_int(flags)), "unshare")',
        'raise OSError(1, "unshare: Operation not permitted (simulated)")',
    )
    assert worker_src != sandbox._WORKER.read_text()
    fake = tmp_path / "worker_without_netns.py"
    fake.write_text(worker_src)
    monkeypatch.setattr(sandbox, "_WORKER", fake)
    with pytest.raises(SandboxUnavailable, match="allow_network=True"):
        run_code("print(1)", "", CFG)
    opted = SandboxConfig(**{**CFG.__dict__, "allow_network": True})
    assert run_code("print(1)", "", opted).stdout == "1\n"
