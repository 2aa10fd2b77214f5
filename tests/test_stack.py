"""`lineguard up` starts and stops every server it started; influxd answers real queries."""

from __future__ import annotations

import contextlib
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

from deploy.stack import pid_alive


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
    process = subprocess.Popen([sys.executable, "-m", "lineguard", "up"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stack_file = tmp_path / "stack.json"
        info = _wait_for(lambda: stack_file.exists() and json.loads(stack_file.read_text()), 60, "stack.json")
        pids = info["pids"]
        assert set(pids) == {"tansu", "influxd"}
        # topics exist: lineguard topics create against it reports them as existing
        created = subprocess.run([sys.executable, "-m", "lineguard", "topics", "create"], env=env,
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
    from deploy.stack import EmbeddedStack, StackError

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
    result = subprocess.run([sys.executable, "-m", "lineguard", "demo", "--seconds", "12", "--rate", "4"],
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
    from deploy.stack import EmbeddedStack
    from lineguard.settings import load_settings

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
