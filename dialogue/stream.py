"""Newly flagged verdicts for the console's live list: one consumer of the verdicts topic, fanned out to every
SSE client.

The consumer has no group (every service instance sees every verdict) and starts at the end of the topic.
It runs in the background for the app's lifetime and reconnects when the broker is away, so the API keeps
serving records meanwhile. Each client has a bounded queue; a slow client loses its oldest verdicts, never
holds up the others. A subscriber may pass `still_allowed`, asked every second: the stream of a revoked or
expired token ends within about a second.

    >>> broadcaster = VerdictBroadcaster(settings)
    >>> task = asyncio.create_task(broadcaster.run())
    >>> async for verdict in broadcaster.subscribe(lambda: tokens.still_valid(principal)):   # as they come
    ...     ...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from lineguard.events import Verdict
from lineguard.logging import get_logger
from lineguard.settings import Settings
from lineguard.topics import VERDICTS

log = get_logger(__name__)

RECONNECT_S = 2.0
CHECK_S = 1.0        # how often an open stream asks whether its token is still valid
RECENT = 10_000


class VerdictBroadcaster:
    def __init__(self, settings: Settings, queue_size: int = 100):
        self.settings = settings
        self.queue_size = queue_size
        self.clients: set[asyncio.Queue] = set()
        self.recent: OrderedDict[str, None] = OrderedDict()   # flagged frame_ids already sent (re-deliveries)
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Consume the verdicts topic until cancelled; reconnect after a broker failure."""
        from lineguard.kafka import make_consumer, start_client

        while True:
            consumer = make_consumer(self.settings, VERDICTS, group_id=None, auto_offset_reset="latest")
            try:
                await start_client(self.settings, consumer, timeout_s=10)
                # resolve the end offsets now, so verdicts produced from here on are all seen
                for tp in consumer.assignment():
                    await consumer.position(tp)
                self.connected.set()
                log.info("stream_connected", topic=self.settings.topic(VERDICTS))
                while True:
                    batches = await consumer.getmany(timeout_ms=500)
                    for messages in batches.values():
                        for message in messages:
                            self._dispatch(message.value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving the API; try the broker again
                self.connected.clear()
                log.warning("stream_unavailable", error=str(exc).splitlines()[0][:200], retry_s=RECONNECT_S)
                await asyncio.sleep(RECONNECT_S)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    def _dispatch(self, value: bytes | None) -> None:
        try:
            verdict = Verdict.from_bytes(value or b"")
        except ValueError:
            return   # the stats aggregator dead-letters unreadable verdicts; the console just skips them
        if not verdict.is_anomalous or verdict.frame_id in self.recent:
            return
        self.recent[verdict.frame_id] = None
        while len(self.recent) > RECENT:
            self.recent.popitem(last=False)
        for queue in list(self.clients):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(verdict)

    async def subscribe(self, still_allowed: Callable[[], bool] | None = None,
                        check_s: float = CHECK_S) -> AsyncIterator[Verdict]:
        """Flagged verdicts from now on, until the client goes away, or until `still_allowed()` (asked every
        `check_s` and before each verdict) says no: the stream of a revoked or expired token ends."""
        queue: asyncio.Queue = asyncio.Queue(self.queue_size)
        self.clients.add(queue)
        waiting: asyncio.Task | None = None
        try:
            while still_allowed is None or still_allowed():
                if still_allowed is None:
                    yield await queue.get()
                    continue
                # the same get() waits across checks: cancelling it on a timeout could lose a verdict
                waiting = waiting or asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({waiting}, timeout=check_s)
                if done and still_allowed():
                    verdict, waiting = waiting.result(), None
                    yield verdict
            log.info("stream_closed", reason="token revoked or expired")
        finally:
            if waiting is not None:
                waiting.cancel()
            self.clients.discard(queue)
