"""Benchmarks that need the whole system, and `make bench`, which writes BENCHMARKS.md.

`stream_benchmark` runs, in one process and on a fresh embedded broker:
- fps_model_raw: the model alone, batched, on decoded frames (no Kafka, no JPEG);
- fps_model_single: the model alone, one frame per call: fps_model_raw / fps_model_single is what
  batching buys the model itself, the most that the pipeline can gain over the naive loop from it;
- fps_pipeline: the real worker (`InferenceWorker`) draining a backlog of N frames;
- fps_naive: a one-frame-at-a-time loop: fetch one, decode, score, publish, wait for the ack, commit;
- p50_ms / p99_ms: produce → verdict received, at half the measured pipeline capacity;
- lost_frames / duplicate_verdicts: frames without a verdict, and extra verdicts, in the latency phase.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from bench.report import machine
from inference.model.api import MODEL_VERSION
from inference.outputs import heatmap_png
from inference.worker import FrameInput, InferenceWorker, WorkerConfig, _set_torch_threads
from ingest.publisher import as_published, encode_jpeg
from ingest.simulator import PRODUCTS, LineSimulator
from lineguard.events import FrameMeta, Heatmap, Verdict, decode_frame, encode_frame
from lineguard.kafka import ensure_topics, make_consumer, make_producer, start_client
from lineguard.logging import get_logger
from lineguard.settings import Settings, load_settings
from lineguard.stack import EmbeddedStack
from lineguard.topics import FRAMES, HEATMAPS, VERDICTS

log = get_logger(__name__)

REFERENCE_SHOTS = 8


# --- the stream benchmark -----------------------------------------------------------------------------

def cameras_on_every_partition(partitions: int) -> list[str]:
    """One camera id per partition: frames are keyed by camera, and the producer's default partitioner
    (murmur2, as Kafka's Java client) sends each of these cameras' frames to a partition of its own."""
    from aiokafka.partitioner import DefaultPartitioner

    partitioner, ids = DefaultPartitioner(), list(range(partitions))
    chosen: dict[int, str] = {}
    for i in range(100 * partitions):
        chosen.setdefault(partitioner(f"cam-{i}".encode(), ids, ids), f"cam-{i}")
        if len(chosen) == partitions:
            return [chosen[p] for p in ids]
    raise RuntimeError(f"no camera ids found for all {partitions} partitions")


def _frames(n: int, seed: int = 0, frame_size: tuple[int, int] | None = None,
            unique: int = 16, cameras: list[str] | None = None) -> list[tuple[FrameMeta, bytes, np.ndarray]]:
    """n simulated parts as (meta, JPEG, decoded image), round-robin over `cameras` (default cam-0..3). With
    frame_size = (W, H), each part is rendered at 256 px and resized to W x H, and `unique` of them are
    cycled (a 20 MP image is 60 MB decoded)."""
    cameras = cameras or [f"cam-{i}" for i in range(4)]
    simulator = LineSimulator(defect_rate=0.2, seed=seed)
    frames, pool = [], []
    for i in range(n):
        if frame_size is None or len(pool) < unique:
            part = simulator.part(i)
            image = part.image if frame_size is None else cv2.resize(part.image, frame_size,
                                                                       interpolation=cv2.INTER_LINEAR)
            jpeg, width, height = encode_jpeg(image, 90)
            mm_per_px = simulator.mm_per_px * part.image.shape[1] / width
            pool.append((part.product, jpeg, width, height, mm_per_px, image))
        product, jpeg, width, height, mm_per_px, image = pool[i % len(pool)] if frame_size else pool[-1]
        camera = cameras[i % len(cameras)]
        meta = FrameMeta(frame_id=f"bench.{seed}.{i:06d}", line_id="bench", camera_id=camera, product=product,
                         seq=i // len(cameras), width=width, height=height, source="simulator", mm_per_px=mm_per_px)
        frames.append((meta, jpeg, image))
    return frames


async def _produce(settings: Settings, frames, rate: float | None = None, until: asyncio.Event | None = None,
                   sent: list[str] | None = None) -> None:
    """Publish `frames` (at `rate` frames/s, or at once). With `until`, cycle them under fresh frame ids until
    it is set; `sent` collects the frame ids published."""
    producer = await start_client(settings, make_producer(settings))
    try:
        started, index, futures = time.monotonic(), 0, []
        while (index < len(frames)) if until is None else not until.is_set():
            if rate:
                delay = started + index / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            meta, jpeg, _ = frames[index % len(frames)]
            update = {"captured_at": datetime.now(UTC)}
            if until is not None:
                update |= {"frame_id": f"{meta.frame_id}.{index}", "seq": index}
            meta = meta.model_copy(update=update)
            value, headers = encode_frame(meta, jpeg)
            futures.append(await producer.send(settings.topic(FRAMES), value, key=meta.camera_id.encode(),
                                               headers=headers))
            if sent is not None:
                sent.append(meta.frame_id)
            index += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def phase_settings(base: Settings, stack: EmbeddedStack, prefix: str) -> Settings:
    """Settings of one benchmark phase: the running embedded broker, topics of its own (created)."""
    settings = base.model_copy(update={"kafka_bootstrap": stack.kafka_bootstrap, "topic_prefix": prefix})
    asyncio.run(ensure_topics(settings))
    return settings


def model_raw_fps(model, frames, batch: int, torch_threads: int | None = None) -> float:
    """The model alone, in this thread (torch's own thread count), or in a fresh thread on `torch_threads`."""
    if torch_threads is not None:
        with ThreadPoolExecutor(1, initializer=_set_torch_threads, initargs=(torch_threads,)) as pool:
            return pool.submit(model_raw_fps, model, frames, batch).result()
    inputs = [FrameInput(image, meta.product, meta.mm_per_px) for meta, _, image in frames]
    model.score(inputs[:batch])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(inputs), batch):
        model.score(inputs[start:start + batch])
    return len(inputs) / (time.perf_counter() - started)


async def pipeline_fps(settings: Settings, model, frames, max_batch: int, **config) -> tuple[float, float]:
    """The real worker draining a backlog: time from joining the group to the last frame's acknowledged outputs.
    Returns (frames/s, mean frames per model call). `config`: more WorkerConfig fields."""
    await _produce(settings, frames)
    config = {"model_threads": 0} | config     # as `lineguard infer`: the model threads measured at start-up
    worker = InferenceWorker(settings, model, WorkerConfig(max_batch=max_batch, max_wait_ms=20, explain=False,
                                                           **config))
    task = asyncio.create_task(worker.run())
    while not worker.ready:  # joined the group: the backlog is there to fetch
        _check_running(task)
        await asyncio.sleep(0.005)
    started = time.perf_counter()
    while worker.metrics.frames_total() + worker.metrics.dead_letters_total() < len(frames):
        _check_running(task)
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    worker.stop()
    await task
    if worker.metrics.dead_letters_total():
        raise RuntimeError(f"{int(worker.metrics.dead_letters_total())} benchmark frames were dead-lettered")
    return len(frames) / elapsed, worker.metrics.mean_model_batch()


def _check_running(task: asyncio.Task) -> None:
    """Raise the worker's error, or say it stopped, instead of waiting for frames that cannot come."""
    if task.done():
        task.result()
        raise RuntimeError("the worker stopped before the benchmark's frames were scored")


async def naive_fps(settings: Settings, model, frames) -> float:
    """One frame at a time: getone → decode → score → publish verdict + heatmap → wait → commit."""
    await _produce(settings, frames)
    consumer = make_consumer(settings, FRAMES, group_id="naive", max_poll_records=1)
    producer = make_producer(settings)
    await start_client(settings, consumer)
    await start_client(settings, producer)
    done = 0
    started = time.perf_counter()  # joined the group, as the pipeline's clock
    try:
        while done < len(frames):
            record = await consumer.getone()
            meta, jpeg = decode_frame(record.value, record.headers)
            image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            scored = model.score([FrameInput(image, meta.product, meta.mm_per_px)])[0]
            verdict = Verdict(frame_id=meta.frame_id, line_id=meta.line_id, camera_id=meta.camera_id,
                              product=meta.product, captured_at=meta.captured_at, score=scored.score,
                              threshold=scored.threshold, is_anomalous=scored.is_anomalous,
                              confidence=scored.confidence, regions=scored.regions, positions=scored.positions,
                              model_version=model.version)
            heatmap = Heatmap(frame_id=meta.frame_id, camera_id=meta.camera_id, product=meta.product,
                              width=meta.width, height=meta.height,
                              map_png=heatmap_png(scored.anomaly_map, scored.threshold))
            key = meta.camera_id.encode()
            await producer.send_and_wait(settings.topic(VERDICTS), verdict.to_bytes(), key=key)
            await producer.send_and_wait(settings.topic(HEATMAPS), heatmap.to_bytes(), key=key)
            await consumer.commit()
            done += 1
    finally:
        await consumer.stop()
        await producer.stop()
    return done / (time.perf_counter() - started)


async def latency_at_load(settings: Settings, model, frames, rate: float, max_batch: int) -> dict:
    """Offer `rate` frames/s to a running worker; measure produce → verdict received per frame."""
    worker = InferenceWorker(settings, model, WorkerConfig(max_batch=max_batch, max_wait_ms=20, explain=False))
    task = asyncio.create_task(worker.run())
    consumer = make_consumer(settings, VERDICTS, group_id=None, auto_offset_reset="earliest")
    await start_client(settings, consumer)
    while not worker.ready:
        await asyncio.sleep(0.05)
    producing = asyncio.create_task(_produce(settings, frames, rate=rate))
    latencies: dict[str, float] = {}
    records = 0
    deadline = time.monotonic() + len(frames) / rate + 60
    try:
        while len(latencies) < len(frames) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=100)
            received = datetime.now(UTC)
            for batch in batches.values():
                for record in batch:
                    verdict = Verdict.from_bytes(record.value)
                    records += 1
                    latencies.setdefault(verdict.frame_id, (received - verdict.captured_at).total_seconds() * 1000)
        await producing
    finally:
        await consumer.stop()
        worker.stop()
        await task
    values = np.array(sorted(latencies.values())) if latencies else np.array([float("nan")])
    return {"p50_ms": round(float(np.percentile(values, 50)), 1), "p99_ms": round(float(np.percentile(values, 99)), 1),
            "lost_frames": len(frames) - len(latencies), "duplicate_verdicts": records - len(latencies),
            "offered_fps": round(rate, 2)}


