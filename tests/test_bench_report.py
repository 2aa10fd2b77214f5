"""bench/report.py: the one writer of BENCHMARKS.md's marked sections, and `bench all`'s explicit list."""

from __future__ import annotations

import re
from pathlib import Path

from bench.report import HEADER, machine, replace_section, write_section

REPO = Path(__file__).resolve().parents[1]


def test_a_section_is_replaced_in_place_and_the_others_are_left_alone():
    text = "# Benchmarks\n\n<!-- a:start -->\nold a\n<!-- a:end -->\n\n<!-- b:start -->\nb\n<!-- b:end -->\n"
    out = replace_section(text, "a", "new a\n")
    assert out == "# Benchmarks\n\n<!-- a:start -->\nnew a\n<!-- a:end -->\n\n<!-- b:start -->\nb\n<!-- b:end -->\n"
    assert replace_section(out, "c", "c") == out.rstrip() + "\n\n<!-- c:start -->\nc\n<!-- c:end -->\n"


def test_write_section_creates_the_file_with_its_header(tmp_path):
    said = []
    output = tmp_path / "BENCHMARKS.md"
    write_section(output, "soak", "## Soak\n", echo=said.append)
    assert output.read_text() == HEADER.rstrip() + "\n\n<!-- soak:start -->\n## Soak\n<!-- soak:end -->\n"
    write_section(output, "soak", "## Soak again\n")
    assert output.read_text().count("<!-- soak:start -->") == 1 and "Soak again" in output.read_text()
    assert said == [f"wrote the soak section of {output}"]


def test_the_machine_line_names_cores_and_python():
    assert re.search(r", \d+ cores, Python 3\.\d+", machine(torch_info=False))
    assert "torch " in machine() and "threads)" in machine(threads=True)


def test_every_section_of_benchmarks_md_has_a_writer():
    """`make bench` lists its sections explicitly; the ones it does not run (gpu, soak) have their own command."""
    from bench.run_all import SECTIONS

    written = {name for name, _ in SECTIONS} | {"stream", "gpu", "soak"}
    present = set(re.findall(r"<!-- ([a-z]+):start -->", (REPO / "BENCHMARKS.md").read_text()))
    assert present <= written, f"sections without a writer: {sorted(present - written)}"
    assert all(callable(section) for _, section in SECTIONS)
