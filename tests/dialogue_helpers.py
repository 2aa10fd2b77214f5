"""Shared by the dialogue tests (API and console): a real line and a real dialogue service.

- `run_pipeline`: the real `InferenceWorker` (the test's model) and the real `Recorder` (SQLite + local
  artifacts), in one background thread with its own event loop, on the test's broker and topics;
- `publish_line_frames`: simulator frames onto the frames topic, as `lineguard ingest simulator` sends them;
- `serve`: the dialogue app under a real uvicorn on a free loopback port, with tokens for every role.

    with run_pipeline(settings, storage_settings, model) as line:
        publish_line_frames(settings, n=12, seed=1)
        line.wait_for_frames(12)
        with serve(settings, storage_settings, dialogue_settings_for(tmp_path)) as service:
            httpx.get(f"{service.base_url}/api/records", headers=service.headers("viewer"))
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dialogue.auth import token_hash
from dialogue.settings import DialogueSettings, load_dialogue_settings
from inference.worker import InferenceWorker, WorkerConfig
from ingest.publisher import publish
from ingest.sources import open_source
from lineguard.settings import Settings
from lineguard.stack import free_port
from storage.recorder import Recorder
from storage.records import RecordStore
from storage.settings import StorageSettings, load_storage_settings

# fixed test tokens, one per role (the token file holds only their SHA-256)
TOKENS = {"viewer": "viewer-token-0123456789abcdef", "operator": "operator-token-0123456789abcdef",
          "admin": "admin-token-0123456789abcdef"}
NAMES = {"viewer": "screen-1", "operator": "alice", "admin": "root"}
PRODUCT = "disc"


def dialogue_settings_for(folder: Path, **overrides) -> DialogueSettings:
    """Settings with a token file of TOKENS in `folder`; the template answerer unless `answerer=` says so."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dialogue-tokens.json"
    path.write_text(json.dumps({"tokens": [{"name": NAMES[role], "role": role, "sha256": token_hash(token)}
                                           for role, token in TOKENS.items()]}))
    values = {"tokens_file": path, "answerer": "template", "rate_limit_per_minute": 100_000,
              "rate_limit_burst": 10_000, "auth_failure_limit": 10_000} | overrides
    return load_dialogue_settings(**values)


def storage_settings_for(folder: Path) -> StorageSettings:
    """A records database (migrated, as `lineguard db upgrade` leaves it) and artifact store of the test's own,
    every normal frame sampled out."""
    from lineguard.db import upgrade

    upgrade(f"sqlite:///{folder / 'records.sqlite'}")
    return load_storage_settings(store_db_url=f"sqlite:///{folder / 'records.sqlite'}",
                                 store_artifacts=str(folder / "artifacts"), store_normal_sample_rate=0.0,
                                 store_group=f"store-{time.monotonic_ns()}", store_join_timeout_s=20.0)


def registry_line(stack, folder: Path, name: str):
    """Settings on the session stack with topics of their own, storage settings in `folder`, and the model
    registry on them: (settings, storage_settings, registry); close the registry."""
    from inference.registry import ModelRegistry
    from lineguard.artifacts import open_artifact_store
    from lineguard.kafka import ensure_topics
    from lineguard.settings import load_settings

    settings = load_settings(state_dir=folder / "state", kafka_bootstrap=stack.kafka_bootstrap,
                             influx_url=stack.influx_url, topic_prefix=f"{name}-{time.monotonic_ns()}.")
    asyncio.run(ensure_topics(settings))
    storage_settings = storage_settings_for(folder)
    registry = ModelRegistry(storage_settings.db_url(settings),
                             open_artifact_store(storage_settings.artifacts(settings)))
    return settings, storage_settings, registry


@dataclass
class Service:
    base_url: str
    tokens: dict[str, str] = field(default_factory=lambda: dict(TOKENS))
    app: object = None

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@contextlib.contextmanager
def serve(settings: Settings, storage_settings: StorageSettings, dialogue_settings: DialogueSettings, *,
          model=None, timeout_s: float = 30.0) -> Iterator[Service]:
    """The dialogue app under uvicorn in a thread, on a free 127.0.0.1 port; stopped on exit."""
    import uvicorn

    from dialogue.app import create_app
    from dialogue.limits import server_options

    app = create_app(settings, dialogue_settings, storage_settings, model=model)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, access_log=False, log_config=None,
                                           lifespan="on", **server_options(dialogue_settings)))
    thread = threading.Thread(target=server.run, name="dialogue", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the dialogue service did not start")
        time.sleep(0.05)
    broadcaster = app.state.service.broadcaster
    while not broadcaster.connected.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)   # the SSE consumer has its partitions: verdicts from now on reach the stream
    try:
        yield Service(f"http://127.0.0.1:{port}", app=app)
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        app.state.service.store.close()


