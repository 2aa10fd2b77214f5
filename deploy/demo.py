"""`lineguard demo`: the whole line on the embedded stack.

    simulator ──frames──▶ lineguard infer ──verdicts──▶ live console view
                                          └──▶ lineguard stats (InfluxDB) and lineguard store (records)
                                                  └──▶ lineguard dialogue (operator console, labels)

It starts the embedded stack (or reuses one that `lineguard up` runs), registers normal
references for the simulated products when none exist, starts the services as child
processes, and stops everything it started on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio

from inference.monitor import watch_verdicts
from inference.references import SIMULATOR_REFERENCE_SHOTS, ensure_simulator_references
from ingest.publisher import publish
from ingest.sources import open_source
from lineguard.logging import get_logger
from lineguard.services import Services, wait_healthy
from lineguard.settings import Settings
from lineguard.stack import EmbeddedStack, free_port, migrate_records, port_in_use, running_stack
from storage.demo import where_data_lives

log = get_logger(__name__)


WORKER_READY_TIMEOUT_S = 180.0
DIALOGUE_PORT = 8080
DEMO_OPERATOR = "demo-operator"




def run_demo(settings: Settings, *, rate: float, cameras: int, defect_rate: float, seconds: float | None,
             echo=print) -> None:
    running = running_stack(settings)
    stack = None if running else EmbeddedStack(settings)
    services: Services | None = None
    try:
        if stack is not None:
            stack.start()     # migrates the records database before any service starts
            running = {"kafka_bootstrap": stack.kafka_bootstrap, "influx_url": stack.influx_url}
        else:
            migrate_records(settings)   # the running stack's build may be older than ours
        settings = settings.model_copy(update={"kafka_bootstrap": running["kafka_bootstrap"],
                                               "influx_url": running["influx_url"]})
        echo(f"embedded stack {'up' if stack else 'already running'}: kafka {settings.bootstrap}, "
             f"influx {settings.influx}, state {settings.state_dir.resolve()}")
        added = ensure_simulator_references(settings)
        if added:
            echo(f"registered {SIMULATOR_REFERENCE_SHOTS} normal reference image(s) for: {', '.join(added)}")
        services = Services(settings.state_dir, {
            "LINEGUARD_KAFKA_BOOTSTRAP": settings.bootstrap, "LINEGUARD_INFLUX_URL": settings.influx,
            "LINEGUARD_STATE_DIR": str(settings.state_dir.resolve()), "LINEGUARD_LOG_JSON": "1",
        })
        http_port = free_port()
        services.start("infer", ["infer", "--http-port", str(http_port)])
        echo(f"inference worker starting (log {services.state_dir / 'infer.log'}, "
             f"metrics http://127.0.0.1:{http_port}/metrics) …")
        stats_port, store_port = free_port(), free_port()
        services.start("stats", ["stats", "--http-port", str(stats_port)])
        services.start("store", ["store", "--http-port", str(store_port)])
        console_url, token = start_dialogue(settings, services)
        health = wait_healthy(f"http://127.0.0.1:{http_port}/healthz", services, WORKER_READY_TIMEOUT_S)
        echo(f"worker ready: model {health['model_version']}, products {', '.join(health['products'])}")
        wait_healthy(f"{console_url}healthz", services, WORKER_READY_TIMEOUT_S)
        for port in (stats_port, store_port):
            wait_healthy(f"http://127.0.0.1:{port}/healthz", services, WORKER_READY_TIMEOUT_S)
        echo(f"operator console {console_url}  (demo operator token: {token})")
        echo("where the data lives:\n" + where_data_lives(settings))
        asyncio.run(_line_and_view(settings, rate, cameras, defect_rate, seconds, services))
        echo("where the data lives:\n" + where_data_lives(settings))
    finally:
        if services is not None:
            services.stop()
        if stack is not None:
            stack.stop()


def start_dialogue(settings: Settings, services: Services) -> tuple[str, str]:
    """Start `lineguard dialogue` on 127.0.0.1 (port 8080, or a free one when it is taken) with a fresh demo
    operator token (its hash in <state_dir>/dialogue-tokens.json); returns (console URL, token)."""
    from dialogue.auth import create_token
    from dialogue.settings import load_dialogue_settings

    token = create_token(load_dialogue_settings().token_file(settings), DEMO_OPERATOR, "operator")
    port = DIALOGUE_PORT if not port_in_use(DIALOGUE_PORT) else free_port()
    services.start("dialogue", ["dialogue", "--host", "127.0.0.1", "--port", str(port)])
    return f"http://127.0.0.1:{port}/", token


async def _line_and_view(settings: Settings, rate: float, cameras: int, defect_rate: float,
                         seconds: float | None, services: Services) -> None:
    view = asyncio.create_task(watch_verdicts(settings, seconds=seconds))
    await asyncio.sleep(0.5)  # let the view join before the first verdict
    line = asyncio.create_task(publish(open_source("simulator", defect_rate=defect_rate), settings,
                                       rate=rate, cameras=cameras))
    try:
        while not view.done():
            if services.dead():
                raise RuntimeError(f"service(s) exited: {services.dead()} (see {services.state_dir})")
            if line.done() and line.exception():
                raise line.exception()
            await asyncio.sleep(0.5)
        await view
    finally:
        for task in (line, view):
            task.cancel()
        await asyncio.gather(line, view, return_exceptions=True)
