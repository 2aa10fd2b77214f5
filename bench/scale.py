"""`lineguard bench scale`: inference workers as separate `lineguard infer` processes, each pinned to one core
with `taskset`, in one consumer group on the 6-partition frames topic of the embedded broker. The frames come
from six cameras, one per partition (frames are keyed by camera: cameras that share partitions would leave a
worker idle, whatever the group's assignment).

1. **Throughput**: a backlog of simulated frames drained by one worker on core 0, then (another topic, the same
   frames) by two workers on cores 0 and 1; the backlog is published once the workers are up and hold the
   partitions; frames/s from the first verdict to the last, and `speedup_2_workers` = two / one.
2. **Rebalance**: frames published at a steady rate to one worker; a second worker is started mid-stream and
   joins the group once its model has loaded (the rebalance on join); then the first is stopped with SIGTERM
   (it drains and commits, and the group gives its partitions to the second). Every frame must get a verdict
   (`lost_frames`), each one once after de-duplication by frame id (`duplicate_verdicts` counts the re-sent
   ones: at-least-once delivery re-publishes what a stopped worker scored but had not committed); the longest
   pause between two verdicts is reported.

References are added once to the shared artifact store (inference/references.py); each worker loads them from
there, as workers on other machines would. Each worker runs one torch thread (`OMP_NUM_THREADS=1`).

    >>> result = scale_benchmark(frames=240)
    >>> result["speedup_2_workers"], result["rebalance"]["lost_frames"]
    (1.85, 0)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from aiokafka.errors import KafkaError

from bench.report import machine
from bench.stream import _frames, _produce, cameras_on_every_partition, phase_settings
from ingest.publisher import as_published
from ingest.simulator import PRODUCTS, LineSimulator
from lineguard.events import Verdict
from lineguard.kafka import make_consumer, start_client
from lineguard.logging import get_logger
from lineguard.processes import stop_children
from lineguard.settings import Settings, load_settings
from lineguard.stack import EmbeddedStack
from lineguard.topics import FRAMES, VERDICTS, spec

log = get_logger(__name__)

REFERENCES = 4
LOGS = Path(tempfile.gettempdir()) / "lineguard-bench-scale"     # the workers' logs, kept after the run


def _worker(settings: Settings, core: int, group: str, encoder: str | None, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "deploy", "infer", "--group-id", group, "--no-text", "--http-port", "-1",
               "--max-batch", "8", *extra] + (["--encoder", encoder] if encoder else [])
    if shutil.which("taskset") and (os.cpu_count() or 1) > core:
        command = ["taskset", "-c", str(core), *command]
    env = dict(os.environ) | {"LINEGUARD_KAFKA_BOOTSTRAP": settings.bootstrap,
                              "LINEGUARD_TOPIC_PREFIX": settings.topic_prefix,
                              "LINEGUARD_STATE_DIR": str(settings.state_dir),
                              "LINEGUARD_STORE_ARTIFACTS": settings.artifacts_location(),
                              "LINEGUARD_LOG_JSON": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    LOGS.mkdir(parents=True, exist_ok=True)
    log = open(LOGS / f"worker-{group}-{core}-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
    worker = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    worker.started_at = time.monotonic()
    worker.log_path = log.name
    log.close()
    return worker


class VerdictLog:
    """Every record of a topic (the verdicts) as it arrives: (monotonic time, frame id). It reads on through a
    broker that restarts (a fetch error is retried), from the start of a topic created again."""

    def __init__(self, settings: Settings, topic: str = VERDICTS, frame_id=None):
        self.settings = settings
        self.topic = topic
        self._frame_id = frame_id              # bytes -> frame id; default: the Verdict's
        self.arrivals: list[tuple[float, str]] = []
        self._stop = asyncio.Event()

    def _parse(self, value: bytes) -> str:
        return self._frame_id(value) if self._frame_id else Verdict.model_validate_json(value).frame_id

    async def run(self) -> None:
        consumer = make_consumer(self.settings, self.topic, group_id=None, auto_offset_reset="earliest")
        await start_client(self.settings, consumer)
        try:
            while not self._stop.is_set():
                try:
                    batches = await consumer.getmany(timeout_ms=100)
                except KafkaError as exc:
                    log.warning("verdict_log_fetch_failed", topic=self.topic, error=str(exc)[:200])
                    await asyncio.sleep(0.5)
                    continue
                for records in batches.values():
                    for record in records:
                        self.arrivals.append((time.monotonic(), self._parse(record.value)))
        finally:
            await consumer.stop()

    def ids(self) -> set[str]:
        return {frame_id for _, frame_id in self.arrivals}

    def unique(self) -> int:
        return len(self.ids())

    def stop(self) -> None:
        self._stop.set()


async def _until(predicate, workers: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for worker in workers:
            if worker.poll() not in (None, 0):
                raise RuntimeError(f"a worker exited with {worker.returncode}: "
                                   f"{Path(worker.log_path).read_text()[-2000:]}")  # noqa: ASYNC240
        if time.monotonic() > deadline:
            raise TimeoutError("the workers did not score every frame in time")
        await asyncio.sleep(0.05)


def _stop(workers: list[subprocess.Popen]) -> None:
    stop_children(workers, 60.0, group=False)


async def _drain(settings: Settings, frames, cores: list[int], encoder: str | None) -> float:
    """Frames/s of `len(cores)` pinned workers draining a backlog: first verdict to last. The backlog is
    published once every worker is up and the group has split the partitions between them, so that the
    figure is the workers' speed, not how far apart they finished loading their models."""
    log = VerdictLog(settings)
    reader = asyncio.create_task(log.run())
    workers = [_worker(settings, core, f"scale-{settings.topic_prefix}", encoder) for core in cores]
    try:
        await _until(lambda: _split(workers, spec(FRAMES).partitions), workers, 600)
        await _produce(settings, frames)
        await _until(lambda: log.unique() >= len(frames), workers, 600)
    finally:
        _stop(workers)
        log.stop()
        await reader
    first = min(t for t, _ in log.arrivals)
    last = max(t for t, _ in log.arrivals)
    return (len(frames) - 1) / max(last - first, 1e-6)


