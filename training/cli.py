"""The training room's commands: `lineguard train` (+ `train lvlm`), `models ...`, `bench train`, `bench lvlm`;
`deploy/app.py` registers them with `register`. Torch loads only when a command runs.

`lineguard bench train`: what operators' labels buy on real data (bench/train.py).

    lineguard bench train --data ../shared/datasets/mpdd/metal_plate --shots 1 --labels 10,20,50 --json
"""

from __future__ import annotations

import json
import math

import typer

from lineguard.cli import add_user_errors, cli_command

# --- lineguard train ---------------------------------------------------------------------------------

def train_command(
    ctx: typer.Context,
    product: str = typer.Option(None, "--product", help="only this product"),
    since: str = typer.Option(None, "--since", help="labels newer than this (ISO time) count as new; "
                                                     "default: newer than the live version's"),
    dry_run: bool = typer.Option(False, "--dry-run", help="judge the candidates; register and promote nothing"),
    nightly: bool = typer.Option(False, "--nightly", help="for schedulers: does nothing, and says so, when "
                                                          "no product has new labels"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Build a candidate model version for each product with new labels, judge it with the evaluation gate,
    register it, and promote it (workers swap it in at a batch boundary) when it passes."""
    if ctx.invoked_subcommand is not None:
        return
    import sys
    from dataclasses import asdict
    from datetime import datetime

    from lineguard.cli import sigterm_as_interrupt
    from lineguard.settings import load_settings
    from storage.settings import load_storage_settings
    from training.train import train

    settings, storage_settings = load_settings(), load_storage_settings()
    cutoff = None
    if since:
        try:
            cutoff = datetime.fromisoformat(since)
        except ValueError as exc:
            raise typer.BadParameter(f"--since: {since!r} is not an ISO time such as 2026-12-01T00:00") from exc
    # SIGTERM (docker stop, a deleted pod or its deadline) unwinds like Ctrl-C: the lock is released, nothing
    # half-built is promoted, and the run exits 130 within the grace period instead of being killed mid-write
    # (as PID 1 without a handler it would ignore SIGTERM until the SIGKILL).
    with sigterm_as_interrupt():
        results = _with_progress(lambda progress: train(settings, storage_settings, product=product,
                                                        since=cutoff, dry_run=dry_run, progress=progress),
                                 sys.stderr.isatty())
    if as_json:
        typer.echo(json.dumps({"results": [asdict(r) for r in results]}, default=str))
        return
    if not results:
        typer.echo("nothing to do: no product has labels newer than its last trained version"
                   + (" (nightly run)" if nightly else ""))
        return
    for result in results:
        typer.echo(f"{result.product}: {result.decision}" + (f" {result.version}" if result.version else "")
                   + (f" (report {result.report})" if result.report else ""))
        for reason in result.reasons:
            typer.echo(f"  - {reason}")


def _with_progress(run, tty: bool):
    """rich progress on a terminal; structlog lines (from train itself) otherwise."""
    if not tty:
        return run(None)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("training", total=None)
        return run(lambda product, n: bar.update(task, description=f"training {product} on {n} labels"))


# --- lineguard models ----------------------------------------------------------------------------------

def models_list_command(product: str = typer.Option(None, "--product", help="only this product"),
                        as_json: bool = typer.Option(False, "--json", help="one JSON object")) -> None:
    """Every model version, newest first: status, parent, held-out metrics."""
    registry = _registry()
    versions = registry.versions(product)
    if as_json:
        typer.echo(json.dumps({"versions": [v.summary() for v in versions]}))
        return
    if not versions:
        typer.echo("no model versions yet: products run on their references (`lineguard train` makes some)")
    for v in versions:
        score = v.metrics.get("candidate", {}).get("held_out", {}).get("balanced_accuracy", math.nan)
        typer.echo(f"{v.version:<28} {v.status:<9} parent {v.parent or 'references':<24} "
                   f"created {v.created_at:%Y-%m-%d %H:%M}" + ("" if math.isnan(score) else
                                                               f"  held-out BA {score:.1f}"))


def models_show_command(version: str = typer.Argument(..., help="a version, such as disc.v0003")) -> None:
    """One version: status, lineage (parent, labels, code) and the gate's metrics, as JSON."""
    typer.echo(json.dumps(_registry().get(version).summary(), indent=2))


def models_promote_command(version: str = typer.Argument(..., help="the version to make live")) -> None:
    """Make a version live (whatever the gate said) and tell the workers."""
    registry = _registry()
    found = registry.promote(version)
    _release(found.product, found.version)
    typer.echo(f"{found.product}: {found.version} is live")


def models_rollback_command(product: str = typer.Option(..., "--product", help="the product to roll back")) -> None:
    """Retire the live version and bring back the one before it (or the references alone)."""
    registry = _registry()
    back = registry.rollback(product)
    _release(product, back.version if back else None)
    typer.echo(f"{product}: {back.version if back else 'the references alone'} is live")


def _registry():
    from inference.registry import ModelRegistry
    from lineguard.settings import load_settings

    return ModelRegistry.from_settings(load_settings())


def _release(product: str, version: str | None) -> None:
    from lineguard.settings import load_settings
    from training.train import release

    release(load_settings(), product, version)


# --- lineguard train lvlm / bench lvlm --------------------------------------------------------------

def train_lvlm_command(
    steps: int = typer.Option(240, "--steps", min=1, help="optimiser steps"),
    simulated: int = typer.Option(320, "--simulated", min=8, help="simulated parts to train on"),
    held_out: int = typer.Option(160, "--held-out", min=8, help="simulated parts to measure on"),
    llm: str = typer.Option(None, "--llm", help="local HF model folder or .gguf (default: SmolLM2-135M GGUF)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="train and measure; register and promote nothing"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Train the LVLM's adapters (image projection, prompt learner) on simulated anomalies plus labelled frames,
    with the frozen LLM's cross-entropy on the answer sentence; promote them (a registry version of `lvlm`)
    when, with the verdict's facts withheld, they agree with the verdicts at least as well as the live ones."""
    import sys
    from dataclasses import asdict

    from lineguard.settings import load_settings
    from storage.settings import load_storage_settings
    from training.lvlm import LvlmTrainConfig, train_lvlm

    config = LvlmTrainConfig(steps=steps)

    def run(progress):
        return train_lvlm(load_settings(), load_storage_settings(), llm=llm, config=config, simulated=simulated,
                          held_out=held_out, dry_run=dry_run, progress=progress)

    if sys.stderr.isatty():
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("training the LVLM adapters", total=steps)
            result = run(lambda step, loss: bar.update(task, completed=step + 1,
                                                       description=f"training the LVLM adapters (loss {loss:.3f})"))
    else:
        result = run(None)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in asdict(result).items() if k != "losses"}, default=str))
        return
    typer.echo(f"lvlm: {result.decision}" + (f" {result.version}" if result.version else "")
               + f" ({result.samples} samples, {result.labelled} labelled; {result.train_seconds:.0f} s)")
    for name, figures in (("live", result.current), ("trained", result.candidate)):
        typer.echo(f"  {name:<8} yes/no {figures['yes_no_accuracy']:.1f} %  "
                   f"position {figures['position_accuracy']:.1f} % (facts withheld)")
    for reason in result.reasons:
        typer.echo(f"  - {reason}")


# --- registration -------------------------------------------------------------------------------------

def _user_errors() -> tuple[type[BaseException], ...]:
    from training.train import TrainingLocked

    return (TrainingLocked,)


def register(app: typer.Typer) -> None:
    """Add the training room's commands to the `lineguard` app."""
    add_user_errors(_user_errors)
    train = typer.Typer(help="Learn from operators' labels: candidates, the evaluation gate, promotion.",
                        invoke_without_command=True)
    train.callback()(cli_command(train_command))
    train.command("lvlm")(cli_command(train_lvlm_command))
    app.add_typer(train, name="train")
    models = typer.Typer(help="The model registry: versions per product, promote, roll back.", no_args_is_help=True)
    models.command("list")(cli_command(models_list_command))
    models.command("show")(cli_command(models_show_command))
    models.command("promote")(cli_command(models_promote_command))
    models.command("rollback")(cli_command(models_rollback_command))
    app.add_typer(models, name="models")
