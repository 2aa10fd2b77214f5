"""Typer commands of the dialogue room; `lineguard/cli.py` registers them as `lineguard dialogue ...`.

Only typer is imported at module level, so `lineguard --help` stays fast. `lineguard/cli.py` wraps both
commands in its `cli_command` (a bad setting or an unreadable store: one `error: ...` line, exit 2 or 1).

    lineguard dialogue --port 8080                              # serve the API and the console
    lineguard dialogue token --role operator --name alice       # print a new token once, store its hash
"""

from __future__ import annotations

import typer


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
