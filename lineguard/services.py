"""Run lineguard services (`lineguard infer`, `lineguard stats`, ...) as child processes and stop them cleanly.

    >>> with Services(state_dir, env) as services:
    ...     services.start("infer", ["infer", "--http-port", "9102"])

Each child gets its own process group and log file `<state_dir>/<name>.log`; `stop()` sends
SIGTERM (the services finish their in-flight work and commit), then SIGKILL after a timeout. A child
whose parent dies without stopping it (SIGKILL, a crash) is killed by the kernel (`die_with_parent`):
its uncommitted frames are delivered again to the next worker, and nothing holds on to a port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from lineguard.db import private_dir
from lineguard.logging import get_logger
from lineguard.processes import die_with_parent, stop_children

log = get_logger(__name__)


class Services:
    def __init__(self, state_dir: Path, env: dict[str, str] | None = None):
        self.state_dir = Path(state_dir)
        self.env = dict(os.environ) | (env or {})
        self.children: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        private_dir(self.state_dir)
        log_path = self.state_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen([sys.executable, "-m", "deploy", *args], stdout=log_file,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                       start_new_session=True, preexec_fn=die_with_parent(signal.SIGKILL))
        self.children[name] = process
        log.info("service_started", service=name, pid=process.pid, log=str(log_path))
        return process

    def dead(self) -> list[str]:
        return [name for name, process in self.children.items() if process.poll() is not None]

    def stop(self, timeout_s: float = 30.0) -> None:
        stop_children(self.children.values(), timeout_s)
        for name, process in self.children.items():
            log.info("service_stopped", service=name, pid=process.pid, code=process.returncode)
        self.children.clear()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

def wait_healthy(url: str, services: Services, timeout_s: float) -> dict:
    """The JSON of `url` (a service's /healthz) once it answers; a child that exits meanwhile, or the deadline,
    raises."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if services.dead():
            raise RuntimeError(f"service(s) exited during start-up: {services.dead()} "
                               f"(see {services.state_dir}/<name>.log)")
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError), \
                urllib.request.urlopen(url, timeout=1) as response:
            return json.loads(response.read())
        time.sleep(0.3)
    raise RuntimeError(f"worker not healthy at {url} within {timeout_s:.0f} s")

