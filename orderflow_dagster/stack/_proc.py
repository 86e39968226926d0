"""Process, PID-file and port helpers shared by the Kafka and Postgres service wrappers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path


class StackError(RuntimeError):
    """A local service could not be started or stopped; the message says why and what to do."""


def log(message: str) -> None:
    """Progress goes to stderr: stdout of `orderflow stack up` is reserved for `export` lines."""
    print(f"[stack] {message}", file=sys.stderr, flush=True)


def read_pid(path: Path) -> int | None:
    """The PID in the first line of `path`, or None if the file is missing or garbled."""
    try:
        first_line = path.read_text().splitlines()[0]
        return int(first_line.strip())
    except (OSError, IndexError, ValueError):
        return None


def pid_exists(pid: int) -> bool:
    """Whether `pid` is in the process table at all, zombies included."""
    # A child of this very process (started through the Python API in the same interpreter)
    # stays a zombie after it exits until reaped: reap it here.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else (e.g. the postgres user when we are not root)
    return True


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as dead)."""
    if not pid_exists(pid):
        return False
    try:
        # /proc/<pid>/stat: "pid (comm) S ..."; the state follows the last ')'.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): trust kill(0)
    return state not in ("Z", "X")


def wait_gone(pid: int, timeout: float = 15.0) -> None:
    """Wait until a dead `pid` has been reaped by its parent (usually init, for our detached
    servers). Postgres treats a PID that still exists, even as a zombie, as a running postmaster
    and refuses to start over its stale postmaster.pid."""
    wait_until(lambda: not pid_exists(pid), timeout, interval=0.05)


def cmdline(pid: int) -> str:
    """The command line of `pid` as one string ('' if unknown), to tell our process from a
    recycled PID."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc; empty elsewhere)."""
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        if ppid == pid:
            children.append(int(stat_file.parent.name))
    return children


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def require_free_port(port: int, what: str, env_var: str) -> None:
    """Fail early with a clear message rather than have a server die on a bind error later."""
    if port_open(port):
        raise StackError(
            f"cannot start {what}: port {port} on 127.0.0.1 is already in use by another "
            f"process. Stop it or choose another port with {env_var}=<port>."
        )


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; returns its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def terminate(pid: int, grace_seconds: float) -> None:
    """SIGTERM `pid`, then SIGKILL if it is still alive after `grace_seconds`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if wait_until(lambda: not pid_alive(pid), grace_seconds):
        wait_gone(pid)
        return
    log(f"pid {pid} did not exit within {grace_seconds:.0f}s of SIGTERM; sending SIGKILL")
    kill(pid)


def kill(*pids: int) -> None:
    """SIGKILL every pid at once, then wait (briefly) until all are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        wait_until(lambda pid=pid: not pid_alive(pid), 10)
        wait_gone(pid)


def tail(path: Path, lines: int = 20, width: int = 300) -> str:
    """The last `lines` lines of a log file, each cut to `width` characters, for error messages
    (Kafka's lines can run to kilobytes)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(line[:width] for line in text.splitlines()[-lines:])


def write_private(path: Path, content: str) -> None:
    """Write a file readable only by its owner, never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file
