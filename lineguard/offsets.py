"""Which offsets may be committed: only those below the oldest message not yet finished.

The stream services' one offset tracker (the worker, the recorder). A message is "done" when what it
produced is safe: for the worker, when the broker has acknowledged its verdict and heatmap (or its dead
letter); for the recorder, when its record is saved. Messages finish out of order (flagged frames wait
for text), so per partition we keep the pending offsets and commit `min(pending)`, or `last done + 1` when
nothing is pending.

    >>> tracker = OffsetTracker()
    >>> tracker.add(tp, [10, 11, 12]); tracker.done(tp, 11)
    >>> tracker.committable()   # {} : 10 is still pending
    >>> tracker.done(tp, 10); tracker.committable()   # {tp: 12}
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable, Iterable

TopicPartition = Hashable   # aiokafka's TopicPartition, or any partition key


class OffsetTracker:
    def __init__(self) -> None:
        self._pending: dict[TopicPartition, set[int]] = {}
        self._high: dict[TopicPartition, int] = {}       # highest offset seen done
        self._committed: dict[TopicPartition, int] = {}  # next offset already committed
        self._changed = asyncio.Event()

    def add(self, tp: TopicPartition, offsets: Iterable[int]) -> None:
        self._pending.setdefault(tp, set()).update(offsets)

    def done(self, tp: TopicPartition, offset: int) -> None:
        pending = self._pending.get(tp)
        if pending is None or offset not in pending:
            return  # partition revoked meanwhile: its new owner re-processes from the commit
        pending.discard(offset)
        self._high[tp] = max(self._high.get(tp, -1), offset)
        self._changed.set()

    def in_flight(self, partitions: Iterable[TopicPartition] | None = None) -> int:
        keys = self._pending if partitions is None else [tp for tp in partitions if tp in self._pending]
        return sum(len(self._pending[tp]) for tp in keys)

    def committable(self) -> dict[TopicPartition, int]:
        """{partition: next offset to commit} for partitions whose commit point advanced."""
        result = {}
        for tp, pending in self._pending.items():
            if pending:
                position = min(pending)
            elif tp in self._high:
                position = self._high[tp] + 1
            else:
                continue
            if position > self._committed.get(tp, -1):
                result[tp] = position
        return result

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, position in offsets.items():
            self._committed[tp] = max(self._committed.get(tp, -1), position)

    def forget(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Drop what is known of `partitions` (None: of every partition), as after they were revoked."""
        for tp in list(self._pending) + list(self._high) + list(self._committed) if partitions is None else partitions:
            self._pending.pop(tp, None)
            self._high.pop(tp, None)
            self._committed.pop(tp, None)

    async def wait_change(self, seconds: float) -> None:
        """Return when a frame finished, or after `seconds`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)
        self._changed.clear()
