"""The `lineguard` command line. Each command imports its room lazily, so `--help` is fast.

Errors that a user can fix (a bad setting, a missing path, an unreachable broker) print one
line, `error: ...`, and exit non-zero; they never dump a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import signal
import sys
import time
from pathlib import Path

import typer

app = typer.Typer(help="lineguard: streaming factory-line inspection.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
topics_app = typer.Typer(help="Manage Kafka topics.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
refs_app = typer.Typer(help="Normal reference images per product (the few-shot memory).", no_args_is_help=True)
app.add_typer(refs_app, name="refs")
bench_app = typer.Typer(help="Benchmarks; `make bench` runs `bench all` and writes BENCHMARKS.md.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

EXIT_ERROR = 1
EXIT_CONFIG = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from deploy.stack import StackError
    from inference.references import ReferenceError
    from inference.registry import RegistryError
    from inference.worker import ModelBroken
    from ingest.publisher import DeliveryFailed, FrameTooLarge
    from ingest.sources import SourceError
    from lineguard.kafka import KafkaUnavailable
    from storage.artifacts import StorageError
    from training.train import TrainingLocked

    return (StackError, DeliveryFailed, FrameTooLarge, SourceError, KafkaUnavailable, ReferenceError, ModelBroken,
            StorageError, RegistryError, TrainingLocked)


def cli_command(func):
    """Turn the errors a user can act on into one line on stderr and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from lineguard.settings import ConfigError

        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_CONFIG) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except Exception as exc:
            if isinstance(exc, _user_errors()):
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(EXIT_ERROR) from None
            raise

    return wrapper


