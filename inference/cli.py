"""The inference room's commands: `lineguard infer`, `refs add` / `refs list`, `eval`; `deploy/app.py`
registers them with `register`. Only typer is imported at module level; torch loads only when a command runs.

    lineguard eval --data ../shared/datasets/mvtec-ad/bottle --shots 1 --seeds 3 --json
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import typer

from lineguard.cli import add_user_errors, cli_command, cli_settings


def _user_errors() -> tuple[type[BaseException], ...]:
    from inference.references import ReferenceError
    from inference.registry import RegistryError
    from inference.worker import ModelBroken

    return ReferenceError, ModelBroken, RegistryError


def infer_command(
    max_batch: int = typer.Option(16, min=1, help="Most frames per model batch."),
    max_wait_ms: int = typer.Option(50, min=0, help="Longest wait for a batch to fill after its first frame."),
    encoder: str = typer.Option(None, help="Image encoder (default efficientnet-lite0; see inference/model)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N."),
    http_port: int = typer.Option(9102, help="Port of /healthz and /metrics (-1 = off)."),
    http_host: str = typer.Option("127.0.0.1", help="Address of /healthz and /metrics (0.0.0.0: every interface)."),
    text: bool = typer.Option(True, help="Attach the LVLM's answer to flagged verdicts."),
    group_id: str = typer.Option("lineguard-inference", help="Kafka consumer group of the workers."),
    model_threads: int = typer.Option(0, min=0, help="Model calls in flight (0 = the fastest, measured at start-up "
                                                     "on a CPU; 2 on a GPU)."),
    model_process: bool = typer.Option(None, "--model-process/--no-model-process",
                                       help="Score in a process of its own (default: when the start-up measure "
                                            "finds the model's time is in Python, on a CPU)."),
    start_cache: bool = typer.Option(True, "--start-cache/--no-start-cache",
                                     help="Load calibrated product states and the threading choice from their "
                                          "caches (--no-start-cache: calibrate and measure at every start)."),
) -> None:
    """Consume frames, score them in dynamic batches, publish a Verdict and a Heatmap for each."""
    from inference.registry import ModelRegistry
    from inference.scorer import build_scorer
    from inference.worker import InferenceWorker, WorkerConfig

    settings = cli_settings()
    scorer = build_scorer(encoder=encoder, device=device, text=text, batch_size=max_batch)
    config = WorkerConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, group_id=group_id, explain=text,
                          http_port=None if http_port < 0 else http_port, http_host=http_host,
                          model_threads=model_threads, model_process=model_process,
                          start_cache=start_cache)
    worker = InferenceWorker(settings, scorer, config, registry=ModelRegistry.from_settings(settings))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, worker.stop)
        await worker.run()

    asyncio.run(main())


def parse_tiling(text: str):
    """--tiles COLSxROWS -> Tiling, or a usage error naming the option."""
    from inference.model.tiles import Tiling

    try:
        return Tiling.parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tiles") from None


def refs_add_command(
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

    settings = cli_settings()
    store = ReferenceStore.from_settings(settings)
    tiling = None if tiles is None else parse_tiling(tiles)
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


def refs_list_command() -> None:
    """List the products and their reference images."""
    from inference.references import ReferenceStore

    store = ReferenceStore.from_settings(cli_settings())
    products = store.products()
    if not products:
        typer.echo("no references: add some with `lineguard refs add --product NAME IMAGES...`")
    for product in products:
        entries = store.manifest(product)
        typer.echo(f"{product}\t{len(entries)} image(s)\ttiles {store.tiling(product)}")
        for entry in entries:
            typer.echo(f"  {entry.file}\t{entry.width}x{entry.height}\t{entry.added_at}\t{entry.source}")


def eval_command(
    data: list[Path] = typer.Option(..., "--data", help="MVTec-layout folder (train/good, test/<type>, "
                                    "ground_truth/<type>), or a folder of them; repeat for several",
                                    exists=True, file_okay=False, dir_okay=True),
    shots: str = typer.Option("1", "--shots", help="normal references per seed: 0 (needs a text tower), 1, 2, ... "
                                                   "or 'all' (unsupervised)"),
    seeds: int = typer.Option(1, "--seeds", min=1, help="repeat with this many reference draws; mean and std"),
    encoder: str = typer.Option("efficientnet-lite0", "--encoder",
                                help="efficientnet-lite0 | efficientnet-lite2 | clip:<dir> | imagebind:<dir>, "
                                     "optionally @d1,d2,d3,d4 block depths for ViTs"),
    size: int | None = typer.Option(None, "--size", help="input side in px; default: the encoder's own"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:1"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="frames per encoder pass"),
    as_json: bool = typer.Option(True, "--json/--no-json", help="one JSON object (default) or a short table"),
    runs: bool = typer.Option(False, "--runs/--no-runs", help="include the per-seed results"),
) -> None:
    """Evaluate the anomaly model on MVTec-layout folders (AUROC, the automatic verdict's balanced accuracy,
    recall and false alarms against the best any threshold reaches, location, confidence ECE)."""
    from inference.eval import evaluate_many, parse_shots

    try:
        parse_shots(shots)
    except ValueError as exc:
        raise typer.BadParameter(f"--shots: {exc}") from exc
    try:
        result = evaluate_many(data, shots=shots, seeds=seeds, encoder=encoder, image_size=size, device=device,
                               batch_size=batch_size)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    each = list(result["categories"].values()) if "categories" in result else [result]
    if not runs:
        for one in each:
            one.pop("runs", None)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for one in each:
        typer.echo(one["data"])
        for key in ("image_auroc", "pixel_auroc", "balanced_accuracy", "best_balanced_accuracy", "threshold_gap",
                    "recall", "false_alarm_rate", "location_accuracy", "confidence_ece"):
            typer.echo(f"{key:>24}  {one[key]:6.2f} ± {one[key + '_std']:.2f}")
        typer.echo(f"{'n_test':>24}  {one['n_test']}   {one['images_per_second']} images/s")


def register(app: typer.Typer) -> None:
    """Add the inference room's commands to the `lineguard` app."""
    add_user_errors(_user_errors)
    app.command("infer")(cli_command(infer_command))
    app.command("eval")(cli_command(eval_command))
    refs = typer.Typer(help="Normal reference images per product (the few-shot memory).", no_args_is_help=True)
    refs.command("add")(cli_command(refs_add_command))
    refs.command("list")(cli_command(refs_list_command))
    app.add_typer(refs, name="refs")
