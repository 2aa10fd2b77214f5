"""The HTTP surface every long-running service shares: `/healthz` (JSON, 200 when ok, 503 otherwise).

A service passes a function that describes its state as a dict with a `status` key ("ok" when it serves);
everything else in the dict is reported as it is. The server runs inside the service's event loop and leaves
SIGTERM/SIGINT to the service, which shuts down in its own order.

    >>> server = serve_health("lineguard store", lambda: {"status": "ok"}, ("127.0.0.1", 9104))
    >>> ...
    >>> await stop_server(server)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

LOOPBACK = "127.0.0.1"


def health_app(title: str, state: Callable[[], dict]):
    """A FastAPI app with one route, `/healthz`, answering `state()`."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(title=title)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        body = state()
        return JSONResponse(body, status_code=200 if body.get("status") == "ok" else 503)

    return app


async def serve(app, port: int, host: str = LOOPBACK) -> None:
    """Serve `app` until cancelled. `host` 0.0.0.0 makes it reachable from outside (a pod's probes)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # the service owns SIGTERM/SIGINT, not uvicorn
    await server.serve()


def serve_health(title: str, state: Callable[[], dict], http: tuple[str, int] | None) -> asyncio.Task | None:
    """Start serving `/healthz` at `http` (host, port) in the running loop; None serves nothing."""
    if http is None:
        return None
    host, port = http
    return asyncio.create_task(serve(health_app(title, state), port, host), name="healthz")


async def stop_server(task: asyncio.Task | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
