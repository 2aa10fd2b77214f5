"""`lineguard eval`: the model on an MVTec-layout folder, one JSON object out.

Registered in lineguard/cli.py as `app.command("eval")(eval_command)`; torch loads only when it runs.

    lineguard eval --data ../shared/datasets/mvtec-ad/bottle --shots 1 --seeds 3 --json
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


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