def _settings(**overrides):
    from lineguard.logging import configure
    from lineguard.settings import load_settings

    configure()
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM and SIGHUP (a closed terminal) stop a long-running command the same clean way Ctrl-C does.
    A second one while it cleans up is ignored, so the clean-up finishes."""

    def handler(signum, frame):
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {stop_signal: signal.signal(stop_signal, handler) for stop_signal in STOP_SIGNALS}
    try:
        yield
    finally:
        for stop_signal, action in previous.items():
            signal.signal(stop_signal, action)


@app.command()
@cli_command
def up(
    kafka_port: int = typer.Option(None, help="Broker port (0 = free port). Env: LINEGUARD_EMBEDDED_KAFKA_PORT."),
    influx_port: int = typer.Option(None, help="influxd port (0 = free port). Env: LINEGUARD_EMBEDDED_INFLUX_PORT."),
    no_influx: bool = typer.Option(False, "--no-influx", help="Start only the broker."),
) -> None:
    """Start the embedded local stack (Tansu broker + influxd), create the topics, run until Ctrl-C."""
    from deploy.stack import EmbeddedStack

    settings = _settings(embedded_kafka_port=kafka_port, embedded_influx_port=influx_port)
    if not settings.embedded:
        raise typer.BadParameter("`lineguard up` runs the embedded profile; unset LINEGUARD_PROFILE=production")
    stack = EmbeddedStack(settings, with_influx=not no_influx)
    with _sigterm_as_interrupt():
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


@app.command()
@cli_command
def down(timeout: float = typer.Option(20.0, min=1.0, help="Seconds to wait for the stack's owner to stop.")) -> None:
    """Stop the embedded stack recorded in <state_dir>/stack.json (`up` or `demo`, started in any shell)."""
    from deploy.stack import stop_recorded_stack

    for line in stop_recorded_stack(_settings(), timeout_s=timeout):
        typer.echo(line, err=True)


@app.command()
@cli_command
def ingest(
    source: str = typer.Argument(..., help="Image folder (MVTec layout understood), image file, video file, "
                                           "camera index, stream URL (rtsp://...), or 'simulator'."),
    product: str = typer.Option(None, help="Product name (default: from the folder name, or the simulator's)."),
    rate: float = typer.Option(None, help="Frames per second over all cameras (default: as fast as possible)."),
    cameras: int = typer.Option(1, min=1, help="Deal frames round-robin to N cameras (the Kafka key)."),
    limit: int = typer.Option(None, min=1, help="Stop after this many frames."),
    loop: bool = typer.Option(False, help="Start the source again when it ends (folders, video files)."),
    jpeg_quality: int = typer.Option(None, min=1, max=100, help="JPEG quality (env LINEGUARD_JPEG_QUALITY)."),
    max_side: int = typer.Option(None, min=16, help="Downscale so the longer side is at most this."),
    line_id: str = typer.Option(None, help="Production line id (env LINEGUARD_LINE_ID)."),
    defect_rate: float = typer.Option(0.2, min=0.0, max=1.0, help="Simulator: share of defective parts."),
    seed: int = typer.Option(0, help="Simulator: random seed."),
    size: int = typer.Option(256, min=32, help="Simulator: frame size in px."),
) -> None:
    """Publish camera frames to the frames topic."""
    from ingest.publisher import publish
    from ingest.sources import open_source

    settings = _settings(jpeg_quality=jpeg_quality, line_id=line_id)
    frame_source = open_source(source, product, defect_rate=defect_rate, seed=seed, size=size)
    with _sigterm_as_interrupt():
        try:
            report = asyncio.run(publish(frame_source, settings, rate=rate, cameras=cameras, limit=limit,
                                         loop=loop, max_side=max_side))
        except KeyboardInterrupt:
            return
    for path, reason in report.skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)
    typer.echo(f"published {report.published} frame(s) in {report.seconds:.1f} s "
               f"({report.fps:.1f} frames/s); skipped {len(report.skipped)} bad input(s)", err=True)
    if report.published == 0 and report.skipped:
        raise typer.Exit(EXIT_ERROR)


@app.command()
@cli_command
def monitor(
    seconds: float = typer.Option(None, help="Stop after this many seconds (default: until Ctrl-C)."),
    from_beginning: bool = typer.Option(False, help="Replay the topic from its start."),
) -> None:
    """Show frames arriving on the frames topic, live."""
    from ingest.monitor import watch_frames

    settings = _settings()
    with _sigterm_as_interrupt(), contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch_frames(settings, seconds=seconds, from_beginning=from_beginning))


@app.command()
@cli_command
def demo(
    rate: float = typer.Option(8.0, help="Simulated frames per second."),
    cameras: int = typer.Option(2, min=1, help="Simulated cameras."),
    defect_rate: float = typer.Option(0.15, min=0.0, max=1.0, help="Share of defective parts."),
    seconds: float = typer.Option(None, help="Stop after this many seconds (default: until Ctrl-C)."),
) -> None:
    """Start the embedded stack, the inference worker and a simulated line, with a live view of verdicts."""
    from deploy.demo import run_demo

    settings = _settings()
    with _sigterm_as_interrupt():
        try:
            run_demo(settings, rate=rate, cameras=cameras, defect_rate=defect_rate, seconds=seconds,
                     echo=lambda text: typer.echo(text, err=True))
        except KeyboardInterrupt:
            typer.echo("stopped.", err=True)


@app.command()
@cli_command
def infer(
    max_batch: int = typer.Option(16, min=1, help="Most frames per model batch."),
    max_wait_ms: int = typer.Option(50, min=0, help="Longest wait for a batch to fill after its first frame."),
    encoder: str = typer.Option(None, help="Image encoder (default efficientnet-lite0; see inference/model)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N."),
    http_port: int = typer.Option(9102, help="Port of /healthz and /metrics (-1 = off)."),
    text: bool = typer.Option(True, help="Attach the LVLM's answer to flagged verdicts."),
    group_id: str = typer.Option("lineguard-inference", help="Kafka consumer group of the workers."),
) -> None:
    """Consume frames, score them in dynamic batches, publish a Verdict and a Heatmap for each."""
    from inference.registry import ModelRegistry
    from inference.scorer import build_scorer
    from inference.worker import InferenceWorker, WorkerConfig

    settings = _settings()
    scorer = build_scorer(encoder=encoder, device=device, text=text, batch_size=max_batch)
    config = WorkerConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, group_id=group_id, explain=text,
                          http_port=None if http_port < 0 else http_port)
    worker = InferenceWorker(settings, scorer, config, registry=ModelRegistry.from_settings(settings))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, worker.stop)
        await worker.run()

    asyncio.run(main())


def _tiling(text: str):
    """--tiles COLSxROWS -> Tiling, or a usage error naming the option."""
    from inference.model.tiles import Tiling

    try:
        return Tiling.parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tiles") from None


@refs_app.command("add")
@cli_command
def refs_add(
    images: list[Path] = typer.Argument(..., help="Normal (good) images of the product."),
    product: str = typer.Option(..., help="Product name, as in FrameMeta.product."),
    tiles: str | None = typer.Option(None, help="Inspect this product in COLSxROWS overlapping tiles at model "
                                                "resolution, for defects small next to the frame (1x1: whole "
                                                "frames). Default: keep the product's setting."),
) -> None:
    """Register normal reference images for a product; running workers reload it."""
    from inference.references import ReferenceStore
    from lineguard.events import ModelUpdate
    from lineguard.kafka import KafkaUnavailable, make_producer, start_client
    from lineguard.topics import MODEL_UPDATES

    settings = _settings()
    store = ReferenceStore(settings.state_dir)
    tiling = None if tiles is None else _tiling(tiles)
    added = store.add(product, list(images))
    if tiling is not None:
        store.set_tiling(product, tiling)
    total = len(store.manifest(product))
    typer.echo(f"{product}: added {len(added)} reference image(s), {total} in all, inspected "
               f"{'in ' + str(store.tiling(product)) + ' tiles' if store.tiling(product).active else 'whole'} "
               f"({store.root / product})")

    async def notify() -> None:
        producer = await start_client(settings, make_producer(settings), timeout_s=10)
        try:
            update = ModelUpdate(kind="references_changed", product=product, detail={"count": str(total)})
            await producer.send_and_wait(settings.topic(MODEL_UPDATES), update.to_bytes(), key=product.encode())
        finally:
            await producer.stop()

    try:
        asyncio.run(notify())
    except KafkaUnavailable as exc:
        typer.echo(f"warning: stored, but running workers were not notified: {exc}", err=True)


@refs_app.command("list")
@cli_command
def refs_list() -> None:
    """List the products and their reference images."""
    from inference.references import ReferenceStore

    store = ReferenceStore(_settings().state_dir)
    products = store.products()
    if not products:
        typer.echo("no references: add some with `lineguard refs add --product NAME IMAGES...`")
    for product in products:
        entries = store.manifest(product)
        typer.echo(f"{product}\t{len(entries)} image(s)\ttiles {store.tiling(product)}")
        for entry in entries:
            typer.echo(f"  {entry.file}\t{entry.width}x{entry.height}\t{entry.added_at}\t{entry.source}")


@bench_app.command("stream")
@cli_command
def bench_stream(
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

    _settings()
    size = None
    if frame_size is not None:
        match = re.fullmatch(r"\s*(\d{2,5})\s*[xX]\s*(\d{2,5})\s*", frame_size)
        if not match:
            raise typer.BadParameter(f"expected WxH, such as 2448x2048, got {frame_size!r}",
                                     param_hint="--frame-size")
        size = (int(match.group(1)), int(match.group(2)))
    if tiles is not None:
        _tiling(tiles)
    result = stream_benchmark(frames=frames, max_batch=max_batch, encoder=encoder, device=device,
                              frame_size=size, tiles=tiles)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for key, value in result.items():
            typer.echo(f"{key}: {value}")


@bench_app.command("resolution")
@cli_command
def bench_resolution(
    frames: int = typer.Option(64, min=16, help="Frames per resolution and mode."),
    output: Path = typer.Option(Path("BENCHMARKS.md"), help="Markdown file whose resolution section to write."),
) -> None:
    """Frames/s at 512 px, 5 MP and 20 MP, whole and in tiles, against full decoding: BENCHMARKS.md."""
    from deploy.bench import write_section

    _settings()
    write_section(output, "resolution", echo=lambda text: typer.echo(text, err=True), frames=frames)


@bench_app.command("memory")
@cli_command
def bench_memory(
    normal_frames: int = typer.Option(200, min=10, help="Frames of the normal stream."),
    bombs: int = typer.Option(20, min=1, help="Decompression bombs in the hostile stream."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Peak resident memory of a `lineguard infer` process under a normal and a hostile stream."""
    from deploy.memory_bench import markdown_section, memory_benchmark

    _settings()
    result = memory_benchmark(normal_frames=normal_frames, bombs=bombs)
    typer.echo(json.dumps(result) if as_json else markdown_section(result))


