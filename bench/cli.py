"""The benchmarks' commands: `lineguard bench ...`; `deploy/app.py` adds the group with `register`.

Only typer is imported at module level, so `lineguard --help` stays fast; each command imports its benchmark
when it runs. `make bench` runs `bench all` (bench/report.py), which writes every section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from inference.cli import parse_tiling
from lineguard.cli import cli_command, cli_settings


def bench_stream_command(
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
    from bench.stream import stream_benchmark

    cli_settings()
    size = None
    if frame_size is not None:
        match = re.fullmatch(r"\s*(\d{2,5})\s*[xX]\s*(\d{2,5})\s*", frame_size)
        if not match:
            raise typer.BadParameter(f"expected WxH, such as 2448x2048, got {frame_size!r}",
                                     param_hint="--frame-size")
        size = (int(match.group(1)), int(match.group(2)))
    if tiles is not None:
        parse_tiling(tiles)
    result = stream_benchmark(frames=frames, max_batch=max_batch, encoder=encoder, device=device,
                              frame_size=size, tiles=tiles)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for key, value in result.items():
            typer.echo(f"{key}: {value}")


def bench_resolution_command(
    frames: int = typer.Option(64, min=16, help="Frames per resolution and mode."),
    output: Path = typer.Option(Path("BENCHMARKS.md"), help="Markdown file whose resolution section to write."),
) -> None:
    """Frames/s at 512 px, 5 MP and 20 MP, whole and in tiles, against full decoding: BENCHMARKS.md."""
    from bench.report import write_section
    from bench.stream import resolution_section

    cli_settings()
    echo = lambda text: typer.echo(text, err=True)  # noqa: E731
    write_section(output, "resolution", resolution_section(echo=echo, frames=frames), echo=echo)


def bench_memory_command(
    normal_frames: int = typer.Option(200, min=10, help="Frames of the normal stream."),
    bombs: int = typer.Option(20, min=1, help="Decompression bombs in the hostile stream."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Peak resident memory of a `lineguard infer` process under a normal and a hostile stream."""
    from bench.memory import markdown_section, memory_benchmark

    cli_settings()
    result = memory_benchmark(normal_frames=normal_frames, bombs=bombs)
    typer.echo(json.dumps(result) if as_json else markdown_section(result))


def bench_scale_command(
    frames: int = typer.Option(240, min=16, help="Frames per phase."),
    encoder: str = typer.Option(None, help="Image encoder of the workers (default efficientnet-lite0)."),
    rebalances: int = typer.Option(1, min=1, help="How many times the rebalance (worker joins, one leaves) runs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    write: Path = typer.Option(None, help="Also write the scale section into this file (BENCHMARKS.md)."),
) -> None:
    """One worker pinned to one core against two pinned to one core each, then a worker added and one stopped
    (SIGTERM) mid-stream: speedup, lost and duplicate verdicts, the longest pause."""
    from bench.scale import scale_benchmark, scale_section

    cli_settings()
    result = scale_benchmark(frames=frames, encoder=encoder, rebalances=rebalances)
    typer.echo(json.dumps(result) if as_json else scale_section(result))
    if write is not None:
        from bench.report import write_section

        write_section(write, "scale", scale_section(result), echo=lambda text: typer.echo(text, err=True))


def bench_gpu_command(
    output: Path = typer.Option(Path("BENCHMARKS.md"), help="Markdown file whose gpu section is rewritten."),
    device: str = typer.Option("cuda", help="cuda, cuda:N (cpu only to try the benchmark itself)."),
    encoder: str = typer.Option("random:vit-h-14", help="Encoder of the stream run and the first speed row."),
    frames: int = typer.Option(2000, min=32, help="Frames per stream phase."),
    batch: int = typer.Option(32, min=1, help="Worker batch and encoder pass size."),
) -> None:
    """The GPU section of BENCHMARKS.md: ViT-H/14-size and lite0 scoring speed, LLM cost, stream benchmark."""
    import torch

    from bench.report import write_section
    from bench.stream import gpu_section

    cli_settings()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device here; this benchmark needs one (or --device cpu to try it)",
                                 param_hint="--device")
    echo = lambda text: typer.echo(text, err=True)  # noqa: E731
    write_section(output, "gpu", gpu_section(device=device, encoder=encoder, frames=frames, batch=batch, echo=echo),
                  echo=echo)


def bench_all_command(
    output: Path = typer.Option(Path("BENCHMARKS.md"), help="Markdown file to write."),
    quick: bool = typer.Option(False, help="Fewer frames and seeds (a smoke run)."),
) -> None:
    """Run every benchmark and write BENCHMARKS.md (each figure with its command, machine and baseline)."""
    from bench.run_all import write_benchmarks

    cli_settings()
    write_benchmarks(output, quick=quick, echo=lambda text: typer.echo(text, err=True))


