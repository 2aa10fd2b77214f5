"""A live console view of verdicts: frames/s, defect rate, latency, the last flagged parts and their answers.

Where frames carry ground truth (the simulator, labelled datasets) it also shows live precision
and recall of the automatic verdict. Verdicts are deduplicated by frame_id, as every consumer should.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lineguard.events import DeadLetter, Verdict
from lineguard.kafka import make_consumer, start_client
from lineguard.settings import Settings
from lineguard.topics import DEADLETTER, VERDICTS


@dataclass
class VerdictStats:
    seen: set[str] = field(default_factory=set)
    frames: int = 0
    flagged: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    true_positive: int = 0
    false_positive: int = 0
    false_negative: int = 0
    true_negative: int = 0
    arrivals: deque = field(default_factory=lambda: deque(maxlen=5000))
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=500))
    last_flagged: deque = field(default_factory=lambda: deque(maxlen=6))
    started: float = field(default_factory=time.monotonic)

    def add(self, verdict: Verdict) -> bool:
        """Count a verdict once per frame_id; returns False for a re-delivered one."""
        if verdict.frame_id in self.seen:
            self.duplicates += 1
            return False
        self.seen.add(verdict.frame_id)
        self.frames += 1
        self.arrivals.append(time.monotonic())
        self.latencies_ms.append((verdict.produced_at - verdict.captured_at).total_seconds() * 1000)
        if verdict.is_anomalous:
            self.flagged += 1
            self.last_flagged.appendleft(verdict)
        truth = verdict.ground_truth_defect
        if truth is not None:
            if verdict.is_anomalous:
                self.true_positive += truth
                self.false_positive += not truth
            else:
                self.false_negative += truth
                self.true_negative += not truth
        return True

    @property
    def precision(self) -> float | None:
        flagged = self.true_positive + self.false_positive
        return self.true_positive / flagged if flagged else None

    @property
    def recall(self) -> float | None:
        defects = self.true_positive + self.false_negative
        return self.true_positive / defects if defects else None

    def fps(self, window_s: float = 5.0) -> float:
        now = time.monotonic()
        span = min(window_s, now - self.started)
        return sum(1 for t in self.arrivals if now - t <= window_s) / span if span > 0 else 0.0

    def render(self, title: str) -> Group:
        def pct(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.1f}%"

        latencies = sorted(self.latencies_ms)
        p50 = latencies[len(latencies) // 2] if latencies else 0.0
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
        summary = Table.grid(padding=(0, 3))
        summary.add_row("frames", "frames/s", "defect rate", "precision", "recall", "p50 / p99 ms", "dead letters")
        summary.add_row(str(self.frames), f"{self.fps():.1f}", pct(self.flagged / self.frames if self.frames else None),
                        pct(self.precision), pct(self.recall), f"{p50:.0f} / {p99:.0f}", str(self.dead_letters))
        flagged = Table(title="last flagged parts", expand=False)
        for column in ("frame_id", "camera", "product", "score/thr", "conf", "truth", "answer"):
            flagged.add_column(column, overflow="fold")
        for verdict in self.last_flagged:
            truth = {None: "-", True: "defect", False: "good"}[verdict.ground_truth_defect]
            flagged.add_row(verdict.frame_id.split(".")[-1], verdict.camera_id, verdict.product,
                            f"{verdict.score / verdict.threshold:.2f}", f"{verdict.confidence:.2f}", truth,
                            verdict.answer or "…")
        return Group(Text(title, style="bold"), summary, flagged, Text("Ctrl-C to stop", style="dim"))


async def watch_verdicts(settings: Settings, *, seconds: float | None = None, console: Console | None = None,
                         from_beginning: bool = False) -> VerdictStats:
    """Consume verdicts (and dead letters) and show the live view until cancelled or `seconds` pass."""
    consumer = make_consumer(settings, VERDICTS, DEADLETTER, group_id=None,
                             auto_offset_reset="earliest" if from_beginning else "latest")
    await start_client(settings, consumer)
    stats = VerdictStats()
    title = f"lineguard · verdicts on {settings.topic(VERDICTS)} @ {settings.bootstrap}"
    deadline = time.monotonic() + seconds if seconds else None
    verdict_topic = settings.topic(VERDICTS)
    try:
        with Live(stats.render(title), console=console or Console(), refresh_per_second=4) as live:
            while deadline is None or time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=250)
                for tp, records in batches.items():
                    for record in records:
                        if tp.topic == verdict_topic:
                            stats.add(Verdict.from_bytes(record.value))
                        else:
                            DeadLetter.from_bytes(record.value)
                            stats.dead_letters += 1
                live.update(stats.render(title))
    except asyncio.CancelledError:
        pass
    finally:
        await consumer.stop()
    return stats
