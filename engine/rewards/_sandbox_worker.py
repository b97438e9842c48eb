"""The sandbox's worker: a fork server that runs one untrusted Python program per request.

Started as its own interpreter (``python -I _sandbox_worker.py UID``) by ``sandbox.py``, it reads
length-prefixed JSON requests on stdin and answers each with a JSON result on stdout. For every
request it forks a fresh child that isolates itself before running the program:

1. its own session and process group (killed as a whole on timeout);
2. its own network namespace (no interface but a downed loopback) and mount namespace, where every
   mount is read-only except the program's fresh directory, and directories the interpreter needs
   behind a non-traversable parent (``/root/.pyenv``) are re-exposed on a tmpfs that hides the rest;
3. CPU-time, address-space, file-size and process-count rlimits;
4. an unprivileged uid of its own (one per worker, so ``RLIMIT_NPROC`` counts only this program's
   processes and a sweep ``kill(-1)`` as that uid reaps everything it left behind, daemons included);
5. ``no_new_privs``, cwd/HOME/TMPDIR in the fresh directory, a clean environment.

Plain mode starts one worker per program (an interpreter start-up each); ``SandboxPool`` keeps
workers alive, so a program costs a fork instead. Both apply the same steps per program.

Stdlib only, no package imports: this file runs as a script in a bare interpreter.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
SYS_MOUNT_SETATTR = 442  # x86_64 and aarch64 share the generic number
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SETUP_FAILED = 125  # exit status of a child whose isolation could not be set up

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {dst}")


def _read_only_root() -> None:
    """Make every mount of this (private) mount namespace read-only, recursively."""

    class MountAttr(ctypes.Structure):
        _fields_ = [
            ("attr_set", ctypes.c_uint64),
            ("attr_clr", ctypes.c_uint64),
            ("propagation", ctypes.c_uint64),
            ("userns_fd", ctypes.c_uint64),
        ]

    attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    rc = _libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(-100),  # AT_FDCWD
        ctypes.c_char_p(b"/"),
        ctypes.c_uint(AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if rc == 0:
        return
    # Kernels before 5.12: remount each mount point read-only, one by one.
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted(set(points), key=len):
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_REC)
        except OSError:
            pass


def _expose(paths: list[str], uid: int) -> None:
    """Let ``uid`` reach ``paths`` (the interpreter's prefixes) whose parent it cannot traverse.

    The first non-traversable ancestor (e.g. ``/root``, mode 0700) is covered by a tmpfs holding
    only bind mounts of the needed paths, so the rest of it (a home's keys, tokens) stays hidden.
    """
    plan = []  # (blocked ancestor, path, O_PATH fd), worked out before anything is covered
    for path in dict.fromkeys(os.path.realpath(p) for p in paths):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            anc = "/" + "/".join(parts[:i])
            st = os.stat(anc)
            if not (st.st_mode & 0o001) and st.st_uid != uid:
                plan.append((anc, path, os.open(path, os.O_PATH)))
                break
    covered = set()
    for blocked, path, fd in plan:
        if blocked not in covered:
            _mount("tmpfs", blocked, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
            covered.add(blocked)
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)


def _isolate(req: dict, uid: int, workdir: str, input_fd: int, out_w: int, err_w: int) -> None:
    """In the forked child: everything but running the program (see the module docstring)."""
    os.setsid()
    root = os.geteuid() == 0
    flags = CLONE_NEWNS | (0 if req["allow_network"] else CLONE_NEWNET)
    if not root:
        flags |= CLONE_NEWUSER
        my_uid, my_gid = os.getuid(), os.getgid()
    try:
        _check(_libc.unshare(ctypes.c_int(flags)), "unshare")
    except OSError:
        if not req["allow_network"]:
            raise
        flags = 0  # opted out by name: rlimits (and the uid, as root) only
    if flags and not root:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {my_uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {my_gid} 1")
    if flags:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        if root:
            _expose([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix], uid)
        _read_only_root()
        _mount(workdir, workdir, None, MS_BIND)  # a fresh bind mount is writable again
        _mount(None, workdir, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)

    mb = 1 << 20
    limits = {
        resource.RLIMIT_CPU: (req["cpu_s"], req["cpu_s"] + 1),
        resource.RLIMIT_AS: (req["memory_mb"] * mb, req["memory_mb"] * mb),
        resource.RLIMIT_FSIZE: (req["file_mb"] * mb, req["file_mb"] * mb),
        resource.RLIMIT_NPROC: (req["max_procs"], req["max_procs"]),
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, value in limits.items():
        resource.setrlimit(which, value)

    os.dup2(input_fd, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.closerange(3, 1 << 16)
    if root:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update(
        HOME=workdir,
        TMPDIR=workdir,
        PATH="/usr/local/bin:/usr/bin:/bin",
        LANG="C.UTF-8",
        PYTHONIOENCODING="utf-8",
    )
    tempfile.tempdir = workdir
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def _run_program(path: str) -> int:
    """Run the program at ``path`` as ``python path`` would, in this (isolated) process."""
    import atexit
    import io

    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace"
    )
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
    sys.argv = [path]
    sys.path[0:0] = [os.path.dirname(path)]
    code = 0
    try:
        with open(path, encoding="utf-8") as f:
            src = f.read()
        exec(
            compile(src, path, "exec"),
            {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__},
        )
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:
        # As ``python path`` prints it: from the program's first frame, not this function's.
        traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    return code & 0xFF


def _live(uid: int) -> list[int]:
    """Processes running as ``uid`` (zombies waiting for us to reap them left out)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
                with open(f"/proc/{name}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
            except OSError:
                continue
            pids.append(int(name))
    return pids


def _sweep(uid: int, budget_s: float = 5.0) -> None:
    """Kill every process left running as ``uid`` (forks, daemons) and reap what reparented to us.

    ``kill(-1)`` from a process of that uid reaches all of them at once and atomically with respect
    to fork (a fork bomb cannot outrun it); repeated until none is left.
    """
    if os.geteuid() != 0:
        return
    end = time.monotonic() + budget_s
    while _live(uid) and time.monotonic() < end:
        pid = os.fork()
        if pid == 0:
            try:
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)  # every process of this uid but the caller
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.002)
        _reap()
    _reap()


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def run_one(req: dict, uid: int, base: str) -> dict:
    """Fork a child, isolate it, run ``req["code"]`` in it; return status, stdout and stderr."""
    workdir = tempfile.mkdtemp(prefix="sbx-", dir=base)
    os.chmod(workdir, 0o700)
    if os.geteuid() == 0:
        os.chown(workdir, uid, uid)
    path = os.path.join(workdir, "main.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(req["code"])
    if os.geteuid() == 0:
        os.chown(path, uid, uid)
    input_fd = os.memfd_create("stdin")
    os.write(input_fd, req.get("stdin", "").encode())
    os.lseek(input_fd, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            _isolate(req, uid, workdir, input_fd, out_w, err_w)
        except BaseException as e:
            try:
                os.write(err_w if err_w > 2 else 2, f"sandbox setup failed: {e!r}\n".encode())
            finally:
                os._exit(SETUP_FAILED)
        os._exit(_run_program(path))
    os.close(out_w)
    os.close(err_w)
    os.close(input_fd)

    limit = req["output_bytes"]
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = [out_r, err_r]
    deadline = start + req["wall_s"]
    timed_out = output_limit = False
    status = None
    while open_fds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        ready, _, _ = select.select(open_fds, [], [], min(remaining, 0.5))
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.remove(fd)
                continue
            room = limit - len(bufs[fd])
            bufs[fd] += chunk[: max(room, 0)]
            if len(chunk) > room:
                output_limit = True
        if output_limit:
            break
        if status is None:
            got, st = os.waitpid(pid, os.WNOHANG)
            if got:
                status = st
                _sweep(uid)  # background children could hold the pipes open
    # Stop everything: the child's group, then whatever escaped it under our uid.
    if status is None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
    _sweep(uid)
    _reap()
    wall = time.monotonic() - start
    for fd in (out_r, err_r):
        if fd in open_fds:
            os.set_blocking(fd, False)
            try:  # what is already in the pipe, up to the limit
                while len(bufs[fd]) < limit:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        break
                    bufs[fd] += chunk[: limit - len(bufs[fd])]
            except (BlockingIOError, OSError):
                pass
        os.close(fd)
    shutil.rmtree(workdir, ignore_errors=True)
    code = os.waitstatus_to_exitcode(status)
    return {
        "returncode": code,
        "stdout": bufs[out_r].decode("utf-8", "replace"),
        "stderr": bufs[err_r].decode("utf-8", "replace"),
        "timed_out": timed_out,
        "output_limited": output_limit,
        "setup_failed": code == SETUP_FAILED and bufs[err_r].startswith(b"sandbox setup failed"),
        "wall_s": wall,
    }


def _read_exact(f, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main() -> None:
    uid = int(sys.argv[1])
    base = sys.argv[2]
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of a program come back to us
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the process that started us
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = _read_exact(stdin, 4)
        if head is None:
            return
        (n,) = struct.unpack("<I", head)
        body = _read_exact(stdin, n)
        if body is None:
            return
        try:
            result = run_one(json.loads(body), uid, base)
        except Exception as e:  # the worker's own failure, not the program's
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        out = json.dumps(result).encode()
        stdout.write(struct.pack("<I", len(out)) + out)
        stdout.flush()


if __name__ == "__main__":
    try:
        main()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