def bench_soak_command(
    minutes: float = typer.Option(20.0, min=0.5, help="Length of the soak (the events scale with it)."),
    text: bool = typer.Option(False, "--text/--no-text", help="Attach LVLM answers to flagged verdicts."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    write: Path = typer.Option(None, help="Also write the soak section into this file (BENCHMARKS.md)."),
) -> None:
    """The demo's line at 70 % of one worker's capacity through a worker SIGKILL, influxd and broker restarts and
    a 30 s records lock: frames lost, duplicates, the worker's RSS, the longest gap between verdicts."""
    from bench.soak import report, soak_benchmark

    cli_settings()
    report(soak_benchmark(minutes=minutes, text=text), as_json, write, echo=typer.echo)


def bench_store_command(
    verdicts: int = typer.Option(4000, min=100, help="Verdicts for the aggregator run."),
    records: int = typer.Option(400, min=20, help="Flagged frames for the recorder run."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    output: Path = typer.Option(None, help="Also put the markdown section into this file (BENCHMARKS.md)."),
) -> None:
    """Verdicts/s the aggregator sustains into InfluxDB and records/s the recorder sustains, with baselines."""
    from bench.report import write_section
    from bench.store import markdown_section, store_benchmark

    cli_settings()
    result = store_benchmark(verdicts=verdicts, records=records)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for key, value in result.items():
            typer.echo(f"{key}: {value}")
    if output is not None:
        write_section(output, "storage", markdown_section(result))
        typer.echo(f"wrote the storage section of {output}", err=True)


def bench_dialogue_command(
    frames: int = typer.Option(48, min=16, help="Simulated frames through the worker and recorder."),
    fact_questions: int = typer.Option(280, min=7, help="Fact questions per phase (1 and 8 operators)."),
    llm_questions: int = typer.Option(8, min=1, help="Free-form (LLM) questions with 1 operator (8 ops: ≥ 16)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    output: Path = typer.Option(None, help="Also put the markdown section into this file (BENCHMARKS.md)."),
) -> None:
    """Answers/s and p50/p99 latency of the dialogue service, fact vs LLM answers, 1 vs 8 operators."""
    from bench.dialogue import dialogue_benchmark, markdown_section
    from bench.report import write_section

    cli_settings()
    result = dialogue_benchmark(frames=frames, fact_questions=fact_questions, llm_questions=llm_questions)
    typer.echo(json.dumps(result) if as_json else markdown_section(result))
    if output is not None:
        write_section(output, "dialogue", markdown_section(result))
        typer.echo(f"wrote the dialogue section of {output}", err=True)


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
    from bench.train import KEYS, learning_curve
    from inference.eval import build_model, categories

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


def bench_lvlm_command(
    steps: int = typer.Option(240, "--steps", min=1, help="optimiser steps"),
    simulated: int = typer.Option(320, "--simulated", min=8, help="simulated parts to train on"),
    held_out: int = typer.Option(160, "--held-out", min=8, help="simulated parts to measure on"),
    llm: str = typer.Option(None, "--llm", help="local HF model folder or .gguf (default: SmolLM2-135M GGUF)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """What the trained soft tokens carry: the LLM's own answers with the facts withheld, before and after
    training, on simulated parts it never trained on."""
    from bench.train import lvlm_benchmark

    result = lvlm_benchmark(steps=steps, simulated=simulated, held_out=held_out, llm=llm)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for name in ("before", "after"):
        typer.echo(f"{name:<7} yes/no {result[name]['yes_no_accuracy']:.1f} %  "
                   f"position {result[name]['position_accuracy']:.1f} %")
    typer.echo(f"training: {result['train_seconds']:.0f} s for {steps} steps")


def register(bench: typer.Typer) -> None:
    """Add every benchmark command to the `lineguard bench` group."""
    bench.command("stream")(cli_command(bench_stream_command))
    bench.command("resolution")(cli_command(bench_resolution_command))
    bench.command("memory")(cli_command(bench_memory_command))
    bench.command("scale")(cli_command(bench_scale_command))
    bench.command("gpu")(cli_command(bench_gpu_command))
    bench.command("all")(cli_command(bench_all_command))
    bench.command("soak")(cli_command(bench_soak_command))
    bench.command("store")(cli_command(bench_store_command))
    bench.command("dialogue")(cli_command(bench_dialogue_command))
    bench.command("train")(cli_command(bench_train_command))
    bench.command("lvlm")(cli_command(bench_lvlm_command))
