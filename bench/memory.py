"""`lineguard bench memory`: a real `lineguard infer` process, its peak resident memory under a normal
stream and under a hostile one (decompression bombs, mismatched and broken frames), read from /proc.

Both streams carry the same large legal frames (20 MP), so the difference between them is the hostile
part alone. Each runs on a fresh worker process with the default settings, on a fresh embedded broker.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from bench.hostile import BOMB_SIDE, LARGE, FrameStream, bomb_jpeg, hostile_stream, normal_stream, send
from inference.references import ensure_simulator_references
from inference.worker import documented_peak_bytes
from lineguard.kafka import ensure_topics
from lineguard.processes import memory_bytes
from lineguard.settings import Settings, load_settings
from lineguard.stack import EmbeddedStack, free_port

MB = 2**20


def _metric_total(port: int, prefix: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def run_worker_on(settings: Settings, stream: FrameStream, timeout_s: float = 600) -> dict:
    """Start `lineguard infer`, send the stream, wait until every message has its outcome; memory and time."""
    port = free_port()
    env = dict(os.environ) | {"LINEGUARD_KAFKA_BOOTSTRAP": settings.bootstrap,
                              "LINEGUARD_TOPIC_PREFIX": settings.topic_prefix,
                              "LINEGUARD_STATE_DIR": str(settings.state_dir), "LINEGUARD_LOG_JSON": "1"}
    log_path = settings.state_dir / f"infer-{settings.topic_prefix}log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "deploy", "infer", "--http-port", str(port),
                                   "--no-text", "--group-id", f"{settings.topic_prefix}workers"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append(memory_bytes(worker.pid)[0])

    try:
        deadline = time.monotonic() + 300
        while not _healthy(port):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.3)
        idle = memory_bytes(worker.pid)[0]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        asyncio.run(send(settings, stream))
        deadline = time.monotonic() + timeout_s
        while True:
            verdicts = _metric_total(port, "lineguard_frames_total")
            dead = _metric_total(port, "lineguard_dead_letters_total")
            if verdicts + dead >= len(stream.messages):
                break
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"worker gave {verdicts + dead} of {len(stream.messages)} outcomes")
            time.sleep(0.1)
        seconds = time.monotonic() - started
        stop.set()
        sampler.join(5)
        peak = max(memory_bytes(worker.pid)[1], *samples)
    finally:
        stop.set()
        worker.terminate()
        worker.wait(60)
    return {"messages": len(stream.messages), "verdicts": int(verdicts), "dead_letters": int(dead),
            "seconds": round(seconds, 1), "idle_rss_mb": round(idle / MB), "peak_rss_mb": round(peak / MB)}


def memory_benchmark(normal_frames: int = 200, bombs: int = 20, large: int = 5) -> dict:
    with tempfile.TemporaryDirectory() as state_dir:
        base = load_settings(state_dir=Path(state_dir), embedded_kafka_port=0, embedded_influx_port=0)
        ensure_simulator_references(base)
        streams = {
            "normal": normal_stream(normal_frames, large=large),
            "hostile": hostile_stream(bomb_jpeg(), bombs=bombs, large=large),
        }
        runs = {}
        with EmbeddedStack(base, with_influx=False) as stack:
            for name, stream in streams.items():
                settings = base.model_copy(update={"kafka_bootstrap": stack.kafka_bootstrap,
                                                   "topic_prefix": f"bench-memory-{name}."})
                asyncio.run(ensure_topics(settings))
                runs[name] = run_worker_on(settings, stream)
    return {"runs": runs, "bound_mb": round(documented_peak_bytes(base) / MB),
            "max_frame_pixels": base.max_frame_pixels, "worker_memory_mb": base.worker_memory_mb,
            "bombs": bombs, "bomb_side": BOMB_SIDE, "large_frames": large, "large_size": list(LARGE),
            "hostile_vs_normal": round(runs["hostile"]["peak_rss_mb"] / runs["normal"]["peak_rss_mb"], 2)}


def markdown_section(result: dict | None = None) -> str:
    from bench.report import machine

    result = result or memory_benchmark()
    runs = result["runs"]
    normal, hostile = runs["normal"], runs["hostile"]
    lines = [
        "## Worker memory under hostile input (`lineguard bench memory`)",
        "",
        f"Command: `lineguard bench memory --json`. Machine: {machine()}. "
        f"Date: {datetime.now(UTC):%Y-%m-%d}.",
        "",
        f"A fresh `lineguard infer` process per stream (default settings: LINEGUARD_MAX_FRAME_PIXELS = "
        f"{result['max_frame_pixels']:,}, LINEGUARD_WORKER_MEMORY_MB = {result['worker_memory_mb']}), on the "
        "embedded broker; resident memory read from /proc (VmHWM and 20 samples a second). Both streams hold "
        f"the same {result['large_frames']} legal {result['large_size'][0]}x{result['large_size'][1]} frames; "
        f"the hostile one adds {result['bombs']} decompression bombs ({result['bomb_side']}x{result['bomb_side']} "
        "one-colour JPEGs and forged 60000x60000 headers), frames unlike their FrameMeta, oversize ids, "
        "PNG, truncated, empty and header-less payloads, a future schema version and an unknown product.",
        "",
        "| stream | messages | verdicts | dead letters | seconds | idle RSS | peak RSS | baseline: normal stream |"
        " ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in (("normal", normal), ("hostile", hostile)):
        lines.append(f"| {name} | {run['messages']} | {run['verdicts']} | {run['dead_letters']} | {run['seconds']} | "
                     f"{run['idle_rss_mb']} MB | {run['peak_rss_mb']} MB | {normal['peak_rss_mb']} MB | "
                     f"{run['peak_rss_mb'] / normal['peak_rss_mb']:.2f}x |")
    lines += ["", f"Documented bound with the defaults (README, *Memory*): {result['bound_mb']} MB; "
                  f"the hostile stream peaked at {hostile['peak_rss_mb'] / result['bound_mb'] * 100:.0f} % of it."]
    return "\n".join(lines)