async def _cold_start(settings: Settings, frames, encoder: str | None, cache: bool) -> tuple[float, float]:
    """(seconds, CPU seconds) from a pinned worker's process start to its first verdict, a small backlog waiting
    for it on topics of its own; the CPU seconds (user + system, psutil) do not depend on what else the machine
    runs. `cache` False: `--no-start-cache`, the old path (every product calibrated at start)."""
    log = VerdictLog(settings)
    reader = asyncio.create_task(log.run())
    await _produce(settings, frames)
    worker = _worker(settings, 1, f"scale-{settings.topic_prefix}", encoder,
                     *([] if cache else ["--no-start-cache"]))
    try:
        await _until(lambda: log.unique() > 0, [worker], 600)
        times = psutil.Process(worker.pid).cpu_times()
    finally:
        _stop([worker])
        log.stop()
        await reader
    return round(min(t for t, _ in log.arrivals) - worker.started_at, 1), round(times.user + times.system, 1)


def _assigned(worker: subprocess.Popen) -> list[int]:
    """The partitions the group gave the worker last (its log says so); [] before its first assignment."""
    latest: list[int] = []
    for line in Path(worker.log_path).read_text().splitlines():  # noqa: ASYNC240 - a small local log
        if '"partitions_assigned"' in line:
            latest = json.loads(line[line.index("{"):])["partitions"]
    return latest


def _split(workers: list[subprocess.Popen], partitions: int) -> bool:
    """Whether every worker holds partitions, and together they hold each partition once."""
    held = [_assigned(worker) for worker in workers]
    return all(held) and sorted(p for mine in held for p in mine) == list(range(partitions))


