"""Model state every worker can reach: two workers with their own state dirs and one artifact store and database
serve a product whose references were added once through the CLI, and a later `refs add` reaches both without
a restart."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import cv2

from inference.model.api import InspectionModel, ModelConfig
from inference.worker import InferenceWorker, WorkerConfig
from ingest.publisher import publish
from ingest.simulator import LineSimulator
from ingest.sources import SimulatorSource
from tests.worker_helpers import dead_letters, group, worker_env


class Gasket(SimulatorSource):
    def frames(self):
        for frame in super().frames():
            frame.product = "gasket"
            yield frame


def _refs_add(settings, paths) -> None:
    added = subprocess.run([sys.executable, "-m", "deploy", "refs", "add", "--product", "gasket", *map(str, paths)],
                           env=worker_env(settings) | {"LINEGUARD_STORE_ARTIFACTS": str(settings.store_artifacts)},
                           capture_output=True, text=True, timeout=180)
    assert added.returncode == 0, added.stderr


def test_two_workers_share_references_through_the_artifact_store(settings, tmp_path):
    shared, db = tmp_path / "artifacts", f"sqlite:///{tmp_path / 'records.sqlite'}"
    machines = [settings.model_copy(update={"state_dir": tmp_path / name, "store_artifacts": str(shared),
                                            "store_db_url": db}) for name in ("cli", "a", "b")]
    simulator = LineSimulator(products=("tile",), seed=5)
    paths = []
    for i, image in enumerate(simulator.normal_references("tile", 3)):
        paths.append(tmp_path / f"good_{i}.png")
        cv2.imwrite(str(paths[-1]), image)
    _refs_add(machines[0], paths[:2])                   # once, from a machine that runs no worker
    models = [InspectionModel(ModelConfig(device="cpu", n_jitter=4, prototype_views=8, prototype_steps=30))
              for _ in range(2)]

    async def scenario():
        workers = [InferenceWorker(machine, model, WorkerConfig(max_batch=4, max_wait_ms=20, explain=False,
                                                                group_id=f"{group(settings)}-{i}"))
                   for i, (machine, model) in enumerate(zip(machines[1:], models, strict=True))]
        tasks = [asyncio.create_task(worker.run()) for worker in workers]
        while not all(worker.ready for worker in workers):
            for task in tasks:
                if task.done():
                    task.result()
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)   # the model-updates watchers have joined
        assert all("gasket" in model.products() for model in models)
        assert all(len(model.states["gasket"].references) == 2 for model in models)
        await publish(Gasket(simulator), settings, limit=3)
        deadline = time.monotonic() + 120
        while any(worker.metrics.frames_total() < 3 for worker in workers):
            assert time.monotonic() < deadline, "a worker did not score the shared product"
            await asyncio.sleep(0.1)

        await asyncio.to_thread(_refs_add, machines[0], paths[2:])   # reaches both, no restart
        while any(len(model.states["gasket"].references) < 3 for model in models):
            assert time.monotonic() < deadline + 120, "a worker never reloaded the shared references"
            await asyncio.sleep(0.1)
        for worker in workers:
            worker.stop()
        await asyncio.gather(*tasks)
        return workers

    workers = asyncio.run(asyncio.wait_for(scenario(), 360))
    assert all(dead_letters(worker) == 0 for worker in workers)
    for machine in machines[1:]:   # each worker cached what it loaded under its own state dir
        assert len(list((machine.state_dir / "references" / "gasket").glob("*.png"))) == 3