def _bench_model(encoder: str | None, device: str, max_batch: int, tiles: str | None = None,
                 shots: int = REFERENCE_SHOTS):
    from inference.scorer import build_scorer

    model = build_scorer(encoder=encoder, device=device, text=False, batch_size=max_batch)
    _set_bench_references(model, tiles, shots)
    return model


def _set_bench_references(model, tiles: str | None, shots: int = REFERENCE_SHOTS) -> None:
    from inference.model.tiles import NO_TILES, Tiling

    simulator = LineSimulator(seed=123)
    tiling = Tiling.parse(tiles) if tiles else NO_TILES
    for product in PRODUCTS:
        model.set_references(product, [as_published(image, 90)
                                       for image in simulator.normal_references(product, shots)], tiling=tiling)


def stream_benchmark(frames: int = 400, max_batch: int = 16, encoder: str | None = None,
                     device: str = "auto", naive_frames: int | None = None,
                     frame_size: tuple[int, int] | None = None, tiles: str | None = None) -> dict:
    model = _bench_model(encoder, device, max_batch, tiles)
    batch_frames = _frames(frames, seed=1, frame_size=frame_size)
    naive_frames = _frames(naive_frames or max(16, frames // 4), seed=2, frame_size=frame_size)
    with tempfile.TemporaryDirectory() as state_dir:
        base = load_settings(state_dir=Path(state_dir), embedded_kafka_port=0, embedded_influx_port=0)
        with EmbeddedStack(base, with_influx=False) as stack:
            def phase(name: str) -> Settings:
                return phase_settings(base, stack, f"bench-{name}.")

            # the model alone before and after the Kafka phases (this shared machine's speed drifts)
            fps_raw = [model_raw_fps(model, batch_frames, max_batch)]
            fps_single = [model_raw_fps(model, naive_frames, 1)]
            fps_pipeline, mean_batch = asyncio.run(pipeline_fps(phase("pipeline"), model, batch_frames, max_batch))
            fps_naive = asyncio.run(naive_fps(phase("naive"), model, naive_frames))
            fps_single.append(model_raw_fps(model, naive_frames, 1))
            fps_raw.append(model_raw_fps(model, batch_frames, max_batch))
            fps_one_core = model_raw_fps(model, batch_frames, max_batch, torch_threads=1)
            latency_frames = _frames(max(32, min(frames, int(fps_pipeline * 20))), seed=3, frame_size=frame_size)
            latency = asyncio.run(latency_at_load(phase("latency"), model, latency_frames, fps_pipeline / 2,
                                                  max_batch))
    # the ratios are of the figures as printed, so a reader (or a test) recomputing one gets the same number
    raw, single = round(float(np.mean(fps_raw)), 2), round(float(np.mean(fps_single)), 2)
    fps_pipeline, fps_naive = round(fps_pipeline, 2), round(fps_naive, 2)
    return {
        "frames": frames, "naive_frames": len(naive_frames), "max_batch": max_batch,
        "encoder": encoder or "efficientnet-lite0",
        "frame_size": "256x256" if frame_size is None else f"{frame_size[0]}x{frame_size[1]}", "tiles": tiles or "1x1",
        "device": str(model.device), "fps_model_raw": raw,
        "fps_model_single": single, "model_batching_gain": round(raw / single, 2),
        "fps_model_raw_runs": [round(f, 2) for f in fps_raw],
        "fps_model_one_core": round(fps_one_core, 2),
        "fps_model_single_runs": [round(f, 2) for f in fps_single],
        "fps_pipeline": fps_pipeline, "pipeline_mean_batch": round(mean_batch, 1),
        "fps_naive": fps_naive, "pipeline_vs_raw": round(fps_pipeline / raw, 3),
        "pipeline_vs_naive": round(fps_pipeline / fps_naive, 2) if fps_naive else None, **latency,
    }


# --- camera resolutions ----------------------------------------------------------------------------------

RESOLUTIONS = ((512, 512), (2448, 2048), (5472, 3648))
RESOLUTION_TILES = "2x2"


def resolution_benchmark(frames: int = 64, max_batch: int = 16, encoder: str | None = None, device: str = "auto",
                         sizes=RESOLUTIONS, tiles: str = RESOLUTION_TILES, echo=print) -> dict:
    """The worker draining a backlog of frames at each camera resolution: frames/s and ms per frame, whole
    frames and in tiles, and, as the baseline, whole frames decoded at full size (the policy before)."""
    model = _bench_model(encoder, device, max_batch, shots=4)
    runs = []
    with tempfile.TemporaryDirectory() as state_dir:
        base = load_settings(state_dir=Path(state_dir), embedded_kafka_port=0, embedded_influx_port=0)
        with EmbeddedStack(base, with_influx=False) as stack:
            for mode, tiling, reduced in (("full decode (before)", None, False), ("model resolution", None, True),
                                          (f"tiles {tiles}", tiles, True)):
                if tiling is not None:
                    _set_bench_references(model, tiling, shots=4)
                for width, height in sizes:
                    batch = _frames(frames, seed=7, frame_size=(width, height))
                    settings = phase_settings(base, stack, f"bench-res-{len(runs)}.")
                    fps, _ = asyncio.run(pipeline_fps(settings, model, batch, max_batch, reduced_decode=reduced))
                    run = {"mode": mode, "frame_size": f"{width}x{height}",
                           "megapixels": round(width * height / 1e6, 1),
                           "jpeg_kb": round(np.mean([len(jpeg) for _, jpeg, _ in batch[:16]]) / 1024),
                           "fps": round(fps, 2), "ms_per_frame": round(1000 / fps, 1), "frames": frames}
                    echo(json.dumps(run))
                    runs.append(run)
    for run in runs:
        first = next(r for r in runs if r["mode"] == run["mode"])
        run["vs_512"] = round(run["ms_per_frame"] / first["ms_per_frame"], 2)
    return {"encoder": encoder or "efficientnet-lite0", "device": str(model.device), "max_batch": max_batch,
            "runs": runs}


def resolution_section(result: dict | None = None, frames: int = 64, echo=print) -> str:
    started = time.perf_counter()
    result = result or resolution_benchmark(frames=frames, echo=echo)
    minutes = (time.perf_counter() - started) / 60
    runs = result["runs"]
    lines = [
        "## Camera resolutions (`lineguard bench resolution`)",
        "",
        f"Command: `lineguard bench resolution --frames {frames}` (one run: `lineguard bench stream --frame-size "
        "WxH [--tiles 2x2]`)  ",
        f"Machine: {machine()}. Encoder {result['encoder']} on {result['device']}, max batch {result['max_batch']}, "
        f"{frames} frames per row: simulated parts rendered at 256 px, resized to the frame size and JPEG-encoded "
        "(quality 90), drained from a backlog on the embedded broker by the real worker. Whole section: "
        f"{minutes:.1f} min.",
        "",
        "| mode | frame | JPEG | frames/s | ms per frame | × the 512 px cost (same mode) | "
        "× the full-decode cost (same size) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        before = next(r for r in runs if r["mode"].startswith("full decode") and r["frame_size"] == run["frame_size"])
        lines.append(f"| {run['mode']} | {run['frame_size']} ({run['megapixels']} MP) | {run['jpeg_kb']} kB | "
                     f"{run['fps']} | {run['ms_per_frame']} | {run['vs_512']} | "
                     f"{run['ms_per_frame'] / before['ms_per_frame']:.2f} |")
    model_runs = {r["frame_size"]: r for r in runs if r["mode"] == "model resolution"}
    targets = [("5 MP", "2448x2048", 1.2), ("20 MP", "5472x3648", 1.5)]
    lines += ["", "| target (model resolution) | measured | met |", "|---|---|---|"]
    for label, size, limit in targets:
        if size in model_runs:
            value = model_runs[size]["vs_512"]
            lines.append(f"| cost at {label} ≤ {limit} × the cost at 512 px | {value} × | "
                         f"{'yes' if value <= limit else 'no'} |")
    lines += ["", "Every row drained all its frames with a verdict each (a dead-lettered frame fails the run): "
              "lost frames 0. \"Model resolution\" decodes at libjpeg's largest DCT scale-down (1/2, 1/4, 1/8) "
              "that keeps the encoder's input; \"full decode\" is the same worker with that turned off "
              "(`WorkerConfig(reduced_decode=False)`: the whole JPEG decoded, then shrunk to the encoder's input). "
              "In every row the map, the regions and positions are computed at model resolution; before, they "
              "were computed at frame resolution too, which the issue measured at 2.0x (5 MP) and 6.5x (20 MP) "
              "the 512 px cost of `InspectionModel.score` alone."]
    return "\n".join(lines)


# --- the GPU section -----------------------------------------------------------------------------------

GPU_ENCODER = "random:vit-h-14"
GPU_BATCH = 32


def _gpu_model_speed(device: str, encoders: list[str], frames: list, batch: int) -> tuple[list[str], dict]:
    """Scoring speed and peak GPU memory per encoder; the LLM's follow-up cost on the first encoder's flags."""
    import torch

    from bench.model import scoring_speed, text_speed
    from inference.scorer import build_scorer

    simulator = LineSimulator(seed=123)
    inputs = [FrameInput(image, meta.product, meta.mm_per_px) for meta, _, image in frames]
    rows, text = [], {}
    for encoder in encoders:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build_scorer(encoder=encoder, device=device, batch_size=batch)
        for product in PRODUCTS:
            model.set_references(product, [as_published(image, 90)
                                           for image in simulator.normal_references(product, REFERENCE_SHOTS)])
        batched, single, scored = scoring_speed(model, inputs)
        memory = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                  if model.device.type == "cuda" else "n/a (CPU)")
        rows.append(f"| scoring, batched (batch {batch}, {len(inputs)} simulated 256 px frames, {encoder}, "
                    f"{model.device} {str(model.dtype).replace('torch.', '')}; best of 3 interleaved runs) | "
                    f"{batched:.1f} images/s | {single:.1f} images/s one frame per call | "
                    f"{batched / single:.2f}x | {memory} |")
        if not text:
            flagged = [s for s in scored if s.verdict.is_anomalous][:8]
            if flagged:
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                try:
                    text = text_speed(model, flagged)
                except FileNotFoundError as exc:  # no LLM installed: the scoring figures still stand
                    log.warning("text_benchmark_skipped", reason=str(exc))
                    text = {"skipped": str(exc)}
                    continue
                text["memory"] = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                                  if model.device.type == "cuda" else "n/a (CPU)")
        del model
    return rows, text


def gpu_section(device: str = "cuda", encoder: str = GPU_ENCODER, frames: int = 2000, batch: int = GPU_BATCH,
                echo=print) -> str:
    """The model and the stream on a GPU: scoring speed of a ViT-H/14-size encoder (random weights: the
    speed is real, the verdicts are not) and of the default lite0, the LLM's cost there, and the stream
    benchmark with the ViT-H-size encoder."""
    from bench.model import FOLLOW_UP, text_rows

    started = time.perf_counter()
    speed_frames = _frames(256, seed=4)
    speed_rows, text = _gpu_model_speed(device, [encoder, "efficientnet-lite0"], speed_frames, batch)
    echo("\n".join(speed_rows))
    stream = stream_benchmark(frames=frames, max_batch=batch, encoder=encoder, device=device,
                              naive_frames=max(32, frames // 8))
    echo(json.dumps(stream))
    minutes = (time.perf_counter() - started) / 60
    command = f"lineguard bench gpu --device {device} --encoder {encoder} --frames {frames} --batch {batch}"
    lines = [
        "## GPU (`lineguard bench gpu`)",
        "",
        f"Command: `{command}` (`make bench` runs it only on a machine with a CUDA device and otherwise keeps "
        "this section as it is)  ",
        f"Machine: {machine()}. Model {MODEL_VERSION}, {datetime.now(UTC):%Y-%m-%d}. "
        f"Whole section: {minutes:.1f} min.  ",
        (f"`{encoder}` is a vision tower of ViT-H/14's size (32 layers, width 1280, patch 14, 224 px) with random "
         "weights: its speed and memory are real, its verdicts are not. " if encoder == GPU_ENCODER else "")
        + "Frames are the simulator's parts (the MVTec data stays on the development machine).",
        "",
        "### Model",
        "",
        "| figure | value | baseline (same run) | ratio | peak GPU memory |",
        "|---|---|---|---|---|",
        *speed_rows,
    ]
    if text.get("skipped"):
        lines += ["", f"Text generation not measured: {text['skipped']}."]
    elif text:
        lines += ["", "| text | value | baseline (same run) | ratio |", "|---|---|---|---|",
                  *text_rows(text, f"{device}, peak {text['memory']}"), "",
                  f"Example follow-up: *{FOLLOW_UP}* → \"{text['example']}\""]
    lines += ["", stream_section(stream, f"lineguard bench stream --frames {frames} --max-batch {batch} "
                                         f"--encoder {encoder} --device {device} --json",
                                 title=f"### Streaming pipeline, {encoder}")]
    return "\n".join(lines)




# --- BENCHMARKS.md -------------------------------------------------------------------------------------

FAST_ENCODER = "random:vit-tiny"


def fast_model_rows(fast: dict, command: str) -> list[str]:
    """The same benchmark with a model too small to be the bottleneck: what the pipeline itself buys."""
    return [
        f"Same benchmark, model not the bottleneck (`{command}`: a tiny random ViT, verdicts meaningless, "
        "speed real):",
        "",
        "| fps_model_single | fps_model_raw | fps_pipeline | fps_naive | pipeline / naive | lost frames |",
        "|---|---|---|---|---|---|",
        f"| {fast['fps_model_single']} | {fast['fps_model_raw']} | {fast['fps_pipeline']} | {fast['fps_naive']} | "
        f"{fast['pipeline_vs_naive']} | {fast['lost_frames']} |",
        "",
        f"Here the naive loop reaches {fast['fps_naive'] / fast['fps_model_single']:.2f} × the model's one-frame "
        "speed: the rest goes to Kafka round trips (a fetch, two acknowledged sends and a commit per frame), "
        "which the pipeline batches and overlaps with scoring.",
        "",
        f"Pipeline overhead per frame, 1 / fps_pipeline − 1 / fps_model_raw: **{overhead_ms(fast):.2f} ms** "
        f"(target ≤ 1.0 ms: {'meets' if overhead_ms(fast) <= 1.0 else 'misses'}). The worker measures at start-up "
        "which model threading scores fastest (`WorkerConfig.model_threads` 0, the `lineguard infer` default): "
        "this tiny ViT spends its time in Python, so one call at a time on one torch thread wins, and the worker "
        "then scores in a process of its own (inference/model_process.py), where the pipeline's Python (the Kafka "
        "client, decoding, serialising) no longer takes turns with the model for the GIL.",
        "",
        f"Against the model alone on one torch thread in one thread ({fast['fps_model_one_core']} frames/s, the "
        f"child's own setting, same run), the overhead is "
        f"{1000 * (1 / fast['fps_pipeline'] - 1 / fast['fps_model_one_core']):.2f} ms per frame.",
        "",
    ]


def overhead_ms(result: dict) -> float:
    """What the pipeline adds to each frame beyond the model alone, in ms."""
    return 1000 * (1 / result["fps_pipeline"] - 1 / result["fps_model_raw"])


def stream_section(result: dict, command: str, fast: dict | None = None, fast_command: str = "",
                   title: str = "## Streaming pipeline (`lineguard bench stream`)") -> str:
    gpu = result["device"].startswith("cuda")
    raw_target = 0.8 if gpu else 0.6
    ok_raw = "meets" if result["pipeline_vs_raw"] >= raw_target else "misses"
    ok_naive = "meets" if (result["pipeline_vs_naive"] or 0) >= 3 else "misses"
    return "\n".join([
        title,
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Encoder: {result['encoder']} on {result['device']}, max batch {result['max_batch']}, "
        f"{result['frames']} frames per phase ({result['naive_frames']} in the naive loop), simulated 256 px parts, "
        "embedded Tansu broker on loopback.",
        "",
        "| figure | value | ratio |",
        "|---|---|---|",
        f"| fps_model_raw (model alone, batched, no Kafka; mean of runs before and after the Kafka phases: "
        f"{result['fps_model_raw_runs']}) | {result['fps_model_raw']} | baseline |",
        f"| fps_pipeline (the worker, from Kafka to acknowledged verdict + heatmap; "
        f"{result.get('pipeline_mean_batch', '?')} frames per model call on average) | {result['fps_pipeline']} | "
        f"{result['pipeline_vs_raw']} × raw (target ≥ {raw_target} on {'GPU' if gpu else 'CPU'}: {ok_raw}) |",
        f"| fps_naive (one frame at a time, ack and commit each) | {result['fps_naive']} | pipeline = "
        f"{result['pipeline_vs_naive']} × naive (target ≥ 3: {ok_naive}) |",
        f"| fps_model_single (model alone, one frame per call, no Kafka; runs {result['fps_model_single_runs']}) | "
        f"{result['fps_model_single']} | "
        f"raw = {result['model_batching_gain']} × single: what batching buys the model itself |",
        f"| p50 / p99 produce → verdict received, at {result['offered_fps']} frames/s offered (½ capacity) | "
        f"{result['p50_ms']} / {result['p99_ms']} ms | |",
        f"| lost frames / duplicate verdicts | {result['lost_frames']} / {result['duplicate_verdicts']} | |",
        "",
        _naive_sentence(result),
        "",
        *(fast_model_rows(fast, fast_command) if fast else []),
    ])


def _naive_sentence(result: dict) -> str:
    share = result["fps_naive"] / result["fps_model_single"]
    if share >= 0.7:
        return (f"The naive loop runs at {share:.2f} × the model's own one-frame speed, so Kafka, decoding and acks "
                "cost it little: the pipeline's lead over it can only come from what batching buys the model "
                f"({result['model_batching_gain']} × here) and from overlapping decode and publish with scoring."
                + _cap_sentence(result))
    return (f"The naive loop runs at {share:.2f} × the model's own one-frame speed: Kafka round trips (a fetch, two "
            "acknowledged sends and a commit per frame) dominate it. The pipeline batches and overlaps them with "
            f"scoring, and batching buys the model itself {result['model_batching_gain']} ×.")


def _cap_sentence(result: dict) -> str:
    """Why pipeline/naive stays below 3 where the model gains nothing from batching (a CPU)."""
    if (result["pipeline_vs_naive"] or 0) >= 3:
        return ""
    cap = result["fps_model_raw"] / result["fps_naive"]
    return (f" The pipeline runs at {result['pipeline_vs_raw']} × the model alone, so its lead over the naive loop "
            f"is capped at raw / naive = {cap:.2f} here; the ≥ 3 target needs a model that batching speeds up "
            "≥ 3× itself, as on a GPU (see the GPU section).")
