"""What the dialogue service refuses before it does any work (issue 25): bodies too large, bodies of callers
without a token, too many SSE streams, half-sent requests, free-form questions beyond the LLM's queue and
labels beyond an operator's hourly quota.

- `BodyLimit`: a pure ASGI middleware (BaseHTTPMiddleware would buffer SSE) that answers 413 when the
  Content-Length is over the route's cap, and counts a chunked body's bytes as they are received;
- `parse_body`: a request body as a pydantic model, read in a dependency that runs after the token check,
  so a caller without a token gets 401 whatever it sent;
- `StreamSlots`: SSE streams per token and in total (429 beyond);
- `FreeFormQueue`: free-form (LLM) answers on threads of their own, at most `capacity` waiting or running
  (503 + Retry-After beyond), so the shared thread pool stays free for fact answers and records;
- `LabelQuota`: labels per operator per hour (429 beyond);
- `HeaderTimeoutProtocol` and `server_options`: uvicorn closes a connection whose request line and headers
  have not all arrived within `header_timeout_s` (uvicorn has no such timeout of its own).

    >>> app.add_middleware(BodyLimit, caps=lambda method, path: 16 * 1024)
    >>> uvicorn.run(app, **server_options(dialogue_settings))
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from fastapi import HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dialogue.settings import DialogueSettings
from lineguard.logging import get_logger
from storage.artifacts import StorageError
from storage.masks import image_size
from storage.records import InspectionRecord, RecordStore

log = get_logger(__name__)

QUESTION_PATH = re.compile(r"^/api/records/[^/]+/questions$")
LABEL_PATH = re.compile(r"^/api/records/[^/]+/label$")
ModelT = TypeVar("ModelT", bound=BaseModel)


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


# --- bodies ----------------------------------------------------------------------------------------

class BodyTooLarge(HTTPException):
    def __init__(self, cap: int):
        super().__init__(status.HTTP_413_CONTENT_TOO_LARGE, f"the request body is larger than {cap} bytes",
                         headers={"Connection": "close"})


def body_caps(dialogue: DialogueSettings, kafka_max_message_bytes: int) -> Callable[[str, str], int]:
    """The body cap of a request: a label may be as large as the broker's message limit (the Label event
    carries the mask in base64, as the request does); every other request is a small JSON object."""

    def cap(method: str, path: str) -> int:
        return kafka_max_message_bytes if LABEL_PATH.match(path) else dialogue.question_body_bytes

    return cap


class BodyLimit:
    """413 before the body is read: on the Content-Length, or once a chunked body passes the cap."""

    def __init__(self, app, caps: Callable[[str, str], int]):
        self.app = app
        self.caps = caps

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        cap = self.caps(scope["method"], scope["path"])
        length = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > cap):
            await self._refuse(send, cap)
            return
        received = 0
        started = False

        async def counting() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise BodyTooLarge(cap)
            return message

        async def sending(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, sending)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(send, cap)

    @staticmethod
    async def _refuse(send, cap: int) -> None:
        body = b'{"detail":"the request body is larger than %d bytes"}' % cap
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


async def parse_body(request: Request, model: type[ModelT]) -> ModelT:
    """The request's JSON body as `model`; 422 like FastAPI's own body errors. Call it from a dependency that
    depends on the principal: the body is then read only for a caller with a valid token."""
    raw = await request.body()   # BodyLimit has capped it
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        raise RequestValidationError([e | {"loc": ("body", *e.get("loc", ()))} for e in exc.errors()]) from None


def body_schema(model: type[BaseModel]) -> dict:
    """`openapi_extra` of a route whose body `parse_body` reads: the OpenAPI document still shows it."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


# --- SSE streams -----------------------------------------------------------------------------------

class StreamSlots:
    """Open SSE streams per token and in total; `acquire` is False when either cap is reached."""

    def __init__(self, per_token: int, total: int):
        self.per_token = per_token
        self.total = total
        self.open: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        if sum(self.open.values()) >= self.total or self.open.get(key, 0) >= self.per_token:
            return False
        self.open[key] = self.open.get(key, 0) + 1
        return True

    def release(self, key: str) -> None:
        left = self.open.get(key, 0) - 1
        if left > 0:
            self.open[key] = left
        else:
            self.open.pop(key, None)


