"""A live console view of frames arriving on the frames topic (rich table, per camera)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lineguard.events import BadFrame, FrameMeta, decode_frame
from lineguard.kafka import make_consumer, start_client
from lineguard.settings import Settings
from lineguard.topics import FRAMES


@dataclass
class CameraStats:
    frames: int = 0
    defects: int = 0
    bytes: int = 0
    last: FrameMeta | None = None
    lag_ms: float = 0.0


@dataclass
class FrameStats:
    cameras: dict[str, CameraStats] = field(default_factory=dict)
    arrivals: deque = field(default_factory=lambda: deque(maxlen=2000))
    bad: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, meta: FrameMeta, size: int) -> None:
        stats = self.cameras.setdefault(meta.camera_id, CameraStats())
        stats.frames += 1
        stats.bytes += size
        stats.defects += bool(meta.ground_truth and meta.ground_truth.is_defect)
        stats.last = meta
        stats.lag_ms = (datetime.now(UTC) - meta.captured_at).total_seconds() * 1000
        self.arrivals.append(time.monotonic())

    @property
    def total(self) -> int:
        return sum(s.frames for s in self.cameras.values())

    def fps(self, window_s: float = 5.0) -> float:
        now = time.monotonic()
        recent = [t for t in self.arrivals if now - t <= window_s]
        span = min(window_s, now - self.started)
        return len(recent) / span if span > 0 else 0.0

    def render(self, title: str) -> Group:
        table = Table(title=title, expand=False)
        for column in ("camera", "frames", "defects (truth)", "last product", "last frame_id", "size", "lag ms"):
            table.add_column(column, justify="right" if column in {"frames", "size", "lag ms"} else "left")
        for camera_id in sorted(self.cameras):
            s = self.cameras[camera_id]
            last = s.last
            table.add_row(camera_id, str(s.frames), str(s.defects), last.product if last else "-",
                          last.frame_id if last else "-", f"{last.width}x{last.height}" if last else "-",
                          f"{s.lag_ms:.0f}")
        summary = Text(f"frames {self.total}   {self.fps():.1f} frames/s   unreadable {self.bad}   "
                       "(Ctrl-C to stop)")
        return Group(table, summary)


async def watch_frames(settings: Settings, *, seconds: float | None = None, console: Console | None = None,
                       from_beginning: bool = False) -> FrameStats:
    """Consume the frames topic and show a live table until cancelled or `seconds` pass."""
    consumer = make_consumer(settings, FRAMES, group_id=None,
                             auto_offset_reset="earliest" if from_beginning else "latest")
    await start_client(settings, consumer)
    stats = FrameStats()
    title = f"lineguard · frames on {settings.topic(FRAMES)} @ {settings.bootstrap}"
    deadline = time.monotonic() + seconds if seconds else None
    try:
        with Live(stats.render(title), console=console or Console(), refresh_per_second=4,
                  transient=False) as live:
            while deadline is None or time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=250)
                for records in batches.values():
                    for record in records:
                        try:
                            meta, jpeg = decode_frame(record.value, record.headers)
                        except BadFrame:
                            stats.bad += 1
                            continue
                        stats.add(meta, len(jpeg))
                live.update(stats.render(title))
    except asyncio.CancelledError:
        pass
    finally:
        await consumer.stop()
    return stats