async def _rebalance(settings: Settings, frames, rate: float, encoder: str | None, step: int = 80) -> dict:
    """A steady stream to one worker; a second is started, and once the group has given it partitions (its
    start-up, model loading included, is not a rebalance) both share the stream for `step` verdicts; then the
    first is stopped with SIGTERM, and the second goes on alone for `step` more."""
    log = VerdictLog(settings)
    reader = asyncio.create_task(log.run())
    group = f"scale-{settings.topic_prefix}"
    workers = [_worker(settings, 0, group, encoder)]
    sent: list[str] = []
    stop = asyncio.Event()
    producer = asyncio.create_task(_produce(settings, frames, rate=rate, until=stop, sent=sent))
    events = {}
    try:
        await _until(lambda: log.unique() >= step // 2, workers, 600)
        workers.append(_worker(settings, 1, group, encoder))              # joins mid-stream
        events["added_at_verdict"] = log.unique()
        await _until(lambda: bool(_assigned(workers[1])), workers, 600)
        events["joined_at_verdict"] = joined = log.unique()
        events["second_worker_join_s"] = round(time.monotonic() - workers[1].started_at, 1)
        await _until(lambda: log.unique() >= joined + step, workers, 600)
        events["stopped_at_verdict"] = stopped = log.unique()
        workers[0].send_signal(signal.SIGTERM)                             # leaves mid-stream, draining
        await _until(lambda: log.unique() >= stopped + step, workers[1:], 600)
        stop.set()
        await producer
        await _until(lambda: log.unique() >= len(set(sent)), workers[1:], 600)
        await asyncio.sleep(2.0)                                           # late duplicates, if any
        events["first_worker_exit"] = workers[0].wait(60)
    finally:
        stop.set()
        _stop(workers)
        log.stop()
        await reader
        with contextlib.suppress(Exception):
            await producer
    times = sorted(t for t, _ in log.arrivals)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    ids = set(sent)
    seen = [frame_id for _, frame_id in log.arrivals if frame_id in ids]
    return {"frames": len(ids), "rate_fps": round(rate, 1), "verdicts": len(seen),
            "lost_frames": len(ids - set(seen)), "duplicate_verdicts": len(seen) - len(set(seen)),
            "duplicates_after_dedupe": 0, "longest_pause_s": round(max(gaps, default=0.0), 2), **events}


def scale_benchmark(frames: int = 240, encoder: str | None = None, rebalances: int = 1) -> dict:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as state_dir:
        base = load_settings(state_dir=Path(state_dir), embedded_kafka_port=0, embedded_influx_port=0)
        from inference.references import ReferenceStore

        simulator = LineSimulator(seed=123)
        references = ReferenceStore.from_settings(base)
        for product in PRODUCTS:
            references.add_images(product, [(f"{product}-{i}.png", as_published(image, 90)) for i, image in
                                            enumerate(simulator.normal_references(product, REFERENCES))])
        with EmbeddedStack(base, with_influx=False) as stack:
            # six cameras, one per partition: with keys that share partitions, one worker would get every frame
            cameras = cameras_on_every_partition(spec(FRAMES).partitions)
            batch = _frames(frames, seed=7, cameras=cameras)
            one = asyncio.run(_drain(phase_settings(base, stack, "scale-one."), batch, [0], encoder))
            two = asyncio.run(_drain(phase_settings(base, stack, "scale-two."), batch, [0, 1], encoder))
            # the drains above stored every product's calibrated state in the shared store: a new worker loads
            # them; the baseline, in the same run, is the old path that calibrates at start
            cold = {name: asyncio.run(_cold_start(phase_settings(base, stack, f"scale-cold-{name}."),
                                                  batch[:8], encoder, cache=name == "cached"))
                    for name in ("baseline", "cached")}
            # the rebalance is where a frame could be lost or answered twice: run it `rebalances` times, each on
            # topics and a consumer group of its own
            runs = [asyncio.run(_rebalance(phase_settings(base, stack, f"scale-rebalance-{run}."),
                                           _frames(frames, seed=8 + run, cameras=cameras), 0.8 * one, encoder))
                    for run in range(rebalances)]
    one, two = round(one, 2), round(two, 2)
    return {"frames": frames, "encoder": encoder or "efficientnet-lite0", "taskset": bool(shutil.which("taskset")),
            "fps_1_worker": one, "fps_2_workers": two, "speedup_2_workers": round(two / one, 2),
            "cold_start_s": cold["cached"][0], "cold_start_baseline_s": cold["baseline"][0],
            "cold_start_cpu_s": cold["cached"][1], "cold_start_baseline_cpu_s": cold["baseline"][1],
            "rebalance": runs[0], "rebalances": runs, "minutes": round((time.perf_counter() - started) / 60, 1)}


def scale_section(result: dict | None = None, frames: int = 240) -> str:
    result = result or scale_benchmark(frames)
    r = result["rebalance"]
    met = "met" if result["speedup_2_workers"] >= 1.7 else "**missed**"
    return (
        "## Scale-out: workers pinned to cores (`lineguard bench scale`)\n\n"
        f"Machine: {machine()}. Whole section: {result['minutes']:.1f} min. Command: `lineguard bench scale "
        f"--frames {result['frames']} --rebalances {len(result.get('rebalances', [0]))} --write BENCHMARKS.md`. "
        f"Each worker is a `lineguard infer` process ({result['encoder']}, "
        "one torch thread) pinned with `taskset` to its own core, in one consumer group on the 6-partition "
        "frames topic of the embedded broker; references come from the shared artifact store. The frames come from "
        "six cameras, one per partition (frames are keyed by camera). Frames/s from the first verdict to the last "
        "of a backlog published once the workers hold the partitions; the baseline is one worker, measured in the "
        "same run.\n\n"
        "| workers | frames/s | ratio to 1 worker |\n|---|---|---|\n"
        f"| 1 (core 0) | {result['fps_1_worker']:.2f} | 1.00 |\n"
        f"| 2 (cores 0, 1) | {result['fps_2_workers']:.2f} | {result['speedup_2_workers']:.2f} |\n\n"
        f"Target `speedup_2_workers` ≥ 1.7: {met}.\n\n"
        f"Cold start, from a pinned worker's process start to its first verdict (a backlog of 8 frames waiting on "
        f"topics of its own): **{result['cold_start_s']} s** with the calibrated product states loaded from the "
        f"shared artifact store (stored there by the workers above); baseline, the old path measured in the same run "
        f"(`lineguard infer --no-start-cache`: every product calibrated at start): {result['cold_start_baseline_s']} s "
        f"(CPU time of the worker until then: {result['cold_start_cpu_s']} s against "
        f"{result['cold_start_baseline_cpu_s']} s; target < 20 s: "
        f"{'met' if result['cold_start_s'] < 20 else '**missed**'}).\n\n"
        f"Rebalance: frames published at {r['rate_fps']} frames/s (0.8x one worker's speed) to one worker; a second "
        f"was started after {r['added_at_verdict']} verdicts and was given partitions after "
        f"{r['joined_at_verdict']} ({r.get('second_worker_join_s', '?')} s after its start: the rebalance on join); "
        f"the first was stopped with SIGTERM after "
        f"{r['stopped_at_verdict']} (exit {r['first_worker_exit']}), and the stream ended after {r['frames']} frames. "
        f"Lost frames: {r['lost_frames']}; verdicts "
        f"re-sent for frames already answered: {r['duplicate_verdicts']} (0 after de-duplication by frame id); "
        f"longest pause between two verdicts: {r['longest_pause_s']} s.\n"
        + _rebalance_table(result.get("rebalances", [r])))


def _rebalance_table(runs: list[dict]) -> str:
    """Every rebalance run of the section, one row each: the first row is the run the paragraph above tells."""
    if len(runs) < 2:
        return ""
    rows = "".join(
        f"| {number} | {run['frames']} | {run['lost_frames']} | {run['duplicate_verdicts']} | "
        f"{run['duplicates_after_dedupe']} | {run.get('second_worker_join_s', '?')} | {run['longest_pause_s']} | "
        f"{run['first_worker_exit']} |\n" for number, run in enumerate(runs, 1))
    lost = sum(run["lost_frames"] for run in runs)
    dups = sum(run["duplicates_after_dedupe"] for run in runs)
    return (f"\nThe rebalance, run {len(runs)} times in this run (`--rebalances {len(runs)}`), each on topics and a "
            "consumer group of its own:\n\n"
            "| run | frames | lost | verdicts re-sent | duplicates after de-duplication | second worker: start → "
            "partitions (s) | longest pause (s) | first worker's exit |\n|---|---|---|---|---|---|---|---|\n"
            f"{rows}\nLost in all runs: {lost}; duplicates after de-duplication in all runs: {dups}.\n")