# --- free-form answers -------------------------------------------------------------------------------

class FreeFormQueue:
    """At most `capacity` free-form questions waiting or being answered, on `workers` threads of their own
    (the LLM itself runs on one thread: answers.LvlmAnswerer); beyond it, 503 with Retry-After."""

    def __init__(self, capacity: int, retry_after_s: float, workers: int = 1):
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.pending = 0
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="free-form")

    async def run(self, fn: Callable, *args):
        if self.pending >= self.capacity:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                f"{self.pending} free-form questions are waiting for the language model; ask again "
                                "later (fact questions are answered meanwhile)",
                                headers=_retry_after(self.retry_after_s))
        loop = asyncio.get_running_loop()
        self.pending += 1   # until the job ends: a caller gone away frees its place only if its job had not started
        job = self._threads.submit(fn, *args)
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._done))
        return await asyncio.wrap_future(job)

    def _done(self) -> None:
        self.pending -= 1

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


# --- labels ----------------------------------------------------------------------------------------

class LabelQuota:
    """Labels per operator in any sliding hour; `take` is 0 when a label may go ahead, else seconds to wait."""

    def __init__(self, per_hour: int, window_s: float = 3600.0):
        self.per_hour = per_hour
        self.window_s = window_s
        self._sent: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def take(self, operator: str) -> float:
        now = time.monotonic()
        with self._lock:
            sent = self._sent.setdefault(operator, deque())
            while sent and sent[0] <= now - self.window_s:
                sent.popleft()
            if len(sent) >= self.per_hour:
                return sent[0] + self.window_s - now
            sent.append(now)
            return 0.0

    def refuse(self, operator: str) -> None:
        """429 when `operator` has used this hour's labels."""
        wait_s = self.take(operator)
        if wait_s > 0:
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                                f"{operator} has sent {self.per_hour} labels in the last hour; try again later",
                                headers=_retry_after(wait_s))


@dataclass
class Limits:
    """The service's limits, one per app (`Service.limits`)."""

    streams: StreamSlots
    free_form: FreeFormQueue
    labels: LabelQuota

    @classmethod
    def from_settings(cls, dialogue: DialogueSettings) -> Limits:
        return cls(StreamSlots(dialogue.streams_per_token, dialogue.streams_total),
                   FreeFormQueue(dialogue.llm_queue, dialogue.llm_retry_after_s), LabelQuota(dialogue.labels_per_hour))

    def stream_refusal(self, key: str) -> HTTPException | None:
        """None when a stream of this token may open (and counts from now on), else the 429 to raise."""
        if self.streams.acquire(key):
            return None
        return HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                             f"too many open streams (at most {self.streams.per_token} per token, "
                             f"{self.streams.total} in all); close one first", headers=_retry_after(5))

    def close(self) -> None:
        self.free_form.close()


def frame_shape(store: RecordStore, record: InspectionRecord) -> tuple[int, int] | None:
    """(H, W) of the record's frame, from the stored image's header; None when the image is not stored."""
    if not record.image_uri:
        return None
    try:
        return image_size(store.artifacts.get(record.image_uri))
    except StorageError:
        return None


# --- uvicorn ---------------------------------------------------------------------------------------

class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request line and headers are not complete
    `header_timeout_s` after the connection opened or the request began (a client sending half a request
    held its connection for ever). The idle time between requests is uvicorn's `timeout_keep_alive`."""

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            log.info("request_header_timeout", timeout_s=self.header_timeout_s)
            self.transport.close()


def server_options(dialogue: DialogueSettings) -> dict:
    """uvicorn.run / uvicorn.Config keyword arguments of the dialogue service's connection limits."""
    protocol = type("DialogueHttpProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": dialogue.header_timeout_s})
    return {"http": protocol, "timeout_keep_alive": dialogue.keep_alive_s}
