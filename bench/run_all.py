"""`make bench` (`lineguard bench all`): every benchmark, each written into its own section of BENCHMARKS.md.

The sections are listed here, in the order they run; the stream and GPU sections come first (the GPU one only
on a CUDA machine).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import dialogue, memory, model, scale, store, train
from bench.report import HEADER, replace_section
from bench.stream import FAST_ENCODER, gpu_section, resolution_section, stream_benchmark, stream_section

SECTIONS = (("resolution", resolution_section), ("model", model.markdown_section),
            ("thresholds", model.threshold_section), ("storage", store.markdown_section),
            ("memory", memory.markdown_section), ("scale", scale.scale_section),
            ("dialogue", dialogue.markdown_section), ("training", train.markdown_section),
            ("lvlm", train.lvlm_section))

def write_benchmarks(output: Path, quick: bool = False, echo=print) -> None:
    """Run every benchmark and write each into its own marked section of `output`."""
    text = output.read_text() if output.exists() else ""
    if not text.startswith("# Benchmarks"):
        text = HEADER + text
    frames = 96 if quick else 400
    echo(f"stream benchmark ({frames} frames per phase)…")
    result = stream_benchmark(frames=frames)
    echo(json.dumps(result))
    fast = stream_benchmark(frames=frames, encoder=FAST_ENCODER)
    echo(json.dumps(fast))
    text = replace_section(text, "stream", stream_section(
        result, f"lineguard bench stream --frames {frames} --json", fast,
        f"lineguard bench stream --frames {frames} --encoder {FAST_ENCODER} --json"))
    output.write_text(text)
    import torch

    if torch.cuda.is_available():
        echo("gpu benchmark…")
        text = replace_section(text, "gpu", gpu_section(echo=echo))
        output.write_text(text)
    else:
        echo("no CUDA device: the gpu section (`lineguard bench gpu`) is left as it is")
    for name, section in SECTIONS:
        echo(f"{name} benchmark…")
        text = replace_section(text, name, section())
        output.write_text(text)
    echo(f"wrote {output}")

