"""The InfluxDB writers: line protocol, the v2 writer's requests (against a local fake, no InfluxDB 2.x
here), retries on 5xx, the bounded buffer, and the v1 writer against the real influxd."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from storage_helpers import influx_query

from lineguard.settings import ConfigError
from lineguard.stack import INFLUXD_CONFIG
from storage.influx import InfluxWriter, Point, V1HttpTransport, V2ClientTransport


def test_line_protocol_escapes_and_types():
    point = Point("defect stats", {"line": "line 1,a", "camera": "cam=0", "empty": ""},
                  {"frames": 3, "rate": 0.5, "ok": True, "note": 'say "hi"'}, 1_700_000_000_000)
    assert point.line() == ('defect\\ stats,camera=cam\\=0,line=line\\ 1\\,a '
                            'frames=3i,rate=0.5,ok=true,note="say \\"hi\\"" 1700000000000')


class FakeInflux2(BaseHTTPRequestHandler):
    requests: list = []
    fail_first = 0

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            import gzip

            body = gzip.decompress(body)
        self.requests.append((self.path, self.headers.get("Authorization"), body.decode()))
        if FakeInflux2.fail_first > 0:
            FakeInflux2.fail_first -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(204)
        self.end_headers()


@pytest.fixture
def fake_influx2():
    FakeInflux2.requests, FakeInflux2.fail_first = [], 2
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeInflux2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_v2_writer_batches_retries_and_sends_token(fake_influx2):
    points = [Point("defect_stats", {"line": "l1"}, {"frames": i}, 1_700_000_000_000 + i) for i in range(5)]
    written = []

    async def go() -> InfluxWriter:
        writer = InfluxWriter(V2ClientTransport(fake_influx2, "tok3n", "acme", "lineguard"), batch_size=3,
                              flush_interval_s=0.05, retry_min_s=0.05, retry_max_s=0.1)
        await writer.start()
        await writer.put(points, on_written=lambda: written.append(True))
        assert await writer.flush(timeout_s=10)
        await writer.close()
        return writer

    writer = asyncio.run(go())
    assert written == [True]
    assert writer.stats.written == 5 and writer.stats.outages == 1 and writer.stats.failures == 2
    successful = FakeInflux2.requests[2:]
    assert [body.splitlines() for _, _, body in successful] == [[p.line() for p in points[:3]],
                                                                [p.line() for p in points[3:]]]
    path, auth, _ = successful[0]
    assert urlparse(path).path == "/api/v2/write"
    assert parse_qs(urlparse(path).query) == {"org": ["acme"], "bucket": ["lineguard"], "precision": ["ms"]}
    assert auth == "Token tok3n"


def test_buffer_is_bounded_and_put_waits_while_the_server_is_down():
    async def go() -> None:
        writer = InfluxWriter(V1HttpTransport("http://127.0.0.1:9", "db"), batch_size=10, buffer_points=20,
                              flush_interval_s=0.05, retry_min_s=0.05, retry_max_s=0.05)
        await writer.start()
        await writer.put([Point("m", {}, {"v": i}, i) for i in range(20)])
        blocked = asyncio.create_task(writer.put([Point("m", {}, {"v": 99}, 99)]))
        await asyncio.sleep(0.3)
        assert not blocked.done() and writer.buffered == 20 and writer.stats.failures >= 1
        blocked.cancel()
        writer._task.cancel()
        await writer.transport.close()

    asyncio.run(go())


def test_v1_writer_against_real_influxd(stack):
    database = "lineguard_writer_test"

    async def go() -> None:
        writer = InfluxWriter(V1HttpTransport(stack.influx_url, database), flush_interval_s=0.05)
        await writer.start()
        await writer.put([Point("m", {"k": "a"}, {"v": i}, 1_700_000_000_000 + i) for i in range(50)])
        await writer.close()

    asyncio.run(go())   # the database does not exist yet: the writer creates it (embedded profile)
    series = influx_query(stack.influx_url, database, 'SELECT count("v") FROM "m"')
    assert series[0]["values"][0][1] == 50


# -- start-up permission check, against a real influxd with auth enabled -------------------------------------------

# the embedded stack's influxd configuration, with authentication on
AUTH_INFLUXD_CONFIG = INFLUXD_CONFIG.replace("auth-enabled = false", "auth-enabled = true")
assert AUTH_INFLUXD_CONFIG != INFLUXD_CONFIG


@pytest.fixture(scope="module")
def auth_influxd(tmp_path_factory):
    """influxd 1.6 with `auth-enabled = true`: an admin, a write-only, a read-only and a read-write user of the
    database `lineguard` (made through the HTTP API, as an operator would). Yields (url, password)."""
    import shutil
    import subprocess
    import time

    import httpx

    from lineguard.stack import free_port

    influxd = shutil.which("influxd") or "/usr/bin/influxd"
    root = tmp_path_factory.mktemp("influxd-auth")
    port = free_port()
    (root / "influxdb.conf").write_text(AUTH_INFLUXD_CONFIG.format(root=root, http_port=port, rpc_port=free_port()))
    with open(root / "influxd.log", "wb") as log_file:
        process = subprocess.Popen([influxd, "-config", str(root / "influxdb.conf")], stdout=log_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, (root / "influxd.log").read_text()[-800:]
        try:
            if httpx.get(f"{url}/ping", timeout=1).status_code == 204:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "influxd did not answer /ping within 60 s"
        time.sleep(0.1)
    password = "pw-1"

    def query(statement: str, auth=("admin", password)) -> None:
        response = httpx.post(f"{url}/query", data={"q": statement}, auth=auth, timeout=10)
        assert response.status_code == 200 and "error" not in response.text, response.text

    query(f"CREATE USER admin WITH PASSWORD '{password}' WITH ALL PRIVILEGES", auth=None)  # the first user: admin
    query('CREATE DATABASE "lineguard"')
    for user, grant in {"writer": "WRITE", "reader": "READ", "aggregator": "ALL"}.items():
        query(f"CREATE USER {user} WITH PASSWORD '{password}'")
        query(f'GRANT {grant} ON "lineguard" TO {user}')
    try:
        yield url, password
    finally:
        process.terminate()
        process.wait(timeout=30)


def _check(url: str, user: str, password: str) -> None:
    from storage.influx import check_permissions

    async def go() -> None:
        transport = V1HttpTransport(url, "lineguard", username=user, password=password, create_database=False)
        try:
            await check_permissions(transport, 'SELECT last("v") FROM "stats_progress"',
                                    Point("stats_startup", {}, {"started": True}, 1_700_000_000_000),
                                    target="'lineguard'", credentials="LINEGUARD_INFLUX_USERNAME/PASSWORD")
        finally:
            await transport.close()

    asyncio.run(go())


def test_permission_check_names_the_missing_permission(auth_influxd):
    from storage.influx import InfluxPermissionError, InfluxUnavailable

    url, password = auth_influxd
    _check(url, "aggregator", password)                       # read and write: passes
    _check(url, "admin", password)
    with pytest.raises(InfluxPermissionError, match=r"lacks READ permission on 'lineguard' \(HTTP 403") as read:
        _check(url, "writer", password)                      # the k8s example's old write-only token
    with pytest.raises(InfluxPermissionError, match=r"lacks WRITE permission on 'lineguard' \(HTTP 403") as write:
        _check(url, "reader", password)
    with pytest.raises(InfluxPermissionError, match=r"rejects the credentials in .* \(HTTP 401") as wrong:
        _check(url, "aggregator", "not-the-password")
    for error in (read, write, wrong):
        assert "\n" not in str(error.value), "one line"
    assert isinstance(read.value, ConfigError)
    from lineguard.stack import free_port

    with pytest.raises(InfluxUnavailable) as unreachable:    # no server: not a permission problem, waited for
        _check(f"http://127.0.0.1:{free_port()}", "aggregator", password)
    assert not isinstance(unreachable.value, InfluxPermissionError)


def test_stats_with_a_write_only_user_stops_in_one_line(auth_influxd, stack, tmp_path):
    """`lineguard stats` with credentials that may write but not read: exit code 2 (configuration) and one line
    naming the missing permission, instead of waiting for an 'unavailable' InfluxDB forever."""
    import os
    import subprocess
    import sys

    url, password = auth_influxd
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEGUARD_")} | {
        "LINEGUARD_STATE_DIR": str(tmp_path), "LINEGUARD_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "LINEGUARD_TOPIC_PREFIX": "stats-perm.", "LINEGUARD_INFLUX_URL": url,
        "LINEGUARD_INFLUX_USERNAME": "writer", "LINEGUARD_INFLUX_PASSWORD": password, "LINEGUARD_LOG_JSON": "1"}
    result = subprocess.run([sys.executable, "-m", "deploy", "stats", "--http-port", "-1", "--seconds", "30"],
                            env=env, capture_output=True, text=True, timeout=180)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "LINEGUARD_INFLUX_USERNAME/LINEGUARD_INFLUX_PASSWORD lacks READ permission" \
        in errors[0], result.stderr[-3000:]
