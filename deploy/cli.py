"""The deploy room's commands: the embedded stack (`up`, `down`, `demo`), topics, event schemas and the
pipeline benchmarks (`bench stream/resolution/memory/gpu/all`); `deploy/app.py` registers them with `register`.

Only typer is imported at module level, so `lineguard --help` stays fast; each command imports its modules
when it runs.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path

import typer

from inference.cli import parse_tiling
from lineguard.cli import add_user_errors, cli_command, cli_settings, sigterm_as_interrupt


def _user_errors() -> tuple[type[BaseException], ...]:
    from deploy.stack import StackError

    return (StackError,)


def up_command(
    kafka_port: int = typer.Option(None, help="Broker port (0 = free port). Env: LINEGUARD_EMBEDDED_KAFKA_PORT."),
    influx_port: int = typer.Option(None, help="influxd port (0 = free port). Env: LINEGUARD_EMBEDDED_INFLUX_PORT."),
    no_influx: bool = typer.Option(False, "--no-influx", help="Start only the broker."),
) -> None:
    """Start the embedded local stack (Tansu broker + influxd), create the topics, run until Ctrl-C."""
    from deploy.stack import EmbeddedStack

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
    from deploy.stack import stop_recorded_stack

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


def bench_stream_command(
    frames: int = typer.Option(400, min=16, help="Frames per phase."),
    max_batch: int = typer.Option(16, min=1, help="Worker batch size."),
    encoder: str = typer.Option(None, help="Image encoder (default efficientnet-lite0)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda."),
    frame_size: str = typer.Option(None, help="WxH: the simulator's parts resized to this camera resolution "
                                              "(default: 256 px parts as rendered)."),
    tiles: str = typer.Option(None, help="Inspect the products in COLSxROWS tiles, such as 2x2."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Batched pipeline vs a naive one-frame loop vs the raw model, on a fresh embedded broker."""
    from deploy.bench import stream_benchmark

    cli_settings()
    size = None
    if frame_size is not None:
        match = re.fullmatch(r"\s*(\d{2,5})\s*[xX]\s*(\d{2,5})\s*", frame_size)
        if not match:
            raise typer.BadParameter(f"expected WxH, such as 2448x2048, got {frame_size!r}",
                                     param_hint="--frame-size")
        size = (int(match.group(1)), int(match.group(2)))
    if tiles is not None:
        parse_tiling(tiles)
    result = stream_benchmark(frames=frames, max_batch=max_batch, encoder=encoder, device=device,
                              frame_size=size, tiles=tiles)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for key, value in result.items():
            typer.echo(f"{key}: {value}")


def bench_resolution_command(
    frames: int = typer.Option(64, min=16, help="Frames per resolution and mode."),
    output: Path = typer.Option(Path("BENCHMARKS.md"), help="Markdown file whose resolution section to write."),
) -> None:
    """Frames/s at 512 px, 5 MP and 20 MP, whole and in tiles, against full decoding: BENCHMARKS.md."""
    from deploy.bench import write_section

    cli_settings()
    write_section(output, "resolution", echo=lambda text: typer.echo(text, err=True), frames=frames)


