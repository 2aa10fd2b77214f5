"""Child processes that end with their parent, however it ends, and who holds a port.

Every server and service that `lineguard up` and `lineguard demo` start runs in its own session (so a
terminal's Ctrl-C or hang-up reaches only the parent, which stops them in order) and with
`prctl(PR_SET_PDEATHSIG)`: when the parent dies without cleaning up (SIGKILL, a crash), the kernel
signals the child, so nothing is left holding the ports.

    >>> subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))

The death signal follows the *thread* that started the child: start children from the main thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time

import psutil

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)   # resolved in the parent: the forked child only calls it


def die_with_parent(death_signal: int = signal.SIGTERM):
    """A `preexec_fn` for Popen: the child receives `death_signal` when this process dies."""
    parent = os.getpid()
    prctl = _libc.prctl

    def set_death_signal() -> None:   # runs in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
        if os.getppid() != parent:    # the parent died before prctl: no signal will come, act now
            os.kill(os.getpid(), death_signal)

    return set_death_signal


def create_time(pid: int) -> float | None:
    """The process's start time (seconds since the epoch), None when it is gone; with the pid it names a
    process for good, since pids are reused."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.Error, ValueError):
        return None


def same_process(pid: int | None, started: float | None) -> bool:
    """Is `pid` still the process that started at `started` (as recorded by `create_time`)?"""
    if not pid:
        return False
    now = create_time(pid)
    return now is not None and (started is None or abs(now - started) < 1.0)


def terminate(pid: int, timeout_s: float = 10.0, group: bool = True) -> None:
    """SIGTERM (to its process group when it leads one), SIGKILL after timeout_s; returns when it is gone."""
    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group and os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    send(signal.SIGTERM)
    try:
        psutil.Process(pid).wait(timeout_s)
    except psutil.TimeoutExpired:
        send(signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(5)
    except psutil.Error:
        pass


def stop_children(processes, timeout_s: float = 10.0, group: bool = True) -> None:
    """Stop child processes (`subprocess.Popen`): SIGTERM to every one still running (to its process group:
    `group`), then wait for each; one still running after `timeout_s` gets SIGKILL. The one stop of the
    embedded stack's servers, the demo's services and the benchmarks' workers."""
    processes = list(processes)

    def send(process, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)

    for process in processes:
        if process.poll() is None:
            send(process, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            send(process, signal.SIGKILL)
            process.wait(5)


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if create_time(pid) is None:
            return True
        time.sleep(0.1)
    return create_time(pid) is None


def port_holder(port: int) -> str | None:
    """'pid 123 (tansu broker --listener-url ...)' for the process listening on 127.0.0.1:port, if any."""
    try:
        connections = psutil.net_connections("tcp")
    except psutil.Error:
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
            if connection.pid is None:
                return "another user's process"
            try:
                command = " ".join(psutil.Process(connection.pid).cmdline())[:120]
            except psutil.Error:
                command = "?"
            return f"pid {connection.pid} ({command})"
    return None


def memory_bytes(pid: int) -> tuple[int, int]:
    """(resident, peak resident) of a process, from /proc/<pid>/status (VmRSS, VmHWM)."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                found[line[:5]] = int(line.split()[1]) * 1024
    return found["VmRSS"], found["VmHWM"]