@bench_app.command("dialogue")
@cli_command
def bench_dialogue(
    frames: int = typer.Option(48, min=16, help="Simulated frames through the worker and recorder."),
    fact_questions: int = typer.Option(280, min=7, help="Fact questions per phase (1 and 8 operators)."),
    llm_questions: int = typer.Option(8, min=1, help="Free-form (LLM) questions with 1 operator (8 ops: ≥ 16)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    output: Path = typer.Option(None, help="Also put the markdown section into this file (BENCHMARKS.md)."),
) -> None:
    """Answers/s and p50/p99 latency of the dialogue service, fact vs LLM answers, 1 vs 8 operators."""
    from dialogue.bench import dialogue_benchmark, markdown_section, write_section

    _settings()
    result = dialogue_benchmark(frames=frames, fact_questions=fact_questions, llm_questions=llm_questions)
    typer.echo(json.dumps(result) if as_json else markdown_section(result))
    if output is not None:
        write_section(output, result)
        typer.echo(f"wrote the dialogue section of {output}", err=True)


@bench_app.command("gpu")
@cli_command
def bench_gpu(
    output: Path = typer.Option(Path("BENCHMARKS.md"), help="Markdown file whose gpu section is rewritten."),
    device: str = typer.Option("cuda", help="cuda, cuda:N (cpu only to try the benchmark itself)."),
    encoder: str = typer.Option("random:vit-h-14", help="Encoder of the stream run and the first speed row."),
    frames: int = typer.Option(2000, min=32, help="Frames per stream phase."),
    batch: int = typer.Option(32, min=1, help="Worker batch and encoder pass size."),
) -> None:
    """The GPU section of BENCHMARKS.md: ViT-H/14-size and lite0 scoring speed, LLM cost, stream benchmark."""
    import torch

    from deploy.bench import write_gpu_section

    _settings()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device here; this benchmark needs one (or --device cpu to try it)",
                                 param_hint="--device")
    write_gpu_section(output, echo=lambda text: typer.echo(text, err=True), device=device, encoder=encoder,
                      frames=frames, batch=batch)


