"""The worker's HTTP surface: `/healthz` (JSON) and `/metrics` (Prometheus text)."""

from __future__ import annotations

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from lineguard.health import LOOPBACK
from lineguard.health import serve as serve_app


class Health(BaseModel):
    status: str
    model_version: str
    products: list[str]
    frames: float
    in_flight: int


def build_app(worker) -> FastAPI:
    app = FastAPI(title="lineguard inference worker")

    @app.get("/healthz", response_model=Health)
    def healthz(response: Response) -> Health:
        ok = worker.ready
        response.status_code = 200 if ok else 503
        return Health(status="ok" if ok else "starting" if not worker._stopping.is_set() else "stopping",
                      model_version=worker.model.version, products=sorted(worker.model.products()),
                      frames=worker.metrics.frames_total(), in_flight=worker.tracker.in_flight())

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def serve(worker, port: int, host: str = LOOPBACK) -> None:
    await serve_app(build_app(worker), port, host)
