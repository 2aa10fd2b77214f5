"""The `lineguard` command: the rooms' commands assembled into one typer app.

Each room owns its commands in its own `cli.py` and adds them with `register(app)`; the benchmarks' commands
(bench/cli.py) fill the `lineguard bench` group. This module only puts them together, in the order `--help`
lists them. The rooms' cli modules import only typer at module level, so `lineguard --help` stays fast.

    lineguard = "deploy.app:app"      # pyproject.toml's console script
    python -m deploy ...              # the same command, in this interpreter (deploy/__main__.py)
"""

from __future__ import annotations

import typer

from bench import cli as bench_cli
from deploy import cli as deploy_cli
from dialogue import cli as dialogue_cli
from inference import cli as inference_cli
from ingest import cli as ingest_cli
from storage import cli as storage_cli
from training import cli as training_cli

# The order `lineguard --help` and `lineguard bench --help` list commands and groups in.
ORDER = ("up", "down", "ingest", "monitor", "demo", "infer", "schema", "stats", "store", "records", "db", "eval",
         "topics", "refs", "bench", "grafana", "train", "models", "dialogue")
BENCH_ORDER = ("stream", "resolution", "memory", "scale", "dialogue", "gpu", "all", "store", "train", "lvlm", "soak")


ROOMS = (deploy_cli.register, ingest_cli.register, inference_cli.register, storage_cli.register,
         training_cli.register, dialogue_cli.register)


def _in_order(group: typer.Typer, order: tuple[str, ...]) -> None:
    """Sort a group's commands and sub-groups by `order` (names not in it keep their place, after it)."""
    rank = {name: index for index, name in enumerate(order)}
    group.registered_commands.sort(key=lambda info: rank.get(info.name, len(order)))
    group.registered_groups.sort(key=lambda info: rank.get(info.name, len(order)))


def build_app() -> typer.Typer:
    """A fresh root app with every room's commands."""
    root = typer.Typer(help="lineguard: streaming factory-line inspection.", no_args_is_help=True,
                       pretty_exceptions_enable=False, add_completion=False)
    bench = typer.Typer(help="Benchmarks; `make bench` runs `bench all` and writes BENCHMARKS.md.",
                        no_args_is_help=True)
    for register in ROOMS:
        register(root)
    bench_cli.register(bench)
    root.add_typer(bench, name="bench")
    _in_order(root, ORDER)
    _in_order(bench, BENCH_ORDER)
    return root


app = build_app()


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="lineguard")
