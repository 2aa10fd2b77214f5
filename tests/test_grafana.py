"""Grafana dashboards: generated files up to date, typed against @grafana/schema (tsc), every panel's
InfluxQL query runs against the real influxd after the aggregator wrote data, and `lineguard grafana
push` makes exactly the expected Grafana HTTP API requests (against a small local fake: no Grafana
can run here)."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from storage_helpers import influx_query, make_verdicts, minute_ago, publish
from typer.testing import CliRunner

from deploy.grafana import dashboards
from lineguard.events import DeadLetter
from storage.settings import load_storage_settings
from storage.stats import StatsService


def test_generated_dashboards_are_committed_and_up_to_date():
    for uid in dashboards.DASHBOARDS:
        path = dashboards.DASHBOARD_DIR / f"{uid}.json"
        assert path.read_text() == dashboards.dumps(uid), f"{path} is stale: python -m deploy.grafana.dashboards"
    overview = dashboards.dashboard("lineguard-overview")
    titles = {p["title"] for p in overview["panels"]}
    assert {"Defect rate per line", "Throughput per line (frames/s)", "Model latency", "Consumer lag",
            "Dead letters"} <= titles
    defects = dashboards.dashboard("lineguard-defects")
    grid = [p for p in defects["panels"] if p["title"] in dashboards.POSITIONS]
    assert [(p["gridPos"]["x"] // 4, (p["gridPos"]["y"] - 9) // 4) for p in grid] == \
        [(col, row) for row in range(3) for col in range(3)]          # a 3x3 grid, row-major like POSITIONS


def test_dashboards_satisfy_grafana_schema_types():
    """tsc --strict over the dashboards against @grafana/schema; node_modules comes from the lock file."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    assert not missing, (f"{' and '.join(missing)} not on PATH: `make test` installs the Debian packages "
                         "nodejs and npm (its `apt` target) before the tests")
    result = dashboards.schema_check()
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_dashboard_that_breaks_grafana_types(tmp_path):
    """The check can fail: a legend display mode Grafana does not know is a tsc error naming it."""
    board = json.loads((dashboards.DASHBOARD_DIR / "lineguard-overview.json").read_text())
    panel = next(p for p in board["panels"] if p["type"] == "timeseries")
    panel["options"]["legend"]["displayMode"] = "sideways"
    (tmp_path / "broken.json").write_text(json.dumps(board))
    result = dashboards.schema_check(tmp_path)
    assert result.returncode != 0
    assert "sideways" in result.stdout + result.stderr


def _substitute(query: str, line: str, window: str) -> str:
    return (query.replace("$timeFilter", "time > now() - 2h").replace("$__interval", "10s")
            .replace("/^$line$/", f"/^{line}$/").replace("/^$product$/", "/^.*$/").replace("$window", window))


def test_every_panel_query_runs_and_returns_its_series(settings):
    line_a, line_b = f"{settings.topic_prefix}a", f"{settings.topic_prefix}b"
    verdicts = make_verdicts(160, start=minute_ago(12), spacing_s=0.5, lines=(line_a, line_b), defect_rate=0.4)
    group = f"stats-{settings.topic_prefix}"
    storage_settings = load_storage_settings(stats_group=group, stats_lateness_s=2.0, stats_idle_close_s=0.5,
                                             influx_flush_interval_s=0.2, stats_lag_interval_s=1.0,
                                             stats_lag_groups=group)
    url, db = settings.influx, settings.influx_database
    letter = DeadLetter(source_topic=settings.topic("frames"), partition=0, offset=7, key="cam-0",
                        reason="invalid FrameMeta", error_type="BadFrame", service=f"infer-{settings.topic_prefix}")

    def ready() -> bool:
        frames = influx_query(url, db, f"SELECT sum(\"frames\") FROM \"defect_stats\" WHERE \"window\" = '10s' "
                                       f"AND \"line\" =~ /^{settings.topic_prefix}/ AND time > now() - 2h")
        lag = influx_query(url, db, f"SELECT last(\"lag\") FROM \"kafka_lag\" WHERE \"group\" = '{group}' "
                                    f"AND time > now() - 2h")
        dead = influx_query(url, db, f"SELECT sum(\"count\") FROM \"dead_letters\" WHERE \"service\" = "
                                     f"'{letter.service}' AND time > now() - 2h")
        return bool(frames and frames[0]["values"][0][1] == len(verdicts) and lag and dead)

    async def scenario() -> None:
        service = StatsService(settings, storage_settings)
        await service.start()
        try:
            await publish(settings, "verdicts", [(v.camera_id.encode(), v.to_bytes(), None) for v in verdicts])
            await publish(settings, "deadletter", [(b"cam-0", letter.to_bytes(), None)])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while loop.time() < deadline and not await asyncio.to_thread(ready):
                await asyncio.sleep(0.5)
        finally:
            await service.stop()

    asyncio.run(scenario())
    assert ready(), "the aggregator did not write frames, lag and dead letters in time"

    positions = Counter(r.position for v in verdicts if v.line_id == line_a and v.is_anomalous for r in v.regions)
    checked = 0
    for uid in dashboards.DASHBOARDS:
        for spec in dashboards.panel_specs(uid):
            for window in ("10s", "1m"):
                series = influx_query(url, db, _substitute(spec.query, line_a, window))
                if "dead_letters" in spec.query:
                    series = [s for s in series if s["tags"]["service"] == letter.service]
                if "kafka_lag" in spec.query:
                    series = [s for s in series if s["tags"]["group"] == group]
                assert series, f"{uid} / {spec.title}: no series"
                for one in series:
                    assert set(one.get("tags", {})) == set(spec.expect.tags), (spec.title, one.get("tags"))
                    assert set(spec.expect.columns) <= set(one["columns"]), (spec.title, one["columns"])
                    assert any(value is not None for row in one["values"] for value in row[1:]), spec.title
                if spec.title in dashboards.POSITIONS:
                    assert series[0]["values"][0][1] == positions[spec.title], spec.title
                if spec.expect.tags == ("line",):
                    assert {s["tags"]["line"] for s in series} == {line_a}
                checked += 1
    assert checked == 2 * (len(dashboards.overview_panels()) + len(dashboards.defects_panels()))


