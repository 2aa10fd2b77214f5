"""The InfluxDB writers: line protocol, the v2 writer's requests (against a local fake, no InfluxDB 2.x
here), retries on 5xx, the bounded buffer, and the v1 writer against the real influxd."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from storage_helpers import influx_query

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
