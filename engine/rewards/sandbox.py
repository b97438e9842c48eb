"""A sandbox for untrusted Python (a model's code): limits, no network, a throwaway directory.

Every program runs in a freshly forked process that, before the program's first line:

- leaves for its own **network namespace** (no network, not even the host's loopback) and mount
  namespace in which **every mount is read-only** but the program's fresh temporary directory (its
  cwd, ``HOME`` and ``TMPDIR``, deleted afterwards);
- takes **rlimits**: CPU seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``), file size
  (``RLIMIT_FSIZE``), processes (``RLIMIT_NPROC``), no core dumps;
- switches to an **unprivileged uid** of its own. Root ignores ``RLIMIT_NPROC`` and every file
  mode, so the uid is what makes the process limit and the read-only rest real; one uid per worker
  (``uid_base + slot``, slots locked across processes) also lets the sandbox kill everything the
  program left behind, forked or daemonised, with one ``kill(-1)`` as that uid.

It is killed with its whole process group at the wall-clock limit or when its output passes
``output_bytes`` (stdout and stderr come back cut there, ``output_limited``).

What this machine allows decides the strength: as root with namespaces (this project's CI and the
dev container) all of the above holds. Without root, the child makes a user namespace for the
network and mount namespaces and keeps the caller's uid (``RLIMIT_NPROC`` then counts all of that
user's processes, and no uid sweep runs). Where no network namespace can be made at all the sandbox
says so and refuses to run unless ``allow_network=True`` opts out by name.

``run_code`` starts one interpreter per program (the plain mode); ``SandboxPool`` keeps fork-server
workers warm so a program costs a fork, with the same isolation steps per program.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_WORKER = Path(__file__).with_name("_sandbox_worker.py")
_STATE = Path(os.environ.get("TRITONRLHF_SANDBOX_DIR", "/tmp/tritonrlhf-sandbox"))
_GRACE_S = 10.0  # how much longer than wall_s the caller waits for a worker's answer


@dataclass
class SandboxConfig:
    """Limits of one program run.

    cpu_s:         CPU seconds (RLIMIT_CPU; SIGXCPU then SIGKILL one second later).
    wall_s:        wall-clock seconds before the whole process group is killed.
    memory_mb:     address space (RLIMIT_AS), per process.
    file_mb:       largest file the program may write (RLIMIT_FSIZE).
    max_procs:     processes and threads of the program's uid (RLIMIT_NPROC), the program included.
    output_bytes:  stdout and stderr are each cut here, and the program is stopped when it passes it.
    allow_network: run even where no network namespace can be made (opting out of "no network").
    uid_base:      first of the unprivileged uids the programs run as (one per concurrent worker).
    """

    cpu_s: int = 5
    wall_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16
    max_procs: int = 32
    output_bytes: int = 65536
    allow_network: bool = False
    uid_base: int = 1_990_000


@dataclass
class SandboxResult:
    """One program's outcome.

    returncode:     the exit status; negative = killed by that signal (as ``subprocess``).
    stdout, stderr: decoded text, each at most ``output_bytes`` bytes.
    timed_out:      killed at ``wall_s``.
    output_limited: stdout or stderr passed ``output_bytes`` (the program was stopped there).
    wall_s:         seconds from fork to the end.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    output_limited: bool = False
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_limited


class SandboxUnavailable(RuntimeError):
    """The machine cannot isolate programs as asked (e.g. no network namespace)."""


def _request(code: str, stdin: str, cfg: SandboxConfig) -> bytes:
    req = asdict(cfg)
    req.update(code=code, stdin=stdin)
    body = json.dumps(req).encode()
    return struct.pack("<I", len(body)) + body


class _Slot:
    """A uid held for as long as this object lives, locked against other processes (flock)."""

    def __init__(self, uid_base: int, tries: int = 4096):
        import fcntl

        locks = _STATE / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        os.chmod(_STATE, 0o711)  # programs traverse it to their own directory, never list it
        os.chmod(locks, 0o700)
        for i in range(tries):
            f = open(locks / f"{uid_base + i}", "w")  # noqa: SIM115 - held until release()
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            self._file, self.uid = f, uid_base + i
            return
        raise SandboxUnavailable(f"no free sandbox uid in {uid_base}..{uid_base + tries - 1}")

    def release(self) -> None:
        self._file.close()


