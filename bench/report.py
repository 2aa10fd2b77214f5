"""BENCHMARKS.md's shared pieces: the machine line every section names, and the one writer of marked sections.

Each section sits between `<!-- name:start -->` and `<!-- name:end -->`; writing one leaves the others as
they are, so a benchmark run alone (`lineguard bench scale --write BENCHMARKS.md`) and `make bench` agree.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

HEADER = ("# Benchmarks\n\nWritten by `make bench` (`lineguard bench all`). Every figure names its command "
          "and machine, and is compared with a baseline measured in the same run.\n\n")


def machine(torch_info: bool = True, threads: bool = False) -> str:
    """CPU model, cores, GPU and torch (`torch_info`; with its thread count: `threads`), Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if not torch_info:
        return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    count = f" ({torch.get_num_threads()} threads)" if threads else ""
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}{count}, Python {platform.python_version()}"


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with the section `name` set to `body` (appended at the end when it is not there yet)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        return text[: text.index(start)] + block + text[text.index(end) + len(end):]
    return text.rstrip() + "\n\n" + block + "\n"


def write_section(output: Path, name: str, body: str, echo=None) -> None:
    """Write the section `name` of `output` (created with the header when missing)."""
    text = output.read_text() if output.exists() else HEADER
    output.write_text(replace_section(text, name, body))
    if echo is not None:
        echo(f"wrote the {name} section of {output}")
