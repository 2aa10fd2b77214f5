"""The deploy room's commands: the embedded stack (`up`, `down`, `demo`), topics, event schemas and Grafana
(`grafana push/generate`); `deploy/app.py` registers them with `register`.

Only typer is imported at module level, so `lineguard --help` stays fast; each command imports its modules
when it runs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
from pathlib import Path

import typer

from lineguard.cli import add_user_errors, cli_command, cli_settings, sigterm_as_interrupt


def _user_errors() -> tuple[type[BaseException], ...]:
    from lineguard.stack import StackError

    return (StackError,)


def up_command(
    kafka_port: int = typer.Option(None, help="Broker port (0 = free port). Env: LINEGUARD_EMBEDDED_KAFKA_PORT."),
    influx_port: int = typer.Option(None, help="influxd port (0 = free port). Env: LINEGUARD_EMBEDDED_INFLUX_PORT."),
    no_influx: bool = typer.Option(False, "--no-influx", help="Start only the broker."),
) -> None:
    """Start the embedded local stack (Tansu broker + influxd), create the topics, run until Ctrl-C."""
    from lineguard.stack import EmbeddedStack

    settings = cli_settings(embedded_kafka_port=kafka_port, embedded_influx_port=influx_port)
    if not settings.embedded:
        raise typer.BadParameter("`lineguard up` runs the embedded profile; unset LINEGUARD_PROFILE=production")
    stack = EmbeddedStack(settings, with_influx=not no_influx)
    with sigterm_as_interrupt():
        try:
            stack.start()
            typer.echo(f"kafka  {stack.kafka_bootstrap}\ninflux {stack.influx_url if not no_influx else '-'}\n"
                       f"state  {stack.state_dir}\nCtrl-C to stop.", err=True)
            while not stack.dead_children():
                time.sleep(0.5)
            raise SystemExit(f"error: embedded server(s) exited: {', '.join(stack.dead_children())}")
        except KeyboardInterrupt:
            pass
        finally:
            stack.stop()


def down_command(
    timeout: float = typer.Option(20.0, min=1.0, help="Seconds to wait for the stack's owner to stop."),
) -> None:
    """Stop the embedded stack recorded in <state_dir>/stack.json (`up` or `demo`, started in any shell)."""
    from lineguard.stack import stop_recorded_stack

    for line in stop_recorded_stack(cli_settings(), timeout_s=timeout):
        typer.echo(line, err=True)


def demo_command(
    rate: float = typer.Option(8.0, help="Simulated frames per second."),
    cameras: int = typer.Option(2, min=1, help="Simulated cameras."),
    defect_rate: float = typer.Option(0.15, min=0.0, max=1.0, help="Share of defective parts."),
    seconds: float = typer.Option(None, help="Stop after this many seconds (default: until Ctrl-C)."),
) -> None:
    """Start the embedded stack, the inference worker and a simulated line, with a live view of verdicts."""
    from deploy.demo import run_demo

    settings = cli_settings()
    with sigterm_as_interrupt():
        try:
            run_demo(settings, rate=rate, cameras=cameras, defect_rate=defect_rate, seconds=seconds,
                     echo=lambda text: typer.echo(text, err=True))
        except KeyboardInterrupt:
            typer.echo("stopped.", err=True)


def schema_command(out: Path = typer.Option(None, help="Write one <Model>.schema.json per contract into this "
                                                       "folder (default: print all as one JSON object).")) -> None:
    """Write the JSON Schemas of the event contracts."""
    from lineguard.events import dumps_schema, json_schemas

    schemas = json_schemas()
    if out is None:
        json.dump(schemas, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in schemas:
        (out / f"{name}.schema.json").write_text(dumps_schema(name))
    typer.echo(f"wrote {len(schemas)} schemas to {out}", err=True)


def topics_create_command() -> None:
    """Create every lineguard topic with its partition count and configs (harmless when they exist)."""
    from lineguard.kafka import ensure_topics

    outcome = asyncio.run(ensure_topics(cli_settings()))
    for name, state in outcome.items():
        typer.echo(f"{name}: {state}")


def topics_list_command() -> None:
    """Print the topic table: name, partitions, key, description."""
    from lineguard.settings import load_settings
    from lineguard.topics import TOPICS

    settings = load_settings()
    for topic in TOPICS:
        typer.echo(f"{settings.topic(topic.name)}\t{topic.partitions}\tkey={topic.key}\t{topic.description}")


def _grafana_errors(func):
    """An unreachable Grafana or a missing npm (the schema check) prints one `error:` line and exits 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from deploy.grafana.dashboards import SchemaCheckUnavailable
        from deploy.grafana.push import GrafanaPushError

        try:
            return func(*args, **kwargs)
        except (GrafanaPushError, SchemaCheckUnavailable) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper


@_grafana_errors
def grafana_push_command(
    url: str = typer.Option(..., help="Grafana base URL, e.g. http://grafana:3000.", envvar="GRAFANA_URL"),
    token: str = typer.Option(..., help="API / service-account token (or user:password).", envvar="GRAFANA_TOKEN"),
    influx_url: str = typer.Option(None, help="InfluxDB URL as Grafana reaches it (default LINEGUARD_INFLUX_URL)."),
) -> None:
    """Create or update the InfluxDB datasource and push the lineguard dashboards to Grafana."""
    from deploy.grafana.push import push
    from storage.settings import load_storage_settings

    settings, storage_settings = cli_settings(), load_storage_settings()
    password = storage_settings.influx_password.get_secret_value() if storage_settings.influx_password else None
    report = push(url, token, influx_url=influx_url or settings.influx, database=settings.influx_database,
                  influx_username=storage_settings.influx_username, influx_password=password)
    typer.echo(f"datasource lineguard-influxdb: {report.datasource}; folder lineguard: {report.folder}")
    for uid, where in report.dashboards.items():
        typer.echo(f"dashboard {uid}: {where or 'pushed'}")


@_grafana_errors
def grafana_generate_command(
    check: bool = typer.Option(False, "--check", help="Also type-check them against @grafana/schema (npm, tsc)."),
) -> None:
    """Regenerate deploy/grafana/dashboards/*.json from deploy/grafana/dashboards.py."""
    from deploy.grafana.dashboards import schema_check, write_all

    for path in write_all():
        typer.echo(f"wrote {path}")
    if check:
        result = schema_check()
        sys.stderr.write(result.stdout + result.stderr)
        if result.returncode != 0:
            typer.echo("error: the dashboards do not match Grafana's schema types", err=True)
            raise typer.Exit(1)
        typer.echo("schema check: ok")


def register(app: typer.Typer) -> None:
    """Add the deploy room's commands to the `lineguard` app."""
    add_user_errors(_user_errors)
    app.command("up")(cli_command(up_command))
    app.command("down")(cli_command(down_command))
    app.command("demo")(cli_command(demo_command))
    app.command("schema")(schema_command)
    topics = typer.Typer(help="Manage Kafka topics.", no_args_is_help=True)
    topics.command("create")(cli_command(topics_create_command))
    topics.command("list")(topics_list_command)
    app.add_typer(topics, name="topics")
    grafana = typer.Typer(help="Grafana: dashboards as code, datasource and dashboards push.", no_args_is_help=True)
    grafana.command("push")(cli_command(grafana_push_command))
    grafana.command("generate")(cli_command(grafana_generate_command))
    app.add_typer(grafana, name="grafana")