class Pipeline:
    """The worker and the recorder, running in a background thread's event loop."""

    def __init__(self, settings: Settings, storage_settings: StorageSettings, model, worker_group: str,
                 registry=None, **worker_config):
        self.settings = settings
        self.storage_settings = storage_settings
        # the model arrives with its references: the worker gets an empty state dir of its own, so it does not
        # load (and calibrate again) references other tests registered in the session's state dir
        worker_settings = settings.model_copy(update={"state_dir": Path(tempfile.mkdtemp(prefix="worker-state-"))})
        self.worker = InferenceWorker(worker_settings, model,
                                      WorkerConfig(**({"max_batch": 8, "max_wait_ms": 30, "group_id": worker_group}
                                                     | worker_config)),
                                      registry=registry)
        self.recorder = Recorder(settings, storage_settings)
        self.store: RecordStore = self.recorder.store
        self.loop = asyncio.new_event_loop()
        self.stop_recorder: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pipeline", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.stop_recorder = asyncio.Event()
            await asyncio.gather(self.worker.run(), self.recorder.run(stop=self.stop_recorder))

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def start(self) -> Pipeline:
        self.thread.start()
        deadline = time.monotonic() + 90
        while not (self.worker.ready and self.recorder.consumer is not None):
            if self.error or time.monotonic() > deadline:
                raise RuntimeError(f"the pipeline did not start: {self.error}")
            time.sleep(0.1)
        time.sleep(1.0)   # both consumers have their partitions
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.worker.stop)
            self.loop.call_soon_threadsafe(self.stop_recorder.set)
            self.thread.join(90)
        self.store.close()

    def wait_for_frames(self, n: int, timeout_s: float = 180.0) -> None:
        """Until the recorder has counted n verdicts and stored every flagged record it has counted."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.error:
                raise RuntimeError(f"the pipeline failed: {self.error}")
            counts = self.store.counts()
            if counts["frames"] >= n and self.store.count(verdict="anomalous") >= counts["flagged"]:
                return
            time.sleep(0.2)
        raise TimeoutError(f"the recorder counted {self.store.counts()} of {n} frames in {timeout_s} s")


@contextlib.contextmanager
def run_pipeline(settings: Settings, storage_settings: StorageSettings, model, registry=None,
                 **worker_config) -> Iterator[Pipeline]:
    pipeline = Pipeline(settings, storage_settings, model, worker_group=f"inference-{settings.topic_prefix}",
                        registry=registry, **worker_config)
    try:
        yield pipeline.start()
    finally:
        pipeline.stop()


def small_model(product: str = PRODUCT, references: int = 2):
    """The default encoder (lite0, CPU) with 2 simulated references of one product and a shorter calibration
    (fewer re-shots and prototype steps): a quarter of the suite's two-product `model` fixture's start-up,
    and all the dialogue tests need (flagged frames with regions, descriptors, answers)."""
    from inference.model.api import InspectionModel, ModelConfig
    from ingest.publisher import as_published
    from ingest.simulator import LineSimulator

    model = InspectionModel(ModelConfig(device="cpu", n_jitter=4, prototype_views=8, prototype_steps=30))
    model.set_references(product, [as_published(image, 90)
                                   for image in LineSimulator().normal_references(product, references)])
    return model


def publish_line_frames(settings: Settings, n: int, *, seed: int = 0, defect_rate: float = 0.5, cameras: int = 2,
                        line_id: str | None = None, product: str = PRODUCT) -> None:
    """n simulator frames of `product` (calibrated cameras) onto the frames topic of `settings`."""
    if line_id is not None:
        settings = settings.model_copy(update={"line_id": line_id})
    asyncio.run(publish(open_source("simulator", product, defect_rate=defect_rate, seed=seed), settings,
                        cameras=cameras, limit=n))


def status_within(client, path: str, token: str | None, expected: int, timeout_s: float = 5.0,
                  interval_s: float = 0.1) -> tuple[int, float]:
    """GET `path` with `token` until it answers `expected` or `timeout_s` passes: (last status, seconds taken)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    started = time.monotonic()
    while True:
        code = client.get(path, headers=headers).status_code
        took = time.monotonic() - started
        if code == expected or took > timeout_s:
            return code, took
        time.sleep(interval_s)
