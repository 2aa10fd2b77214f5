"""Typer commands of the dialogue room: `lineguard dialogue ...` and `lineguard bench dialogue`; `deploy/app.py`
registers them with `register`.

Only typer is imported at module level, so `lineguard --help` stays fast. `register` wraps every command in
`lineguard.cli.cli_command` (a bad setting or an unreadable store: one `error: ...` line, exit 2 or 1).

    lineguard dialogue --port 8080                              # serve the API and the console
    lineguard dialogue token --role operator --name alice       # print a new token once, store its hash
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lineguard.cli import cli_command, cli_settings


def _settings(**overrides):
    from dialogue.settings import load_dialogue_settings
    from lineguard.logging import configure
    from lineguard.settings import load_settings
    from storage.settings import load_storage_settings

    configure()
    return (load_settings(), load_dialogue_settings(**{k: v for k, v in overrides.items() if v is not None}),
            load_storage_settings())


def serve_command(
    ctx: typer.Context,
    host: str = typer.Option(None, help="Interface to listen on (env LINEGUARD_DIALOGUE_HOST, default 127.0.0.1)."),
    port: int = typer.Option(None, min=0, max=65535, help="Port (env LINEGUARD_DIALOGUE_PORT, default 8080)."),
) -> None:
    """Serve the dialogue API and the operator console until Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from dialogue.app import create_app

    settings, dialogue_settings, storage_settings = _settings(host=host, port=port)
    app = create_app(settings, dialogue_settings, storage_settings)
    typer.echo(f"console http://{dialogue_settings.host}:{dialogue_settings.port}/", err=True)
    # access_log off: our request log never prints headers or query strings
    uvicorn.run(app, host=dialogue_settings.host, port=dialogue_settings.port, access_log=False,
                log_config=None, server_header=False)


def token_command(
    role: str = typer.Option(..., help="viewer (read), operator (read, ask, label) or admin."),
    name: str = typer.Option(..., help="Who holds it; labels carry it as the operator."),
) -> None:
    """Create a token: printed once on stdout; only its SHA-256 is stored (LINEGUARD_DIALOGUE_TOKENS_FILE)."""
    from dialogue.auth import ROLES, create_token

    if role not in ROLES:
        raise typer.BadParameter(f"must be one of {', '.join(ROLES)}", param_hint="--role")
    settings, dialogue_settings, _ = _settings()
    path = dialogue_settings.token_file(settings)
    try:
        token = create_token(path, name, role)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--name") from None
    typer.echo(f"{role} token for {name} stored (hashed) in {path}; it is shown only now:", err=True)
    typer.echo(token)


def bench_dialogue_command(
    frames: int = typer.Option(48, min=16, help="Simulated frames through the worker and recorder."),
    fact_questions: int = typer.Option(280, min=7, help="Fact questions per phase (1 and 8 operators)."),
    llm_questions: int = typer.Option(8, min=1, help="Free-form (LLM) questions with 1 operator (8 ops: ≥ 16)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    output: Path = typer.Option(None, help="Also put the markdown section into this file (BENCHMARKS.md)."),
) -> None:
    """Answers/s and p50/p99 latency of the dialogue service, fact vs LLM answers, 1 vs 8 operators."""
    from dialogue.bench import dialogue_benchmark, markdown_section, write_section

    cli_settings()
    result = dialogue_benchmark(frames=frames, fact_questions=fact_questions, llm_questions=llm_questions)
    typer.echo(json.dumps(result) if as_json else markdown_section(result))
    if output is not None:
        write_section(output, result)
        typer.echo(f"wrote the dialogue section of {output}", err=True)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add the dialogue room's commands to the `lineguard` app (`bench`: its `bench` group)."""
    bench.command("dialogue")(cli_command(bench_dialogue_command))
    dialogue = typer.Typer(help="The operator dialogue service: API + console (FastAPI, uvicorn).",
                           invoke_without_command=True)
    dialogue.callback()(cli_command(serve_command))
    dialogue.command("token")(cli_command(token_command))
    app.add_typer(dialogue, name="dialogue")