class _Worker:
    """One fork-server process (``_sandbox_worker.py``) and the uid its programs run as."""

    def __init__(self, uid_base: int):
        self.slot = _Slot(uid_base)
        work = _STATE / "work"
        work.mkdir(parents=True, exist_ok=True)
        os.chmod(work, 0o711)
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(_WORKER), str(self.slot.uid), str(work)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            # The programs are forks of this process, so its memory (/proc/self/environ included)
            # must hold none of the caller's secrets (tokens, API keys).
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
        )

    def run(self, code: str, stdin: str, cfg: SandboxConfig) -> SandboxResult:
        """Send one program, wait for its result (at most ``wall_s`` plus a grace period)."""
        result: list[dict | None] = [None]

        def exchange() -> None:
            self.proc.stdin.write(_request(code, stdin, cfg))
            self.proc.stdin.flush()
            head = self.proc.stdout.read(4)
            if len(head) == 4:
                result[0] = json.loads(self.proc.stdout.read(struct.unpack("<I", head)[0]))

        t = threading.Thread(target=exchange, daemon=True)
        t.start()
        t.join(cfg.wall_s + _GRACE_S)
        out = result[0]
        if out is None or "error" in out:
            self.close()
            why = "no answer" if out is None else out["error"]
            raise RuntimeError(f"sandbox worker failed: {why}")
        if out.pop("setup_failed"):
            raise SandboxUnavailable(out["stderr"].strip())
        return SandboxResult(**out)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Stop the worker, kill whatever still runs as its uid, free the uid."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        if os.geteuid() == 0:
            subprocess.run(["kill", "-KILL", "-1"], user=self.slot.uid, capture_output=True, timeout=10)
        self.slot.release()


_checked: set[bool] = set()
_check_lock = threading.Lock()


def check_isolation(cfg: SandboxConfig) -> None:
    """Once per process and ``allow_network`` value: can this machine isolate a program?

    Logs what the sandbox runs with; raises ``SandboxUnavailable`` (naming the opt-out) where no
    network namespace can be made and ``cfg.allow_network`` is False.
    """
    with _check_lock:
        if cfg.allow_network in _checked:
            return
        worker = _Worker(cfg.uid_base)
        try:
            worker.run("pass", "", cfg)
        except SandboxUnavailable as e:
            raise SandboxUnavailable(
                f"the code sandbox cannot isolate programs here ({e}); it refuses to run them with "
                "network access unless asked: SandboxConfig(allow_network=True) / sandbox.allow_network=true"
            ) from None
        finally:
            worker.close()
        root = os.geteuid() == 0
        log.info(
            "code sandbox: %s, read-only mounts but its directory, %s, rlimits (cpu %ss, memory %s MB, "
            "files %s MB, %s processes)",
            "network allowed" if cfg.allow_network else "no network (own namespace)",
            f"uids from {cfg.uid_base}"
            if root
            else "the caller's uid (not root: RLIMIT_NPROC counts all its processes)",
            cfg.cpu_s,
            cfg.memory_mb,
            cfg.file_mb,
            cfg.max_procs,
        )
        _checked.add(cfg.allow_network)


def run_code(code: str, stdin: str = "", cfg: SandboxConfig | None = None) -> SandboxResult:
    """Run ``code`` as a program in a fresh sandboxed interpreter (one start-up per call)."""
    cfg = cfg or SandboxConfig()
    check_isolation(cfg)
    worker = _Worker(cfg.uid_base)
    try:
        return worker.run(code, stdin, cfg)
    finally:
        worker.close()


class SandboxPool:
    """Warm fork-server workers running programs concurrently, one program per fresh fork.

    ``workers`` programs run at once; each worker has its own uid. A worker that fails (or whose
    answer does not come within ``wall_s`` plus a grace period) is replaced. Use as a context
    manager, or call ``close()``.
    """

    def __init__(self, cfg: SandboxConfig | None = None, workers: int | None = None):
        self.cfg = cfg or SandboxConfig()
        check_isolation(self.cfg)
        self.n = workers or os.cpu_count() or 1
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        for _ in range(self.n):
            self._add()
        self._executor = ThreadPoolExecutor(self.n, thread_name_prefix="sandbox")

    def _add(self) -> None:
        w = _Worker(self.cfg.uid_base)
        with self._lock:
            self._all.append(w)
        self._idle.put(w)

    def run(self, code: str, stdin: str = "") -> SandboxResult:
        """Run one program on the next idle worker.

        A worker that breaks (no answer within ``wall_s`` plus a grace period) is replaced and the
        program reported as killed (returncode -9, the reason in stderr); ``SandboxUnavailable``
        is raised.
        """
        w = self._idle.get()
        try:
            result = w.run(code, stdin, self.cfg)
        except Exception as e:
            with self._lock:
                self._all.remove(w)
            w.close()
            self._add()
            if isinstance(e, SandboxUnavailable):
                raise
            log.warning("sandbox worker replaced: %s", e)
            return SandboxResult(returncode=-9, stdout="", stderr=str(e), timed_out=True)
        self._idle.put(w)
        return result

    def map(self, programs: Sequence[tuple[str, str]]) -> list[SandboxResult]:
        """Run ``(code, stdin)`` pairs concurrently; results in the same order."""
        return list(self._executor.map(lambda p: self.run(*p), programs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        with self._lock:
            workers, self._all = self._all, []
        for w in workers:
            w.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