@bench_app.command("all")
@cli_command
def bench_all(
    output: Path = typer.Option(Path("BENCHMARKS.md"), help="Markdown file to write."),
    quick: bool = typer.Option(False, help="Fewer frames and seeds (a smoke run)."),
) -> None:
    """Run every benchmark and write BENCHMARKS.md (each figure with its command, machine and baseline)."""
    from deploy.bench import write_benchmarks

    _settings()
    write_benchmarks(output, quick=quick, echo=lambda text: typer.echo(text, err=True))


@topics_app.command("create")
@cli_command
def topics_create() -> None:
    """Create every lineguard topic with its partition count and configs (harmless when they exist)."""
    from lineguard.kafka import ensure_topics

    outcome = asyncio.run(ensure_topics(_settings()))
    for name, state in outcome.items():
        typer.echo(f"{name}: {state}")


@topics_app.command("list")
def topics_list() -> None:
    """Print the topic table: name, partitions, key, description."""
    from lineguard.settings import load_settings
    from lineguard.topics import TOPICS

    settings = load_settings()
    for topic in TOPICS:
        typer.echo(f"{settings.topic(topic.name)}\t{topic.partitions}\tkey={topic.key}\t{topic.description}")


@app.command()
def schema(out: Path = typer.Option(None, help="Write one <Model>.schema.json per contract into this folder "
                                               "(default: print all as one JSON object).")) -> None:
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


# -- storage (storage/cli.py imports its modules lazily, so --help stays fast) -------------------
from storage.cli import (  # noqa: E402
    bench_store_command,
    grafana_generate_command,
    grafana_push_command,
    records_command,
    stats_command,
    store_command,
)

app.command("stats")(cli_command(stats_command))
app.command("store")(cli_command(store_command))
app.command("records")(cli_command(records_command))
grafana_app = typer.Typer(help="Grafana: dashboards as code, datasource and dashboards push.", no_args_is_help=True)
app.add_typer(grafana_app, name="grafana")
grafana_app.command("push")(cli_command(grafana_push_command))
grafana_app.command("generate")(cli_command(grafana_generate_command))
bench_app.command("store")(cli_command(bench_store_command))

# -- the anomaly model's evaluation (inference/cli.py imports torch only when it runs) ------------
from inference.cli import eval_command  # noqa: E402

app.command("eval")(cli_command(eval_command))

# -- learning from labels (training/cli.py imports torch only when it runs) -------------------------
from training.cli import (  # noqa: E402
    bench_train_command,
    models_list_command,
    models_promote_command,
    models_rollback_command,
    models_show_command,
    train_command,
)

bench_app.command("train")(cli_command(bench_train_command))
train_app = typer.Typer(help="Learn from operators' labels: candidates, the evaluation gate, promotion.",
                        invoke_without_command=True)
train_app.callback()(cli_command(train_command))
app.add_typer(train_app, name="train")
models_app = typer.Typer(help="The model registry: versions per product, promote, roll back.", no_args_is_help=True)
models_app.command("list")(cli_command(models_list_command))
models_app.command("show")(cli_command(models_show_command))
models_app.command("promote")(cli_command(models_promote_command))
models_app.command("rollback")(cli_command(models_rollback_command))
app.add_typer(models_app, name="models")


# -- the dialogue service (dialogue/cli.py imports FastAPI and the models only when it runs) ---------
from dialogue.cli import serve_command, token_command  # noqa: E402

dialogue_app = typer.Typer(help="The operator dialogue service: API + console (FastAPI, uvicorn).",
                           invoke_without_command=True)
dialogue_app.callback()(cli_command(serve_command))
dialogue_app.command("token")(cli_command(token_command))

app.add_typer(dialogue_app, name="dialogue")


def main() -> None:  # pragma: no cover - console entry point
    app()
