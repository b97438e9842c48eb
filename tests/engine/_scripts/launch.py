"""Start test subprocesses so that concurrent runs never collide: own session, own master port.

Every launch gets a free port (``free_port``: reserved across processes, outside the kernel's
ephemeral range), passed as ``--master_port`` to ``deepspeed`` and as ``MASTER_PORT``
to a single-process run, and leads its own process group, so a timeout or a test's SIGKILL reaches
every rank. DeepSpeed's CPU all-reduce leaves ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
<port>_<rank>`` behind when a run dies; ``cleanup_shm(port)`` removes this launch's only. (Deleting
every buffer, or "whatever appeared meanwhile", deletes a concurrent run's buffers before its peer
rank opened them, and hangs it.)

``run`` waits for the launch; ``start`` returns a ``Launch`` to signal or kill mid-run, its output
going to a log file (a pipe nobody reads could fill and stall the run).
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tritonrlhf.engine.distributed import DIST_ENV_VARS

REPO = Path(__file__).resolve().parents[3]
SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"


PORT_LOCKS = Path(tempfile.gettempdir()) / "tritonrlhf-ports"
_held: dict[int, int] = {}  # port -> the fd whose lock reserves it, for this process's lifetime


def _port_range() -> range:
    """Ports outside the kernel's ephemeral range (which ``bind(0)`` and every outgoing connection
    draw from, so a port found free that way can be taken before the launch binds it)."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    if lo > 21000:
        return range(20000, lo)
    return range(hi + 1, 65536) if hi < 64000 else range(20000, 30000)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A master port no concurrent test process can also get.

    Reserved by an exclusive ``flock`` on ``PORT_LOCKS/<port>.lock``, held until this process
    exits (the kernel drops it even on SIGKILL, so nothing goes stale), then checked bindable.
    The search starts at a point keyed on the pid, so parallel sessions seldom even contend.
    """
    ports = _port_range()
    PORT_LOCKS.mkdir(exist_ok=True)
    start = os.getpid() * 7919 % len(ports)
    for i in range(len(ports)):
        port = ports[(start + i) % len(ports)]
        if port in _held:
            continue
        fd = os.open(PORT_LOCKS / f"{port}.lock", os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process holds it
            os.close(fd)
            continue
        if _bindable(port):
            _held[port] = fd
            return port
        os.close(fd)  # in use outside the tests: release the lock, try the next
    raise RuntimeError(f"no free port in {ports}")


def cleanup_shm(port: int) -> None:
    """Remove the DeepSpeed shared-memory buffers of the launch that used ``port``."""
    for f in glob.glob(SHM_BUFFERS.format(port=port)):
        Path(f).unlink(missing_ok=True)


def deepspeed_cmd(ranks: int, port: int, *args: str) -> list[str]:
    """``deepspeed --num_gpus RANKS --master_port PORT ARGS...`` with this interpreter's launcher."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(port), *args]


def subprocess_env(port: int, **extra: str) -> dict[str, str]:
    """This environment without a distributed identity, plus ``PYTHONPATH=REPO`` and ``MASTER_PORT``.

    Bytecode is cached outside the tree: the environment may set PYTHONDONTWRITEBYTECODE, which
    makes every interpreter recompile torch and transformers on start (seconds on a busy machine).
    """
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV_VARS}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(
        PYTHONPATH=str(REPO),
        MASTER_PORT=str(port),
        PYTHONPYCACHEPREFIX=str(Path(tempfile.gettempdir()) / "tritonrlhf-pycache"),
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


class Launch:
    """A started process group, its output (stdout and stderr) going to ``log``.

    ``port`` is the one ``cmd`` uses (``deepspeed_cmd``); a fresh free one by default.
    """

    def __init__(self, cmd: list[str], log: Path, port: int | None = None, **env: str) -> None:
        self.port = port or free_port()
        self.cmd = cmd
        self.log = log
        self.t0 = time.perf_counter()
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=REPO,
                env=subprocess_env(self.port, **env),
                stdout=f,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )

    @property
    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def send(self, sig: int) -> None:
        """Send ``sig`` to the leading process only (a launcher forwards it to its ranks)."""
        self.proc.send_signal(sig)

    def kill_group(self) -> None:
        """SIGKILL every process of the launch, and remove its shared-memory buffers."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        cleanup_shm(self.port)

    def wait(self, timeout_s: float) -> int:
        """The exit status; past ``timeout_s`` the whole group is killed (status -9)."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_group()
            with open(self.log, "a") as f:
                f.write(f"\n[launch] killed after {timeout_s:.0f}s\n")
        cleanup_shm(self.port)
        return self.proc.returncode

    def wait_for(self, path: Path, timeout_s: float) -> None:
        """Wait until ``path`` exists; AssertionError (with the output) if the run exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited ({self.proc.returncode}) before {path}:\n{self.output[-4000:]}")
            if time.monotonic() > deadline:
                self.kill_group()
                raise AssertionError(f"no {path} after {timeout_s:.0f}s:\n{self.output[-4000:]}")
            time.sleep(0.05)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def run(cmd: list[str], timeout_s: float, port: int | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion in its own session; ``stdout`` holds stdout and stderr.

    ``port`` is the one ``cmd`` uses (``deepspeed_cmd``); a fresh free one by default. Past
    ``timeout_s`` every process of the launch is killed; its ``/dev/shm`` buffers are removed
    in any case.
    """
    port = port or free_port()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=subprocess_env(port, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # every rank, not only the launcher
        output, _ = proc.communicate()
        output += f"\n[launch] killed after {timeout_s:.0f}s"
    finally:
        cleanup_shm(port)
    return subprocess.CompletedProcess(cmd, proc.returncode, output)


def run_two_rank_script(script: Path, out: Path, timeout_s: float = 480) -> list[dict]:
    """``deepspeed --num_gpus 2 SCRIPT --out OUT`` (one thread per rank), which must exit 0;
    returns each rank's ``OUT/rank<r>.json``."""
    port = free_port()
    t0 = time.time()
    proc = run(
        deepspeed_cmd(2, port, str(script), "--out", str(out)),
        timeout_s=timeout_s,
        port=port,
        OMP_NUM_THREADS="1",
    )
    print(f"deepspeed run: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout[-8000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def start_reward_server(tmp: Path, *args: str, port: int | None = None, name: str = "serve", **env: str):
    """``python -m tritonrlhf.engine.rewards.serve ARGS`` (``engine.rl.serve_reward`` with
    ``--reward-model``) on 127.0.0.1: ``(Launch, url)`` once ``/health`` answers."""
    from tritonrlhf.engine.rewards import RewardError
    from tritonrlhf.engine.rewards.http import wait_healthy

    port = port or free_port()
    module = (
        "tritonrlhf.engine.rl.serve_reward" if "--reward-model" in args else "tritonrlhf.engine.rewards.serve"
    )
    cmd = [sys.executable, "-m", module, *args, "--host", "127.0.0.1", "--port", str(port)]
    launch = Launch(cmd, tmp / f"{name}.log", port=port, **env)
    url = f"http://127.0.0.1:{port}/score"
    try:
        wait_healthy(url, timeout_s=90)
    except RewardError:
        launch.kill_group()
        raise AssertionError(f"server did not start:\n{launch.output[-3000:]}") from None
    return launch, url
