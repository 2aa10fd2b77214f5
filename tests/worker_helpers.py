"""Shared by the inference-worker tests (their `model` fixture is in conftest.py)."""

from __future__ import annotations


def group(settings) -> str:
    """This test's own consumer group: a worker SIGKILLed by another test stays in a shared group
    until its session times out, and would hold up every later join."""
    return f"inference-{settings.topic_prefix}"


def dead_letters(worker) -> float:
    return sum(sample.value for metric in worker.metrics.dead_letters.collect() for sample in metric.samples
               if sample.name.endswith("_total"))
