"""The model in a process of its own (inference/model_process.py): the same results as in-process, the parent's
product states followed call by call, errors raised again, a dead child reported; and the worker running on it
against the real broker."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from inference import frames
from inference.model.api import InspectionModel, ModelConfig
from inference.model.encoders import EncoderConfig
from inference.model_process import ModelProcess, ModelProcessDied
from inference.references import ensure_simulator_references
from inference.worker import FrameInput, InferenceWorker, ModelBroken, WorkerConfig
from ingest.publisher import as_published, publish
from ingest.simulator import LineSimulator
from ingest.sources import open_source
from lineguard.events import decode_frame
from lineguard.stack import free_port
from lineguard.topics import FRAMES
from tests.helpers import read_topic
from tests.storage_helpers import migrated
from tests.test_worker import Outputs
from tests.worker_helpers import group, healthy, worker_env


@pytest.fixture(scope="module")
def tiny():
    """A tiny random ViT (its time is in Python: the case the model process is for), 2 references a product."""
    model = InspectionModel(ModelConfig(encoder=EncoderConfig.parse("random:vit-tiny"), device="cpu"))
    simulator = LineSimulator(seed=5)
    for product in ("disc", "tile"):
        model.set_references(product, [as_published(image, 90) for image in simulator.normal_references(product, 2)])
    return model


def _frames(n: int, seed: int) -> list[FrameInput]:
    simulator = LineSimulator(seed=seed, defect_rate=0.5)
    return [FrameInput(part.image, part.product) for part in (simulator.part(i) for i in range(n))]


def _same(ours, theirs) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-6) and a.is_anomalous == b.is_anomalous
        assert a.threshold == b.threshold and [r.model_dump() for r in a.regions] == [r.model_dump() for r in b.regions]
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)


def test_the_model_process_scores_what_the_model_scores_and_follows_its_states(tiny):
    batch = _frames(6, seed=1)
    assert ModelProcess.supports(tiny) and not ModelProcess.supports(object())   # a stand-in scorer stays in-process
    scoring = ModelProcess(tiny, torch_threads=1)
    live = dict(tiny.states)
    try:
        _same(scoring.score(batch), tiny.score(batch))
        before = [s.score for s in scoring.score(batch)]
        # new references in the parent: the next call scores with them
        tiny.set_references("disc", [as_published(image, 90) for image in LineSimulator(seed=9).normal_references(
            "disc", 1)])
        after = scoring.score(batch)
        _same(after, tiny.score(batch))
        assert [s.score for s in after] != before
        # a product the parent dropped is unknown to the child too, with the model's own error
        del tiny.states["tile"]
        with pytest.raises(KeyError, match="tile"):
            scoring.score(batch)
        assert len(scoring.score([f for f in batch if f.product == "disc"])) == sum(f.product == "disc" for f in batch)
        # killed (out of memory, say): every call says so
        scoring._process.kill()
        scoring._process.join(5)
        with pytest.raises(ModelProcessDied, match="gone"):
            scoring.score(batch)
    finally:
        tiny.states.clear()
        tiny.states.update(live)
        scoring.close()


def test_the_worker_scores_in_a_model_process_and_stops_when_it_dies(settings, tiny):
    """Every frame gets the verdict the in-process model gives its decoded image; a killed model process stops
    the worker (ModelBroken) rather than dead-lettering the line."""
    n = 24

    async def run() -> tuple[InferenceWorker, BaseException | None]:
        await publish(open_source("simulator", defect_rate=0.5, seed=3), settings, cameras=2, limit=n)
        worker = InferenceWorker(settings, tiny, WorkerConfig(max_batch=8, max_wait_ms=30, explain=False,
                                                               group_id=group(settings), model_process=True))
        task = asyncio.create_task(worker.run())
        while worker.metrics.frames_total() < n and not task.done():
            await asyncio.sleep(0.1)
        assert worker.scoring is not tiny and worker.scoring.pid is not None
        worker.scoring._process.kill()
        await publish(open_source("simulator", defect_rate=0.5, seed=4), settings, cameras=2, limit=8)
        try:
            await asyncio.wait_for(task, 60)
        except ModelBroken as exc:
            return worker, exc
        return worker, None

    worker, error = asyncio.run(run())
    assert isinstance(error, ModelBroken) and "model process" in str(error)
    verdicts = {frame_id: found[0] for frame_id, found in Outputs(settings).read(expect=n).verdicts.items()}
    records = asyncio.run(read_topic(settings, FRAMES, idle_s=1, timeout_s=30))[:n]
    inputs, ids = [], []
    for record in records:
        meta, jpeg = decode_frame(record.value, record.headers)
        size = frames.frame_size(jpeg)
        image = frames.decode(record.value, meta, size, tiny.needed_pixels(meta.product))
        inputs.append(FrameInput(image, meta.product, meta.mm_per_px, size))
        ids.append(meta.frame_id)
    assert set(ids) <= set(verdicts) and len(verdicts) == n
    for frame_id, expected in zip(ids, tiny.score(inputs), strict=True):
        assert verdicts[frame_id].score == pytest.approx(expected.score, abs=1e-5)
        assert verdicts[frame_id].is_anomalous == expected.is_anomalous


def test_lineguard_infer_scores_in_a_model_process_and_takes_it_down_on_sigterm(settings, tmp_path):
    """The command line (`python -m deploy infer --model-process`): the spawned child imports the parent's main
    module without running it, every frame gets a verdict, and SIGTERM leaves no child behind."""
    settings = settings.model_copy(update={"state_dir": tmp_path / "state"})
    migrated(settings)                      # `lineguard infer` opens the model registry: the schema comes first
    ensure_simulator_references(settings)
    port, n = free_port(), 12
    log_path = tmp_path / "infer.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "deploy", "infer", "--http-port", str(port), "--no-text",
                                   "--encoder", "random:vit-tiny", "--model-process", "--group-id", group(settings)],
                                  env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not healthy(port):
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.3)
        asyncio.run(publish(open_source("simulator", seed=8), settings, cameras=2, limit=n))
        assert len(Outputs(settings).read(expect=n).verdicts) == n
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    [used] = [e for e in events if e["event"] == "model_process_used"]
    assert code == 0 and not psutil.pid_exists(used["pid"])
