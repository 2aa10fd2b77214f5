"""`lineguard bench stream --json`: its own embedded broker, every figure the issue names, nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.stream import stream_section


def test_bench_stream_prints_one_json_object_and_loses_nothing(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "LINEGUARD_STATE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "deploy", "bench", "stream", "--frames", "16", "--json"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for key in ("fps_pipeline", "fps_naive", "fps_model_raw", "fps_model_single", "p50_ms", "p99_ms"):
        assert result[key] > 0, key
    assert result["lost_frames"] == 0 and result["duplicate_verdicts"] == 0
    assert result["pipeline_vs_raw"] == round(result["fps_pipeline"] / result["fps_model_raw"], 3)
    section = stream_section(result, "lineguard bench stream --frames 16 --json")
    assert f"| {result['fps_pipeline']} |" in section and "target ≥ 3" in section


def test_bench_gpu_refuses_to_run_without_a_cuda_device(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the refusal only exists where there is no GPU")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "LINEGUARD_STATE_DIR": str(tmp_path)}
    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n")
    run = subprocess.run([sys.executable, "-m", "deploy", "bench", "gpu", "--output", str(output)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode != 0 and "--device" in run.stderr and "no CUDA device" in run.stderr
    assert output.read_text() == "# Benchmarks\n"
