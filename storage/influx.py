"""InfluxDB writers: line protocol, two transports behind one interface, and a batching buffer.

- `V1HttpTransport`: `POST /write` of the v1 HTTP API. It serves InfluxDB 1.x (tested against the
  Debian influxd 1.6.7) and the v1-compatible endpoints of 2.x and 3.x.
- `V2ClientTransport`: `influxdb-client`'s async write API, for InfluxDB 2.x, 3.x and Cloud.

`InfluxWriter` sits in front of either: points wait in a bounded buffer, go out in batches of
`batch_size` (or every `flush_interval_s`), and a failed batch is retried with exponential back-off
until the server answers. While the server is down, `put()` keeps accepting points until the buffer
is full and then waits (back-pressure), so the caller keeps its state and nothing is dropped. The
writer logs `influx_unavailable` when writes start failing and `influx_recovered` (with the downtime
and the backlog) when they succeed again. Each `put()` may carry a callback, called once every point
of that put is written: the stats aggregator acknowledges Kafka offsets there.

    >>> writer = InfluxWriter(V1HttpTransport("http://127.0.0.1:8086", "lineguard"))
    >>> await writer.start()
    >>> await writer.put([Point("defect_stats", {"line": "line-1"}, {"frames": 10}, 1_700_000_000_000)])
    >>> await writer.close()   # flushes what is buffered first
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from lineguard.logging import get_logger
from lineguard.settings import ConfigError

log = get_logger(__name__)

FieldValue = float | int | bool | str


class InfluxUnavailable(Exception):
    """A write or query failed in a way worth retrying: connection refused, timeout, 5xx."""


class InfluxRejected(Exception):
    """The server refused the data itself (HTTP 4xx other than auth/429): retrying cannot help."""


class InfluxForbidden(InfluxUnavailable):
    """HTTP 401/403: wrong credentials, or a permission they lack. The writer retries it like an outage (a token
    can be fixed while points wait); at start-up `check_permissions` makes it fatal, naming what is missing."""

    def __init__(self, reason: str, status: int):
        super().__init__(reason)
        self.status = status


class InfluxPermissionError(ConfigError):
    """InfluxDB answers, but the credentials may not read or write what the service needs (one line, fatal)."""


# -- line protocol -----------------------------------------------------------------------------
def _escape_key(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", r"\,").replace("=", r"\=").replace(" ", r"\ ")


def _escape_measurement(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", r"\,").replace(" ", r"\ ")


def _field(value: FieldValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Point:
    """One InfluxDB point; `time_ms` is epoch milliseconds (the writers use precision=ms).

    Writing a point again with the same measurement, tags and time replaces its fields: the
    aggregator relies on that to update a window that received late verdicts.
    """

    measurement: str
    tags: dict[str, str]
    fields: dict[str, FieldValue]
    time_ms: int

    def line(self) -> str:
        tags = "".join(f",{_escape_key(k)}={_escape_key(str(v))}" for k, v in sorted(self.tags.items()) if v != "")
        fields = ",".join(f"{_escape_key(k)}={_field(v)}" for k, v in self.fields.items())
        if not fields:
            raise ValueError(f"point {self.measurement} has no fields")
        return f"{_escape_measurement(self.measurement)}{tags} {fields} {self.time_ms}"


# -- transports --------------------------------------------------------------------------------
class InfluxTransport(Protocol):
    """What `InfluxWriter` needs from a server connection."""

    url: str

    async def write(self, lines: list[str]) -> None: ...

    async def query(self, influxql: str) -> list[dict]: ...

    async def close(self) -> None: ...


def _series(payload: dict) -> list[dict]:
    """The series of a v1 /query answer; raises InfluxRejected on a statement error."""
    out: list[dict] = []
    for result in payload.get("results", []):
        if "error" in result:
            raise InfluxRejected(result["error"])
        out.extend(result.get("series", []))
    return out


class V1HttpTransport:
    """The v1 HTTP API: `POST /write?db=...&precision=ms` and `GET /query` (InfluxQL)."""

    name = "v1"

    def __init__(self, url: str, database: str, *, username: str | None = None, password: str | None = None,
                 token: str | None = None, retention_policy: str | None = None, timeout_s: float = 10.0,
                 create_database: bool = True):
        self.url = url.rstrip("/")
        self.database = database
        self.retention_policy = retention_policy
        self.create_database = create_database
        headers = {"Authorization": f"Token {token}"} if token else {}
        auth = (username, password or "") if username else None
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout_s, headers=headers, auth=auth)

    async def write(self, lines: list[str]) -> None:
        params = {"db": self.database, "precision": "ms"}
        if self.retention_policy:
            params["rp"] = self.retention_policy
        response = await self._request("POST", "/write", params=params, content="\n".join(lines).encode())
        if response.status_code == 404 and "database not found" in response.text and self.create_database:
            await self.query(f'CREATE DATABASE "{self.database}"', method="POST")
            response = await self._request("POST", "/write", params=params, content="\n".join(lines).encode())
        _raise_for_status(response)

    async def query(self, influxql: str, method: str = "GET") -> list[dict]:
        params = {"db": self.database, "q": influxql, "epoch": "ms"}
        response = await self._request(method, "/query", params=params)
        _raise_for_status(response)
        return _series(response.json())

    async def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return await self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise InfluxUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self._client.aclose()


class V2ClientTransport:
    """InfluxDB 2.x / 3.x / Cloud through `influxdb-client` (org + bucket + token).

    Queries (used only to read the aggregator's progress) go to the v1-compatible `/query`
    endpoint with the same token, which 2.x and 3.x serve for a bucket mapped to a database.
    """

    name = "v2"

    def __init__(self, url: str, token: str, org: str, bucket: str, *, timeout_s: float = 10.0):
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

        self.url = url.rstrip("/")
        self.org = org
        self.bucket = bucket
        self._client = InfluxDBClientAsync(url=self.url, token=token, org=org, timeout=int(timeout_s * 1000))
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s,
                                       headers={"Authorization": f"Token {token}"})

    async def write(self, lines: list[str]) -> None:
        import aiohttp
        from influxdb_client import WritePrecision
        from influxdb_client.rest import ApiException

        try:
            await self._client.write_api().write(bucket=self.bucket, org=self.org, record=lines,
                                                 write_precision=WritePrecision.MS)
        except ApiException as exc:
            status = exc.status or 0
            reason = f"{self.url}: HTTP {status}: {(exc.body or exc.reason or '')!s:.300}"
            if status in (401, 403):
                raise InfluxForbidden(reason, status) from exc
            if status >= 500 or status in (401, 403, 404, 429) or status == 0:
                raise InfluxUnavailable(reason) from exc
            raise InfluxRejected(reason) from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise InfluxUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    async def query(self, influxql: str) -> list[dict]:
        try:
            response = await self._http.get("/query", params={"db": self.bucket, "q": influxql, "epoch": "ms"})
        except httpx.TransportError as exc:
            raise InfluxUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        _raise_for_status(response)
        return _series(response.json())

    async def close(self) -> None:
        await self._client.close()
        await self._http.aclose()


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 300:
        return
    reason = f"{response.request.url.copy_with(query=None)}: HTTP {response.status_code}: {response.text[:300]}"
    if response.status_code in (401, 403):
        raise InfluxForbidden(reason, response.status_code)
    if response.status_code >= 500 or response.status_code in (401, 403, 404, 429):
        raise InfluxUnavailable(reason)
    raise InfluxRejected(reason)


def make_transport(settings, storage_settings) -> InfluxTransport:
    """The transport selected by `LINEGUARD_INFLUX_API` (v1 or v2)."""
    token = storage_settings.influx_token.get_secret_value() if storage_settings.influx_token else None
    if storage_settings.influx_api == "v2":
        return V2ClientTransport(settings.influx, token or "", storage_settings.influx_org,
                                 storage_settings.bucket(settings), timeout_s=storage_settings.influx_timeout_s)
    password = storage_settings.influx_password.get_secret_value() if storage_settings.influx_password else None
    return V1HttpTransport(settings.influx, settings.influx_database, username=storage_settings.influx_username,
                           password=password, token=token, retention_policy=storage_settings.influx_retention_policy,
                           timeout_s=storage_settings.influx_timeout_s, create_database=settings.embedded)


def credential_settings(storage_settings) -> str:
    """The settings that hold the InfluxDB credentials in force, for error messages."""
    if storage_settings.influx_api == "v2" or (storage_settings.influx_token and not storage_settings.influx_username):
        return "LINEGUARD_INFLUX_TOKEN"
    if storage_settings.influx_username:
        return "LINEGUARD_INFLUX_USERNAME/LINEGUARD_INFLUX_PASSWORD"
    return "LINEGUARD_INFLUX_TOKEN or LINEGUARD_INFLUX_USERNAME/PASSWORD (none is set)"


async def check_permissions(transport: InfluxTransport, query: str, probe: Point, *, target: str,
                            credentials: str) -> None:
    """Try one read (`query`) and one write (`probe`); raise InfluxPermissionError naming the missing permission
    when the server refuses either (HTTP 401/403). InfluxUnavailable (server unreachable, 5xx) passes through:
    the caller waits for the server, which a missing permission would never fix."""
    refused: dict[str, InfluxForbidden] = {}
    try:
        await transport.query(query)
    except InfluxForbidden as exc:
        refused["read"] = exc
    except InfluxRejected as exc:
        if "database not found" not in str(exc):   # found, or created by the first write (embedded)
            raise
    try:
        await transport.write([probe.line()])
    except InfluxForbidden as exc:
        refused["write"] = exc
    if not refused:
        return
    first = next(iter(refused.values()))
    detail = str(first).splitlines()[0].split(f"HTTP {first.status}: ", 1)[-1][:200]
    # 401 on both: the credentials themselves are wrong. Otherwise one of the two passed, so they are valid and the
    # refusal (401 or 403: InfluxDB 2.x answers 401 on some endpoints for a missing permission) names a permission.
    if len(refused) == 2 and all(exc.status == 401 for exc in refused.values()):
        raise InfluxPermissionError(f"InfluxDB at {transport.url} rejects the credentials in {credentials} "
                                    f"(HTTP 401, {detail}): they must be valid and allow read and write on "
                                    f"{target}")
    missing = " and ".join(refused)
    raise InfluxPermissionError(f"InfluxDB at {transport.url}: {credentials} lacks {missing.upper()} permission "
                                f"on {target} (HTTP {first.status}, {detail}); the stats service reads its "
                                "progress back and writes the statistics: give it read and write")


# -- the buffered writer -----------------------------------------------------------------------
@dataclass
class WriterStats:
    written: int = 0
    batches: int = 0
    failures: int = 0
    rejected: int = 0
    outages: int = 0
    down_since: float | None = None


@dataclass
class _Entry:
    line: str
    on_written: Callable[[], None] | None = None


@dataclass
class InfluxWriter:
    """Batched, retrying writes through a bounded buffer (see the module docstring)."""

    transport: InfluxTransport
    batch_size: int = 1000
    flush_interval_s: float = 1.0
    buffer_points: int = 200_000
    retry_min_s: float = 0.2
    retry_max_s: float = 30.0
    stats: WriterStats = field(default_factory=WriterStats)

    def __post_init__(self) -> None:
        self._buffer: deque[_Entry] = deque()
        self._changed = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._task: asyncio.Task | None = None
        self._closing = False

    @classmethod
    def from_settings(cls, settings, storage_settings) -> InfluxWriter:
        return cls(make_transport(settings, storage_settings), batch_size=storage_settings.influx_batch_size,
                   flush_interval_s=storage_settings.influx_flush_interval_s,
                   buffer_points=storage_settings.influx_buffer_points,
                   retry_max_s=storage_settings.influx_retry_max_s)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def available(self) -> bool:
        return self.stats.down_since is None

    async def start(self) -> InfluxWriter:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="influx-writer")
        return self

    async def put(self, points: Iterable[Point], on_written: Callable[[], None] | None = None) -> None:
        """Queue points; wait while the buffer is full. `on_written` runs once all of them are written."""
        lines = [point.line() for point in points]
        while self._buffer and len(self._buffer) + len(lines) > self.buffer_points:
            log.warning("influx_buffer_full", buffered=len(self._buffer), limit=self.buffer_points)
            self._space.clear()
            await self._space.wait()
        if not lines:
            if on_written is not None:
                if self._buffer:  # keep the order: call it after what is queued before it
                    self._buffer[-1] = _chain(self._buffer[-1], on_written)
                else:
                    on_written()
            return
        for line in lines[:-1]:
            self._buffer.append(_Entry(line))
        self._buffer.append(_Entry(lines[-1], on_written))
        self._changed.set()

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until the buffer is empty; False when timeout_s passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._buffer:
            if deadline is not None and time.monotonic() > deadline:
                return False
            self._changed.set()
            await asyncio.sleep(0.05)
        return True

    async def close(self, timeout_s: float = 10.0) -> None:
        """Flush (up to timeout_s), stop the background task and close the transport."""
        if self._task is not None:
            flushed = await self.flush(timeout_s)
            if not flushed:
                log.error("influx_unflushed_at_close", buffered=len(self._buffer), url=self.transport.url)
            self._closing = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.transport.close()

    async def _run(self) -> None:
        delay = self.retry_min_s
        last_reported = 0.0
        while True:
            if len(self._buffer) < self.batch_size:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self.flush_interval_s)
            if not self._buffer:
                continue
            batch = [self._buffer[i] for i in range(min(self.batch_size, len(self._buffer)))]
            try:
                await self.transport.write([entry.line for entry in batch])
            except InfluxUnavailable as exc:
                self.stats.failures += 1
                now = time.monotonic()
                if self.stats.down_since is None:
                    self.stats.down_since = now
                    self.stats.outages += 1
                    last_reported = now
                    log.warning("influx_unavailable", url=self.transport.url, error=str(exc)[:300],
                                buffered=len(self._buffer), action="keeping points, retrying")
                elif now - last_reported > 30:
                    last_reported = now
                    log.warning("influx_still_unavailable", url=self.transport.url, error=str(exc)[:200],
                                down_s=round(now - self.stats.down_since, 1), buffered=len(self._buffer))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            except InfluxRejected as exc:
                self.stats.rejected += len(batch)
                log.error("influx_rejected", url=self.transport.url, points=len(batch), error=str(exc)[:300],
                          first_line=batch[0].line[:200])
            else:
                self.stats.written += len(batch)
                self.stats.batches += 1
                if self.stats.down_since is not None:
                    log.info("influx_recovered", url=self.transport.url,
                             down_s=round(time.monotonic() - self.stats.down_since, 1),
                             backlog=len(self._buffer), action="catching up")
                    self.stats.down_since = None
            delay = self.retry_min_s
            for _ in batch:
                entry = self._buffer.popleft()
                if entry.on_written is not None:
                    entry.on_written()
            if len(self._buffer) <= self.buffer_points:
                self._space.set()


def _chain(entry: _Entry, callback: Callable[[], None]) -> _Entry:
    previous = entry.on_written

    def both() -> None:
        if previous is not None:
            previous()
        callback()

    return _Entry(entry.line, both)
