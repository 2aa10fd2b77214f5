"""Typer commands of the dialogue room: `lineguard dialogue ...` and `lineguard bench dialogue`; `deploy/app.py`
registers them with `register`.

Only typer is imported at module level, so `lineguard --help` stays fast. `register` wraps every command in
`lineguard.cli.cli_command` (a bad setting or an unreadable store: one `error: ...` line, exit 2 or 1).

    lineguard dialogue --port 8080                              # serve the API and the console
    lineguard dialogue token create --role operator --name alice --expires-in 8h   # print a new token once
    lineguard dialogue token list                               # names, roles, expiry (never a token)
    lineguard dialogue token revoke --name alice                # refused within seconds, no restart
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lineguard.cli import cli_command


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
    from dialogue.limits import server_options

    settings, dialogue_settings, storage_settings = _settings(host=host, port=port)
    app = create_app(settings, dialogue_settings, storage_settings)
    typer.echo(f"console http://{dialogue_settings.host}:{dialogue_settings.port}/", err=True)
    # access_log off: our request log never prints headers or query strings; server_options: the header and
    # keep-alive timeouts (dialogue/limits.py)
    uvicorn.run(app, host=dialogue_settings.host, port=dialogue_settings.port, access_log=False,
                log_config=None, server_header=False, **server_options(dialogue_settings))


def _expiry(expires_in: str | None, expires_at: str | None):
    from datetime import UTC, datetime

    from dialogue.auth import parse_duration, parse_expiry

    if expires_in and expires_at:
        raise typer.BadParameter("give --expires-in or --expires-at, not both", param_hint="--expires-in")
    try:
        if expires_in:
            return datetime.now(UTC) + parse_duration(expires_in)
        return parse_expiry(expires_at) if expires_at else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expires-in" if expires_in else "--expires-at") from None


def _token_file(file: Path | None) -> Path:
    """--file, else LINEGUARD_DIALOGUE_TOKENS_FILE, else <state_dir>/dialogue-tokens.json."""
    if file is not None:
        return file
    settings, dialogue_settings, _ = _settings()
    return dialogue_settings.token_file(settings)


FILE_HELP = ("The token file (default: LINEGUARD_DIALOGUE_TOKENS_FILE, else <state_dir>/dialogue-tokens.json); "
             "e.g. a local file to put into the Kubernetes Secret.")


def create_command(
    role: str = typer.Option(..., help="viewer (read), operator (read, ask, label) or admin."),
    name: str = typer.Option(..., help="Who holds it; labels carry it as the operator. Replaces a token of "
                                       "this name (the old one is refused within seconds)."),
    expires_in: str = typer.Option(None, help="Valid for this long: 30m, 8h, 7d, 2w (default: no expiry)."),
    expires_at: str = typer.Option(None, help="Valid until this ISO 8601 time (no zone = UTC)."),
    file: Path = typer.Option(None, help=FILE_HELP),
) -> None:
    """Create a token: printed once on stdout; only its SHA-256 is stored (LINEGUARD_DIALOGUE_TOKENS_FILE)."""
    from dialogue.auth import ROLES, create_token

    if role not in ROLES:
        raise typer.BadParameter(f"must be one of {', '.join(ROLES)}", param_hint="--role")
    until = _expiry(expires_in, expires_at)
    path = _token_file(file)
    try:
        token = create_token(path, name, role, expires_at=until)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--name") from None
    valid = f", valid until {until.isoformat(timespec='seconds')}" if until else ""
    typer.echo(f"{role} token for {name} stored (hashed) in {path}{valid}; it is shown only now:", err=True)
    typer.echo(token)


def token_command(
    ctx: typer.Context,
    role: str = typer.Option(None, help="Same as `token create --role` (kept for older scripts)."),
    name: str = typer.Option(None, help="Same as `token create --name`."),
    expires_in: str = typer.Option(None, help="Same as `token create --expires-in`."),
    expires_at: str = typer.Option(None, help="Same as `token create --expires-at`."),
    file: Path = typer.Option(None, help="Same as `token create --file`."),
) -> None:
    """Access tokens: create, list, revoke. `token --role R --name N` is `token create`."""
    if ctx.invoked_subcommand is not None:
        return
    if role is None or name is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0 if role is None and name is None else 2)
    create_command(role=role, name=name, expires_in=expires_in, expires_at=expires_at, file=file)


def list_command(as_json: bool = typer.Option(False, "--json", help="Print one JSON array."),
                 file: Path = typer.Option(None, help=FILE_HELP)) -> None:
    """The stored tokens: name, role, created, expires (never a token or its hash)."""
    from dialogue.auth import list_tokens

    entries = list_tokens(_token_file(file))
    if as_json:
        typer.echo(json.dumps(entries))
        return
    typer.echo(f"{'name':<24} {'role':<9} {'created_at':<26} {'expires_at':<26} status")
    for entry in entries:
        status = "expired" if entry["expired"] else "active"
        typer.echo(f"{entry['name']:<24} {entry['role']:<9} {entry['created_at'] or '-':<26} "
                   f"{entry['expires_at'] or 'never':<26} {status}")


def revoke_command(name: str = typer.Option(..., help="The token's name (as in `token list`)."),
                   file: Path = typer.Option(None, help=FILE_HELP)) -> None:
    """Remove a token: every replica refuses it, and closes its open streams, within seconds."""
    from dialogue.auth import revoke_token

    path = _token_file(file)
    if not revoke_token(path, name):
        raise typer.BadParameter(f"no token named {name!r} in {path}", param_hint="--name")
    typer.echo(f"revoked the token of {name} in {path}", err=True)


def register(app: typer.Typer) -> None:
    """Add the dialogue room's commands to the `lineguard` app."""
    dialogue = typer.Typer(help="The operator dialogue service: API + console (FastAPI, uvicorn).",
                           invoke_without_command=True)
    dialogue.callback()(cli_command(serve_command))
    token = typer.Typer(help="Access tokens of the dialogue service: create, list, revoke.",
                        invoke_without_command=True)
    token.callback()(cli_command(token_command))
    token.command("create")(cli_command(create_command))
    token.command("list")(cli_command(list_command))
    token.command("revoke")(cli_command(revoke_command))
    dialogue.add_typer(token, name="token")
    app.add_typer(dialogue, name="dialogue")
