"""`lineguard up` starts and stops every server it started; influxd answers real queries."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from storage_helpers import influx_query

from lineguard.stack import pid_alive


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _children_of(pid: int) -> set[int]:
    """Every live process whose parent chain leads to pid (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    stat = handle.read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_up_starts_and_stops_every_process(tmp_path, stop_signal):
    env = dict(os.environ) | {"LINEGUARD_STATE_DIR": str(tmp_path), "LINEGUARD_EMBEDDED_KAFKA_PORT": "0",
                              "LINEGUARD_EMBEDDED_INFLUX_PORT": "0"}
    env.pop("LINEGUARD_KAFKA_BOOTSTRAP", None)
    process = subprocess.Popen([sys.executable, "-m", "deploy", "up"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stack_file = tmp_path / "stack.json"
        info = _wait_for(lambda: stack_file.exists() and json.loads(stack_file.read_text()), 60, "stack.json")
        pids = info["pids"]
        assert set(pids) == {"tansu", "influxd"}
        # topics exist: lineguard topics create against it reports them as existing
        created = subprocess.run([sys.executable, "-m", "deploy", "topics", "create"], env=env,
                                 capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stderr
        assert "lineguard.frames: exists" in created.stdout
        with urllib.request.urlopen(f"{info['influx_url']}/ping", timeout=5) as response:
            assert response.status == 204
        descendants = _children_of(process.pid)
        assert set(pids.values()) <= descendants
        process.send_signal(stop_signal)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, process.stderr.read()
    leftover = [pid for pid in descendants if pid_alive(pid)]
    assert leftover == [], f"processes left behind: {leftover}"
    assert not (tmp_path / "stack.json").exists()


def test_influxd_of_the_stack_accepts_writes_and_queries(stack):
    database = stack.settings.influx_database
    body = b"probe,line=line-1 frames=3i,defects=1i 1700000000000000000\n"
    request = urllib.request.Request(f"{stack.influx_url}/write?db={database}", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 204
    query = urllib.parse.urlencode({"db": database, "q": "SELECT sum(frames), sum(defects) FROM probe"})
    with urllib.request.urlopen(f"{stack.influx_url}/query?{query}", timeout=10) as response:
        result = json.loads(response.read())
    assert result["results"][0]["series"][0]["values"][0][1:] == [3, 1]


def test_second_stack_on_same_state_dir_is_refused(stack):
    from lineguard.stack import EmbeddedStack, StackError

    with pytest.raises(StackError, match="already running"):
        EmbeddedStack(stack.settings).start()


def _last_event(log_path, event: str) -> dict:
    """The last JSON log line of a service with this event."""
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    return [entry for entry in entries if entry.get("event") == event][-1]


def test_demo_runs_the_line_through_inference_and_stops_cleanly(tmp_path):
    env = dict(os.environ) | {"LINEGUARD_STATE_DIR": str(tmp_path), "LINEGUARD_EMBEDDED_KAFKA_PORT": "0",
                              "LINEGUARD_EMBEDDED_INFLUX_PORT": "0", "COLUMNS": "160"}
    env.pop("LINEGUARD_KAFKA_BOOTSTRAP", None)
    result = subprocess.run([sys.executable, "-m", "deploy", "demo", "--seconds", "12", "--rate", "4"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "worker ready" in result.stderr
    lines = result.stdout.splitlines()
    header = max(i for i, line in enumerate(lines) if line.split()[:2] == ["frames", "frames/s"])
    verdicts = int(lines[header + 1].split()[0])
    assert verdicts >= 10, result.stdout
    assert not (tmp_path / "stack.json").exists()
    log = (tmp_path / "infer.log").read_text()
    assert '"event": "worker_stopped"' in log  # the worker got SIGTERM and drained, not SIGKILL
    # the operator console was served, with a demo operator token whose hash is in the token file
    console = re.search(r"operator console (http://127\.0\.0\.1:\d+/)\s+\(demo operator token: (\S+)\)", result.stderr)
    assert console, result.stderr
    tokens = json.loads((tmp_path / "dialogue-tokens.json").read_text())["tokens"]
    assert [t["role"] for t in tokens if t["sha256"] == hashlib.sha256(console.group(2).encode()).hexdigest()] == \
        ["operator"]
    dialogue_log = (tmp_path / "dialogue.log").read_text()
    assert '"event": "dialogue_started"' in dialogue_log and '"event": "dialogue_stopped"' in dialogue_log
    assert console.group(2) not in dialogue_log

    # the demo says where the data lives; the data is there, as many as each service says it counted
    assert "where the data lives:" in result.stderr
    where = result.stderr.rsplit("where the data lives:", 1)[1]
    influx_url, database = re.search(r"statistics\s+(http://\S+) \(database (\S+),", where).groups()
    records_db = Path(re.search(r"records\s+sqlite:///(\S+)", where).group(1))
    artifacts = Path(re.search(r"artifacts\s+(\S+)", where).group(1))
    assert records_db == tmp_path / "records.sqlite" and artifacts == tmp_path / "artifacts"
    stored = _last_event(tmp_path / "store.log", "store_stopped")
    counted = _last_event(tmp_path / "stats.log", "stats_stopped")
    assert stored["failed"] is False and stored["bad"] == 0 and counted["bad_verdicts"] == 0
    assert stored["verdicts"] >= 10 and counted["counted"] >= 10

    with contextlib.closing(sqlite3.connect(records_db)) as conn:
        frames = conn.execute("SELECT sum(frames) FROM frame_counts").fetchone()[0]
        rows = conn.execute("SELECT frame_id, kind, image_uri, heatmap_uri FROM records").fetchall()
    assert frames == stored["verdicts"] - stored["duplicates"]        # every verdict counted, once
    assert len(rows) == stored["records"] and sum(kind == "flagged" for _, kind, _, _ in rows) == stored["flagged"]
    for frame_id, _, image_uri, heatmap_uri in rows:
        for uri in (image_uri, heatmap_uri):
            path = Path(urllib.parse.urlparse(uri).path)
            assert path.is_relative_to(artifacts) and path.stat().st_size > 0, (frame_id, uri)

    # influxd's data stays in the state dir: started again on the printed port, it answers with every window
    from lineguard.settings import load_settings
    from lineguard.stack import EmbeddedStack

    port = urllib.parse.urlparse(influx_url).port
    influx = EmbeddedStack(load_settings(state_dir=tmp_path, embedded_influx_port=port, embedded_kafka_port=0,
                                         influx_database=database))
    influx.start_influx()
    try:
        for window in ("10s", "1m"):
            series = influx_query(influx_url, database, f"SELECT sum(\"frames\") FROM \"defect_stats\" "
                                                        f"WHERE \"window\" = '{window}' AND time > now() - 1h")
            assert series and series[0]["values"][0][1] == counted["counted"], (window, series)
    finally:
        influx.stop()


# --- lifecycle: nothing outlives its parent, `down`, stale stack files -----------------------------------


def _stack_env(tmp_path) -> dict:
    env = dict(os.environ) | {"LINEGUARD_STATE_DIR": str(tmp_path), "LINEGUARD_EMBEDDED_KAFKA_PORT": "0",
                              "LINEGUARD_EMBEDDED_INFLUX_PORT": "0", "LINEGUARD_LOG_JSON": "1"}
    env.pop("LINEGUARD_KAFKA_BOOTSTRAP", None)
    env.pop("LINEGUARD_INFLUX_URL", None)
    return env


def _stack_info(tmp_path) -> dict:
    try:
        return json.loads((tmp_path / "stack.json").read_text())
    except (OSError, ValueError):
        return {}


def _ports(info: dict) -> list[int]:
    return [int(info["kafka_bootstrap"].rsplit(":", 1)[1]), urllib.parse.urlparse(info["influx_url"]).port]


def _all_gone(pids, ports) -> bool:
    from lineguard.stack import port_in_use

    return not any(pid_alive(pid) for pid in pids) and not any(port_in_use(port) for port in ports)


def _start_up(tmp_path) -> tuple[subprocess.Popen, dict]:
    process = subprocess.Popen([sys.executable, "-m", "deploy", "up"], env=_stack_env(tmp_path),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack_file = tmp_path / "stack.json"
    info = _wait_for(lambda: stack_file.exists() and json.loads(stack_file.read_text()), 60, "stack.json")
    return process, info


def test_sigkill_of_up_leaves_no_server_and_frees_the_ports(tmp_path):
    process, info = _start_up(tmp_path)
    try:
        children = _children_of(process.pid)
        assert set(info["pids"].values()) <= children
        process.kill()  # no handler runs: the kernel's parent-death signal must stop the servers
        process.wait(10)
        _wait_for(lambda: _all_gone(children, _ports(info)), 10, "servers gone and ports free after SIGKILL")
        # the stack file is stale now (its owner is dead): the next `up` clears it and starts on the same ports
        env = _stack_env(tmp_path) | {"LINEGUARD_EMBEDDED_KAFKA_PORT": str(_ports(info)[0]),
                                      "LINEGUARD_EMBEDDED_INFLUX_PORT": str(_ports(info)[1])}
        again = subprocess.Popen([sys.executable, "-m", "deploy", "up"], env=env, stderr=subprocess.PIPE,
                                 text=True)
        try:
            fresh = _wait_for(lambda: (data := _stack_info(tmp_path)).get("owner_pid") == again.pid and data, 60,
                              "a new stack.json")
            assert _ports(fresh) == _ports(info)
        finally:
            again.terminate()
            again.wait(30)
        assert again.returncode == 0, again.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_down_stops_a_stack_started_in_another_shell(tmp_path):
    process, info = _start_up(tmp_path)
    try:
        children = _children_of(process.pid)
        result = subprocess.run([sys.executable, "-m", "deploy", "down"], env=_stack_env(tmp_path),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert f"stopped owner pid {process.pid}" in result.stderr
        assert process.wait(10) == 0  # `up` stopped cleanly on the SIGTERM `down` sent
        _wait_for(lambda: _all_gone(children, _ports(info)), 10, "servers gone after down")
        assert not (tmp_path / "stack.json").exists()
        again = subprocess.run([sys.executable, "-m", "deploy", "down"], env=_stack_env(tmp_path),
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "no embedded stack recorded" in again.stderr
    finally:
        if process.poll() is None:
            process.kill()


def test_stale_stack_file_with_orphaned_servers_is_cleaned_up(tmp_path):
    """A stack file whose owner is gone but whose servers still run (e.g. left by an older build) is cleared:
    its servers are stopped, and the new stack starts."""
    from lineguard import tansu
    from lineguard.processes import create_time
    from lineguard.stack import free_port

    port = free_port()
    orphan = subprocess.Popen(tansu.broker_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    dead_owner = subprocess.Popen(["true"])
    dead_owner.wait()
    try:
        from lineguard.stack import port_in_use

        _wait_for(lambda: port_in_use(port), 20, "orphan broker listening")
        (tmp_path / "stack.json").write_text(json.dumps({
            "owner_pid": dead_owner.pid, "kafka_bootstrap": f"127.0.0.1:{port}", "influx_url": None,
            "pids": {"tansu": orphan.pid}, "create_times": {"tansu": create_time(orphan.pid)}}))
        env = _stack_env(tmp_path) | {"LINEGUARD_EMBEDDED_KAFKA_PORT": str(port)}
        process = subprocess.Popen([sys.executable, "-m", "deploy", "up", "--no-influx"], env=env,
                                   stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(lambda: orphan.poll() is not None, 30, "the orphaned broker stopped")
            _wait_for(lambda: _stack_info(tmp_path).get("owner_pid") == process.pid, 60, "the new stack running")
        finally:
            process.terminate()
            process.wait(30)
        assert process.returncode == 0, process.stderr.read()
    finally:
        if orphan.poll() is None:
            orphan.kill()


def test_a_port_held_by_another_program_is_named(tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = _stack_env(tmp_path) | {"LINEGUARD_EMBEDDED_KAFKA_PORT": str(port)}
        result = subprocess.run([sys.executable, "-m", "deploy", "up", "--no-influx"], env=env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: port")
    assert f"in use by pid {os.getpid()}" in lines[0] and "LINEGUARD_EMBEDDED_KAFKA_PORT" in lines[0]


def test_sighup_of_demo_stops_every_service_and_server(tmp_path):
    """A closed terminal sends SIGHUP: the demo stops its services and servers; nothing is orphaned."""
    process = subprocess.Popen([sys.executable, "-m", "deploy", "demo", "--rate", "4"], env=_stack_env(tmp_path),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: b"worker_started" in ((tmp_path / "infer.log").read_bytes()
                                                if (tmp_path / "infer.log").exists() else b""), 240, "worker started")
        info = json.loads((tmp_path / "stack.json").read_text())
        children = _children_of(process.pid)
        names = {Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in children
                 if pid_alive(pid)}
        assert sum(" infer" in n or " stats" in n or " store" in n for n in names) == 3, names
        process.send_signal(signal.SIGHUP)
        _wait_for(lambda: _all_gone(children | {process.pid}, _ports(info)), 10,
                  "demo, its services and servers gone after SIGHUP")
    finally:
        if process.poll() is None:
            process.kill()
    assert not (tmp_path / "stack.json").exists()
