"""The embedded local stack: a Tansu Kafka broker and an InfluxDB 1.x server, as child processes.

    >>> from lineguard.settings import load_settings
    >>> with EmbeddedStack(load_settings(embedded_kafka_port=0, embedded_influx_port=0)) as stack:
    ...     print(stack.kafka_bootstrap, stack.influx_url)

Each server runs in its own process group, so `stop()` takes down everything it started, and dies with
this process however it ends (`lineguard/processes.py`). The endpoints and PIDs go to
`<state_dir>/stack.json`, where other commands find them; `stop_recorded_stack` (`lineguard down`)
stops the stack a file names, and `start()` clears a stale one (owner gone) before it begins.

`start()` also applies the records database's migrations (`migrate_records`), once, before any service can
start: the services only check the schema revision. The state dir is made private (0700).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lineguard import tansu
from lineguard.db import private_dir, redact_url
from lineguard.db import upgrade as upgrade_records
from lineguard.kafka import ensure_topics
from lineguard.logging import get_logger
from lineguard.processes import (
    create_time,
    die_with_parent,
    port_holder,
    same_process,
    stop_children,
    terminate,
    wait_gone,
)
from lineguard.settings import Settings

log = get_logger(__name__)

INFLUXD_CONFIG = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{root}/meta"

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = false
  log-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = true
"""


class StackError(Exception):
    """The embedded stack could not start; the message says which server and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int) -> bool:
    """Is the process running? A zombie (exited, not yet reaped) counts as gone."""
    return create_time(pid) is not None


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path


class EmbeddedStack:
    """Start/stop the local Tansu + influxd servers and create every topic."""

    def __init__(self, settings: Settings, *, with_influx: bool = True, ready_timeout_s: float = 30.0):
        self.settings = settings
        self.with_influx = with_influx
        self.ready_timeout_s = ready_timeout_s
        self.state_dir = settings.state_dir.resolve()
        self.children: list[Child] = []
        self.kafka_port = settings.embedded_kafka_port or free_port()
        self.influx_port = settings.embedded_influx_port or free_port()
        self.kafka_bootstrap = f"127.0.0.1:{self.kafka_port}"
        self.influx_url = f"http://127.0.0.1:{self.influx_port}"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> EmbeddedStack:
        clear_stale_stack(self.settings)
        private_dir(self.state_dir, existing_too=True)     # conversations and notes: this user's alone
        try:
            self._start_kafka()
            if self.with_influx:
                self._start_influx()
            self._write_stack_file()
            settings = self.settings.model_copy(update={"kafka_bootstrap": self.kafka_bootstrap})
            asyncio.run(ensure_topics(settings))
            migrate_records(self.settings)      # before any service can start: they only check the revision
        except BaseException:
            self.stop()
            raise
        log.info("stack_up", kafka=self.kafka_bootstrap, influx=self.influx_url if self.with_influx else None,
                 state_dir=str(self.state_dir))
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every child (SIGTERM to its process group, SIGKILL after timeout_s)."""
        for child in reversed(self.children):
            self._stop_child(child, timeout_s)
        self.children.clear()
        with contextlib.suppress(FileNotFoundError):
            stack_file = self.settings.stack_file.resolve()
            if stack_file.exists() and json.loads(stack_file.read_text()).get("owner_pid") == os.getpid():
                stack_file.unlink()

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pids(self) -> dict[str, int]:
        return {child.name: child.process.pid for child in self.children}

    def stop_influx(self, timeout_s: float = 10.0) -> None:
        """Stop only the influxd child (its data stays); `start_influx()` brings it back on the same port."""
        for child in [c for c in self.children if c.name == "influxd"]:
            self._stop_child(child, timeout_s)
            self.children.remove(child)

    def start_influx(self) -> None:
        """Start influxd again (after `stop_influx()`), on the same port and data directory."""
        if any(c.name == "influxd" for c in self.children):
            return
        self._start_influx()

    def dead_children(self) -> list[str]:
        return [child.name for child in self.children if child.process.poll() is not None]

    # -- servers -----------------------------------------------------------------------------
    def _start_kafka(self) -> None:
        _refuse_busy_port(self.kafka_port, "LINEGUARD_EMBEDDED_KAFKA_PORT")
        child = self._spawn("tansu", tansu.broker_command(self.kafka_port))
        self._wait(child, lambda: port_in_use(self.kafka_port))

    def _start_influx(self) -> None:
        influxd = shutil.which("influxd") or "/usr/bin/influxd"
        if not Path(influxd).exists():
            raise StackError("influxd not found: install the Debian package 'influxdb' (make install does)")
        _refuse_busy_port(self.influx_port, "LINEGUARD_EMBEDDED_INFLUX_PORT")
        root = self.state_dir / "influxdb"
        root.mkdir(parents=True, exist_ok=True)
        config = root / "influxdb.conf"
        config.write_text(INFLUXD_CONFIG.format(root=root, http_port=self.influx_port, rpc_port=free_port()))
        child = self._spawn("influxd", [influxd, "-config", str(config)])
        self._wait(child, self._influx_ready)
        self._influx_query(f'CREATE DATABASE "{self.settings.influx_database}"')

    def _influx_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.influx_url}/ping", timeout=1) as response:
                return response.status == 204
        except (urllib.error.URLError, OSError):
            return False

    def _influx_query(self, query: str) -> dict:
        data = urllib.parse.urlencode({"q": query}).encode()
        with urllib.request.urlopen(f"{self.influx_url}/query", data=data, timeout=10) as response:
            return json.loads(response.read())

    # -- helpers -----------------------------------------------------------------------------
    def _spawn(self, name: str, command: list[str]) -> Child:
        log_path = self.state_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=die_with_parent(signal.SIGTERM))
        child = Child(name, process, log_path)
        self.children.append(child)
        log.info("server_started", server=name, pid=process.pid, log=str(log_path))
        return child

    def _wait(self, child: Child, ready) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                tail = child.log_path.read_text(errors="replace")[-800:]
                raise StackError(f"{child.name} exited with code {child.process.returncode}: {tail.strip()}")
            if ready():
                return
            time.sleep(0.1)
        raise StackError(f"{child.name} was not ready within {self.ready_timeout_s:.0f} s (log: {child.log_path})")

    def _stop_child(self, child: Child, timeout_s: float) -> None:
        process = child.process
        stop_children([process], timeout_s)
        # anything the server itself forked shares its process group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        log.info("server_stopped", server=child.name, pid=process.pid, code=process.returncode)

    def _write_stack_file(self) -> None:
        info = {
            "owner_pid": os.getpid(),
            "kafka_bootstrap": self.kafka_bootstrap,
            "influx_url": self.influx_url if self.with_influx else None,
            "owner_create_time": create_time(os.getpid()),
            "pids": self.pids,
            "create_times": {name: create_time(pid) for name, pid in self.pids.items()},
            "started_at": time.time(),
        }
        path = self.settings.stack_file
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(path)