def bench_memory_command(
    normal_frames: int = typer.Option(200, min=10, help="Frames of the normal stream."),
    bombs: int = typer.Option(20, min=1, help="Decompression bombs in the hostile stream."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Peak resident memory of a `lineguard infer` process under a normal and a hostile stream."""
    from deploy.memory_bench import markdown_section, memory_benchmark

    cli_settings()
    result = memory_benchmark(normal_frames=normal_frames, bombs=bombs)
    typer.echo(json.dumps(result) if as_json else markdown_section(result))


def bench_scale_command(
    frames: int = typer.Option(240, min=16, help="Frames per phase."),
    encoder: str = typer.Option(None, help="Image encoder of the workers (default efficientnet-lite0)."),
    rebalances: int = typer.Option(1, min=1, help="How many times the rebalance (worker joins, one leaves) runs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    write: Path = typer.Option(None, help="Also write the scale section into this file (BENCHMARKS.md)."),
) -> None:
    """One worker pinned to one core against two pinned to one core each, then a worker added and one stopped
    (SIGTERM) mid-stream: speedup, lost and duplicate verdicts, the longest pause."""
    from deploy.scale_bench import scale_benchmark, scale_section

    cli_settings()
    result = scale_benchmark(frames=frames, encoder=encoder, rebalances=rebalances)
    typer.echo(json.dumps(result) if as_json else scale_section(result))
    if write is not None:
        from deploy.bench import _replace_section

        text = write.read_text() if write.exists() else "# Benchmarks\n"
        write.write_text(_replace_section(text, "scale", scale_section(result)))
        typer.echo(f"wrote the scale section of {write}", err=True)


def bench_gpu_command(
    output: Path = typer.Option(Path("BENCHMARKS.md"), help="Markdown file whose gpu section is rewritten."),
    device: str = typer.Option("cuda", help="cuda, cuda:N (cpu only to try the benchmark itself)."),
    encoder: str = typer.Option("random:vit-h-14", help="Encoder of the stream run and the first speed row."),
    frames: int = typer.Option(2000, min=32, help="Frames per stream phase."),
    batch: int = typer.Option(32, min=1, help="Worker batch and encoder pass size."),
) -> None:
    """The GPU section of BENCHMARKS.md: ViT-H/14-size and lite0 scoring speed, LLM cost, stream benchmark."""
    import torch

    from deploy.bench import write_gpu_section

    cli_settings()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device here; this benchmark needs one (or --device cpu to try it)",
                                 param_hint="--device")
    write_gpu_section(output, echo=lambda text: typer.echo(text, err=True), device=device, encoder=encoder,
                      frames=frames, batch=batch)


def bench_all_command(
    output: Path = typer.Option(Path("BENCHMARKS.md"), help="Markdown file to write."),
    quick: bool = typer.Option(False, help="Fewer frames and seeds (a smoke run)."),
) -> None:
    """Run every benchmark and write BENCHMARKS.md (each figure with its command, machine and baseline)."""
    from deploy.bench import write_benchmarks

    cli_settings()
    write_benchmarks(output, quick=quick, echo=lambda text: typer.echo(text, err=True))


def bench_soak_command(
    minutes: float = typer.Option(20.0, min=0.5, help="Length of the soak (the events scale with it)."),
    text: bool = typer.Option(False, "--text/--no-text", help="Attach LVLM answers to flagged verdicts."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    write: Path = typer.Option(None, help="Also write the soak section into this file (BENCHMARKS.md)."),
) -> None:
    """The demo's line at 70 % of one worker's capacity through a worker SIGKILL, influxd and broker restarts and
    a 30 s records lock: frames lost, duplicates, the worker's RSS, the longest gap between verdicts."""
    from deploy.soak_bench import report, soak_benchmark

    cli_settings()
    report(soak_benchmark(minutes=minutes, text=text), as_json, write, echo=typer.echo)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add the deploy room's commands to the `lineguard` app (`bench`: its `bench` group)."""
    add_user_errors(_user_errors)
    app.command("up")(cli_command(up_command))
    app.command("down")(cli_command(down_command))
    app.command("demo")(cli_command(demo_command))
    app.command("schema")(schema_command)
    topics = typer.Typer(help="Manage Kafka topics.", no_args_is_help=True)
    topics.command("create")(cli_command(topics_create_command))
    topics.command("list")(topics_list_command)
    app.add_typer(topics, name="topics")
    bench.command("stream")(cli_command(bench_stream_command))
    bench.command("resolution")(cli_command(bench_resolution_command))
    bench.command("memory")(cli_command(bench_memory_command))
    bench.command("scale")(cli_command(bench_scale_command))
    bench.command("soak")(cli_command(bench_soak_command))
    bench.command("gpu")(cli_command(bench_gpu_command))
    bench.command("all")(cli_command(bench_all_command))
