"""`lineguard bench train`: what operators' labels buy on real data (training/bench.py).

Registered in lineguard/cli.py; torch loads only when it runs.

    lineguard bench train --data ../shared/datasets/mpdd/metal_plate --shots 1 --labels 10,20,50 --json
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def bench_train_command(
    data: list[Path] = typer.Option(..., "--data", help="MVTec-layout folder, or a folder of them; repeatable",
                                    exists=True, file_okay=False, dir_okay=True),
    shots: int = typer.Option(1, "--shots", min=1, help="normal references the product starts from"),
    labels: str = typer.Option("10,20,50", "--labels", help="labelled test images to reveal, comma-separated"),
    seeds: int = typer.Option(3, "--seeds", min=1, help="reference draws and label orders"),
    encoder: str = typer.Option("efficientnet-lite0", "--encoder", help="image encoder"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Learning curve: start from K references, reveal the labels of N test images (seeded, as an operator
    would label them), learn, and evaluate on the remaining test images; N = 0 is the references alone."""
    from inference.eval import build_model, categories
    from training.bench import KEYS, learning_curve

    try:
        counts = tuple(int(n) for n in labels.split(",") if n.strip())
    except ValueError as exc:
        raise typer.BadParameter(f"--labels: {labels!r} is not a comma-separated list of counts") from exc
    if not counts or min(counts) < 1:
        raise typer.BadParameter("--labels: give positive counts, such as 10,20,50")
    model = build_model(encoder)
    try:
        results = {str(root): learning_curve(root, shots=shots, labels=counts, seeds=seeds, model=model)
                   for root in categories(data)}
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps({"shots": shots, "seeds": seeds, "categories": results}))
        return
    for name, result in results.items():
        typer.echo(f"{name} (evaluated on {result['evaluated_on']} images)")
        for n, row in result["labels"].items():
            typer.echo(f"  N={n:>3}  " + "  ".join(f"{key} {row[key]:.1f}" for key in KEYS))