def migrate_records(settings: Settings) -> list[str]:
    """Bring the records database up to this build's schema, once, before any service opens it (services only
    check the revision); returns the revisions applied. Raises StackError with the reason."""
    from sqlalchemy.exc import SQLAlchemyError

    url = settings.records_db_url()
    try:
        applied = upgrade_records(url)
    except (SQLAlchemyError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]
        raise StackError(f"cannot migrate the records database {redact_url(url)} (LINEGUARD_STORE_DB_URL): "
                         f"{reason}") from exc
    if applied:
        log.info("records_schema_migrated", applied=applied, db=redact_url(url))
    return applied


def _refuse_busy_port(port: int, setting: str) -> None:
    if not port_in_use(port):
        return
    holder = port_holder(port)
    fix = ("`lineguard down` stops a lineguard stack" if holder and ("tansu" in holder or "influxd" in holder)
           else "stop that process")
    raise StackError(f"port {port} is in use{f' by {holder}' if holder else ''}; {fix}, or set {setting} "
                     "to a free port (0 picks one)")


def _read_stack_file(settings: Settings) -> dict | None:
    try:
        info = json.loads(settings.stack_file.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _owner_alive(info: dict) -> bool:
    return same_process(info.get("owner_pid"), info.get("owner_create_time"))


def _recorded_servers(info: dict) -> dict[str, int]:
    """The servers of a stack file that are still the processes it recorded (a reused pid is not ours)."""
    times = info.get("create_times") or {}
    return {name: pid for name, pid in (info.get("pids") or {}).items()
            if isinstance(pid, int) and same_process(pid, times.get(name))}


def clear_stale_stack(settings: Settings) -> None:
    """Before a start: refuse if a live stack owns the state dir; stop the leftovers of a dead one and remove
    its file."""
    info = _read_stack_file(settings)
    if info is None:
        return
    servers = _recorded_servers(info)
    if _owner_alive(info):
        raise StackError(f"an embedded stack is already running from {settings.stack_file} (owner pid "
                         f"{info.get('owner_pid')}, servers {servers}); stop it with `lineguard down`, or use "
                         "another LINEGUARD_STATE_DIR")
    for name, pid in servers.items():
        log.warning("stale_server_stopped", server=name, pid=pid)
        terminate(pid)
    settings.stack_file.unlink(missing_ok=True)
    log.info("stale_stack_cleared", file=str(settings.stack_file), owner_pid=info.get("owner_pid"),
             servers=servers)


def stop_recorded_stack(settings: Settings, timeout_s: float = 20.0) -> list[str]:
    """`lineguard down`: stop the stack that `stack.json` names, started from any shell. Its owner (`up` or
    `demo`) is asked first (SIGTERM: it stops its services and servers in order); servers still alive after
    it are stopped directly. Returns what was done, one line each."""
    info = _read_stack_file(settings)
    if info is None:
        return [f"no embedded stack recorded in {settings.stack_file}"]
    done = []
    owner = info.get("owner_pid")
    if _owner_alive(info):
        with contextlib.suppress(ProcessLookupError):
            os.kill(owner, signal.SIGTERM)
        if wait_gone(owner, timeout_s):
            done.append(f"stopped owner pid {owner}")
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(owner, signal.SIGKILL)
            done.append(f"killed owner pid {owner} (it did not stop within {timeout_s:.0f} s)")
    for name, pid in _recorded_servers(info).items():
        terminate(pid)
        done.append(f"stopped {name} pid {pid}")
    settings.stack_file.unlink(missing_ok=True)
    return done or [f"the stack in {settings.stack_file} had already stopped; removed the file"]


def running_stack(settings: Settings) -> dict | None:
    """The stack file's content when its owner process is alive, else None."""
    info = _read_stack_file(settings)
    return info if info is not None and _owner_alive(info) else None
