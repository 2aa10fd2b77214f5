"""The ingest room's commands: `lineguard ingest`, `lineguard monitor`; `deploy/app.py` registers them.

Only typer is imported at module level, so `lineguard --help` stays fast; each command imports its modules
when it runs.
"""

from __future__ import annotations

import asyncio
import contextlib

import typer

from lineguard.cli import EXIT_ERROR, add_user_errors, cli_command, cli_settings, sigterm_as_interrupt


def _user_errors() -> tuple[type[BaseException], ...]:
    from ingest.publisher import DeliveryFailed, FrameTooLarge
    from ingest.sources import SourceError

    return DeliveryFailed, FrameTooLarge, SourceError


def ingest_command(
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

    settings = cli_settings(jpeg_quality=jpeg_quality, line_id=line_id)
    frame_source = open_source(source, product, defect_rate=defect_rate, seed=seed, size=size)
    with sigterm_as_interrupt():
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


def monitor_command(
    seconds: float = typer.Option(None, help="Stop after this many seconds (default: until Ctrl-C)."),
    from_beginning: bool = typer.Option(False, help="Replay the topic from its start."),
) -> None:
    """Show frames arriving on the frames topic, live."""
    from ingest.monitor import watch_frames

    settings = cli_settings()
    with sigterm_as_interrupt(), contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch_frames(settings, seconds=seconds, from_beginning=from_beginning))


def register(app: typer.Typer) -> None:
    """Add the ingest room's commands to the `lineguard` app."""
    add_user_errors(_user_errors)
    app.command("ingest")(cli_command(ingest_command))
    app.command("monitor")(cli_command(monitor_command))