# -- push, against a fake Grafana ---------------------------------------------------------------
class FakeGrafana(BaseHTTPRequestHandler):
    """Answers like Grafana's HTTP API; records (method, path, auth, body)."""

    requests: list = []
    datasources: dict = {}
    folders: set = set()

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.requests.append((self.command, self.path, self.headers.get("Authorization"), body))
        path, method = self.path, self.command
        if method == "GET" and path.startswith("/api/datasources/name/"):
            name = path.rsplit("/", 1)[1]
            if name in self.datasources:
                return self._reply(200, self.datasources[name])
            return self._reply(404, {"message": "Data source not found"})
        if method == "POST" and path == "/api/datasources":
            self.datasources[body["name"]] = {"id": 7, **body}
            return self._reply(200, {"id": 7, "message": "Datasource added"})
        if method == "PUT" and path == "/api/datasources/7":
            return self._reply(200, {"id": 7, "message": "Datasource updated"})
        if method == "GET" and path.startswith("/api/folders/"):
            uid = path.rsplit("/", 1)[1]
            return self._reply(200, {"uid": uid}) if uid in self.folders else self._reply(404, {"message": "nf"})
        if method == "POST" and path == "/api/folders":
            self.folders.add(body["uid"])
            return self._reply(200, {"uid": body["uid"], "title": body["title"]})
        if method == "POST" and path == "/api/dashboards/db":
            uid = body["dashboard"]["uid"]
            return self._reply(200, {"status": "success", "uid": uid, "url": f"/d/{uid}"})
        return self._reply(404, {"message": f"unexpected {method} {path}"})

    do_GET = do_POST = do_PUT = _handle


@pytest.fixture
def cli_runner():
    """A CliRunner; afterwards logging goes back to the real stderr (the CLI configured it onto the runner's)."""
    from lineguard.logging import configure

    yield CliRunner()
    configure()


@pytest.fixture
def fake_grafana():
    FakeGrafana.requests, FakeGrafana.datasources, FakeGrafana.folders = [], {}, set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGrafana)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_grafana_push_makes_exactly_the_expected_requests(fake_grafana, monkeypatch, cli_runner):
    from deploy.app import app

    monkeypatch.setenv("LINEGUARD_INFLUX_URL", "http://influx.example:8086")
    runner = cli_runner
    first = runner.invoke(app, ["grafana", "push", "--url", fake_grafana, "--token", "glsa_secret"])
    assert first.exit_code == 0, first.output
    assert "datasource lineguard-influxdb: created; folder lineguard: created" in first.output
    datasource = dashboards.DATASOURCE_UID
    overview, defects = (json.loads((dashboards.DASHBOARD_DIR / f"{uid}.json").read_text())
                         for uid in ("lineguard-overview", "lineguard-defects"))
    payload = {"name": datasource, "uid": datasource, "type": "influxdb", "access": "proxy",
               "url": "http://influx.example:8086", "database": "lineguard", "isDefault": False,
               "jsonData": {"dbName": "lineguard", "httpMode": "GET", "version": "InfluxQL"}}

    def board(dashboard: dict) -> dict:
        return {"dashboard": dashboard, "folderUid": "lineguard", "overwrite": True,
                "message": "lineguard grafana push"}

    auth = "Bearer glsa_secret"
    assert FakeGrafana.requests == [
        ("GET", f"/api/datasources/name/{datasource}", auth, None),
        ("POST", "/api/datasources", auth, payload),
        ("GET", "/api/folders/lineguard", auth, None),
        ("POST", "/api/folders", auth, {"title": "lineguard", "uid": "lineguard"}),
        ("POST", "/api/dashboards/db", auth, board(defects)),
        ("POST", "/api/dashboards/db", auth, board(overview)),
    ]

    # pushing again updates the datasource in place and overwrites the dashboards
    FakeGrafana.requests.clear()
    second = runner.invoke(app, ["grafana", "push", "--url", fake_grafana, "--token", "glsa_secret"])
    assert second.exit_code == 0, second.output
    assert [(method, path) for method, path, _, _ in FakeGrafana.requests] == [
        ("GET", f"/api/datasources/name/{datasource}"), ("PUT", "/api/datasources/7"),
        ("GET", "/api/folders/lineguard"), ("POST", "/api/dashboards/db"), ("POST", "/api/dashboards/db")]


def test_grafana_push_to_nowhere_is_one_clear_error(cli_runner):
    from deploy.app import app

    result = cli_runner.invoke(app, ["grafana", "push", "--url", "http://127.0.0.1:9", "--token", "t"])
    assert result.exit_code == 1
    assert "error: cannot reach Grafana at http://127.0.0.1:9" in result.output
