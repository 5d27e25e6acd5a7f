"""Process bookkeeping for the local stack: start a program in its own session with a PID file,
tell whether it still runs, stop its whole process group (SIGTERM, then SIGKILL) and find strays.

A PID file is JSON: ``{"pid", "start", "cmd", "log"}``; ``start`` is the kernel's start time of
the process (``/proc/<pid>/stat`` field 22), so a recycled PID is never mistaken for ours.
Every started program gets ``DETAILFUSION_STACK_HOME=<home>`` in its environment; ``strays()``
finds processes of a home that are not in any PID file (children that left their group).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

HOME_VAR = "DETAILFUSION_STACK_HOME"
_CHILDREN: dict[int, subprocess.Popen] = {}  # started by this Python process: reaped on poll
_EXIT_CODES: dict[int, int] = {}  # their exit codes once reaped


class StackError(RuntimeError):
    """Something in the stack could not start or stop; ``str()`` is one line naming the cause."""

    def __init__(self, message: str, service: str | None = None, log: Path | None = None,
                 cmd: list[str] | None = None):  # fmt: skip
        super().__init__(message)
        self.service, self.log, self.cmd = service, log, cmd


def _stat(pid: int | str) -> tuple[int, int] | None:
    """(process group, start time in clock ticks since boot) of a live process, else None.

    A zombie whose other threads still run (the main thread of a multi-threaded program exited
    first) is still alive: the kernel reaps it only when its last thread ends.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):
        try:
            if len(os.listdir(f"/proc/{pid}/task")) <= 1:
                return None
        except OSError:
            return None
    return int(fields[2]), int(fields[19])


def _ancestors(pid: int) -> list[int]:
    """Parent, grandparent, ... of ``pid`` (up to init)."""
    chain = []
    while pid > 1 and len(chain) < 64:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
        chain.append(pid)
    return chain


def _start_time(pid: int) -> int | None:
    found = _stat(pid)
    return found[1] if found else None


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        _EXIT_CODES[pid] = _CHILDREN.pop(pid).returncode


def read_pidfile(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info.get("pid"), int) else None
    except (OSError, ValueError, AttributeError):
        return None


def alive(info: dict | None) -> bool:
    """True when the process recorded in ``info`` is running (and is the same process)."""
    if not info:
        return False
    _reap(info["pid"])
    start = _start_time(info["pid"])
    return start is not None and start == info.get("start")


def group_alive(pgid: int) -> bool:
    """True while any live process is left in process group ``pgid``."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            found = _stat(proc.name)
            if found and found[0] == pgid:
                return True
    return False


def _default_signals() -> None:
    # A worker started from a non-interactive shell inherits an ignored SIGINT and then never
    # stops on SIGTERM (Prefect's handler re-sends SIGINT): give children the default handlers.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def spawn(name: str, cmd: list[str], log: Path, pidfile: Path, env: dict[str, str],
          user: str | None = None, cwd: Path | None = None) -> dict:  # fmt: skip
    """Start ``cmd`` in a new session (it leads its own process group), output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                start_new_session=True, preexec_fn=_default_signals, user=user, group=user,
            )  # fmt: skip
        except OSError as exc:
            raise StackError(f"{name}: cannot run {cmd[0]}: {exc.strerror or exc}", name, log, cmd) from exc
    _CHILDREN[proc.pid] = proc
    info = {"pid": proc.pid, "start": _start_time(proc.pid), "cmd": cmd, "log": str(log)}
    pidfile.write_text(json.dumps(info))
    return info


def exit_code(info: dict) -> str:
    """The exit code of a process this Python started ("?" for one started by another command)."""
    _reap(info["pid"])
    code = _EXIT_CODES.get(info["pid"])
    return "?" if code is None else str(code)


def stop(info: dict | None, pidfile: Path | None = None, first: signal.Signals = signal.SIGTERM,
         group_signal: bool = True, timeout_s: float = 20.0) -> None:  # fmt: skip
    """Stop the process and its whole group: ``first`` signal, then SIGKILL after ``timeout_s``."""
    stop_all([(info, pidfile, first, group_signal)], timeout_s)


def stop_all(items: list[tuple[dict | None, Path | None, signal.Signals, bool]], timeout_s: float = 20.0) -> None:
    """Stop several processes at once; each item is ``(info, pidfile, first signal, to the group?)``.

    Each gets its first signal, then whatever is left of it or of its process group after
    ``timeout_s`` gets SIGKILL. PID files are removed.
    """
    live = [it for it in items if it[0]]

    def left(info: dict) -> bool:
        return alive(info) or group_alive(info["pid"])

    for info, _, first, group_signal in live:
        if not alive(info):
            continue  # the leader is gone: whatever is left of its group gets SIGKILL below
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group_signal:
                os.killpg(info["pid"], first)
            else:
                os.kill(info["pid"], first)
    deadline = time.monotonic() + timeout_s
    while any(alive(info) for info, *_ in live) and time.monotonic() < deadline:
        time.sleep(0.1)
    for sig_deadline in (time.monotonic() + 2, time.monotonic() + 5):
        pending = [info for info, *_ in live if left(info)]
        if not pending:
            break
        for info in pending:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(info["pid"], signal.SIGKILL)
        while any(left(info) for info in pending) and time.monotonic() < sig_deadline:
            time.sleep(0.1)
    for info, pidfile, *_ in items:
        if info:
            _reap(info["pid"])
        if pidfile is not None:
            with contextlib.suppress(FileNotFoundError):
                pidfile.unlink()


def strays(home: Path, by_cmdline: bool = False, groups: set[int] = frozenset()) -> list[int]:
    """PIDs of live processes started for ``home`` (environment marker; with ``by_cmdline`` also
    any process whose command line names ``home``), except members of the process ``groups`` and
    their descendants (e.g. PostgreSQL's backends, which start their own sessions)."""
    marker = f"{HOME_VAR}={home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        pstat = _stat(proc.name)
        if pstat is None or pstat[0] in groups or set(_ancestors(int(proc.name))) & set(groups):
            continue
        if marker in environ.split(b"\0") or (by_cmdline and str(home).encode() in cmdline):
            found.append(int(proc.name))
    return sorted(found)


def kill_strays(home: Path) -> list[int]:
    pids = strays(home)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        _reap(pid)
    return pids


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
        return False


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
