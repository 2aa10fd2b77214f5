"""Ingest against the real embedded broker: frames in, exactly the same frames out."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import defaultdict

import cv2
import numpy as np
import pytest

from ingest.publisher import FrameTooLarge, publish
from ingest.simulator import PRODUCTS
from ingest.sources import SourceFrame, open_source
from lineguard.events import decode_frame
from lineguard.kafka import KafkaUnavailable, ensure_topics
from lineguard.settings import load_settings
from lineguard.topics import FRAMES, TOPICS
from tests.helpers import read_topic_sync

LINEGUARD = [sys.executable, "-m", "deploy"]


def test_produce_n_simulated_frames_consume_exactly_n(settings):
    n = 36
    report = asyncio.run(publish(open_source("simulator", defect_rate=0.5, seed=3), settings, cameras=3, limit=n))
    assert report.published == n and report.failed == 0
    assert report.per_camera == {"cam-0": 12, "cam-1": 12, "cam-2": 12}

    records = read_topic_sync(settings, FRAMES, expect=n)
    assert len(records) == n
    frame_ids = set()
    defects = 0
    for record in records:
        meta, jpeg = decode_frame(record.value, record.headers)
        frame_ids.add(meta.frame_id)
        assert record.key.decode() == meta.camera_id
        assert meta.product in PRODUCTS
        assert meta.line_id == settings.line_id and meta.source == "simulator"
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape == (meta.height, meta.width, 3)
        truth = meta.ground_truth
        assert truth is not None
        mask = cv2.imdecode(np.frombuffer(truth.mask_png, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (meta.height, meta.width)
        assert bool(mask.any()) == truth.is_defect
        defects += truth.is_defect
    assert len(frame_ids) == n
    assert 0 < defects < n


def test_order_holds_per_camera(settings):
    n = 60
    asyncio.run(publish(open_source("simulator", seed=1), settings, cameras=4, limit=n))
    records = read_topic_sync(settings, FRAMES, expect=n)
    assert len(records) == n
    partitions_of = defaultdict(set)
    seqs_of = defaultdict(list)
    for record in records:
        meta, _ = decode_frame(record.value, record.headers)
        partitions_of[meta.camera_id].add(record.partition)
        seqs_of[meta.camera_id].append((record.offset, meta.seq))
    assert set(seqs_of) == {"cam-0", "cam-1", "cam-2", "cam-3"}
    for camera_id, pairs in seqs_of.items():
        assert len(partitions_of[camera_id]) == 1, f"{camera_id} spread over partitions"
        in_offset_order = [seq for _, seq in sorted(pairs)]
        assert in_offset_order == list(range(n // 4)), camera_id


def test_creating_topics_twice_is_harmless(stack):
    settings = load_settings(kafka_bootstrap=stack.kafka_bootstrap, topic_prefix="twice.")
    first = asyncio.run(ensure_topics(settings))
    second = asyncio.run(ensure_topics(settings))
    assert set(first.values()) == {"created"}
    assert set(second.values()) == {"exists"}
    assert set(first) == {settings.topic(t.name) for t in TOPICS}


def test_frames_above_the_broker_limit_are_refused(settings):
    limited = settings.model_copy(update={"kafka_max_message_bytes": 64 * 1024})
    noise = np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)

    class NoiseSource:
        skipped: list = []

        def frames(self):
            yield SourceFrame(image=noise, product="noise", source="noise.png")

    with pytest.raises(FrameTooLarge, match="maximum message size of 65536 bytes"):
        asyncio.run(publish(NoiseSource(), limited, limit=1))
    # with a smaller side the same frame fits
    report = asyncio.run(publish(NoiseSource(), limited, limit=1, max_side=128))
    assert report.published == 1


def test_unreachable_bootstrap_is_a_clear_error(free_port_closed):
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{free_port_closed}")
    with pytest.raises(KafkaUnavailable, match=f"127.0.0.1:{free_port_closed}"):
        asyncio.run(publish(open_source("simulator"), settings, limit=1))


@pytest.fixture
def free_port_closed():
    from lineguard.stack import free_port

    return free_port()


# --- the CLI, as a user runs it ------------------------------------------------------------------

def run_cli(args, env, timeout=90):
    return subprocess.run([*LINEGUARD, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_folder_with_corrupt_jpeg_skips_and_counts(tmp_path, cli_env, settings):
    folder = tmp_path / "widget"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"good_{i}.png"), np.full((64, 80, 3), 40 * i, np.uint8))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    env = cli_env | {"LINEGUARD_TOPIC_PREFIX": settings.topic_prefix}
    result = run_cli(["ingest", str(folder)], env)
    assert result.returncode == 0, result.stderr
    assert "corrupt.jpg" in result.stderr
    assert "published 3 frame(s)" in result.stderr and "skipped 1 bad input(s)" in result.stderr
    records = read_topic_sync(settings, FRAMES, expect=3)
    metas = [decode_frame(r.value, r.headers)[0] for r in records]
    assert sorted(m.product for m in metas) == ["widget"] * 3
    assert {(m.width, m.height) for m in metas} == {(80, 64)}


def test_cli_folder_whose_name_is_no_product_id_asks_for_one(tmp_path, cli_env, settings):
    folder = tmp_path / "front cover"   # a space: not a valid product id in the contracts
    folder.mkdir()
    cv2.imwrite(str(folder / "good.png"), np.full((64, 80, 3), 40, np.uint8))
    env = cli_env | {"LINEGUARD_TOPIC_PREFIX": settings.topic_prefix}
    result = run_cli(["ingest", str(folder)], env)
    assert result.returncode == 1
    assert "product 'front cover'" in result.stderr and "name the product with --product" in result.stderr
    assert "Traceback" not in result.stderr
    assert run_cli(["ingest", str(folder), "--product", "front-cover"], env).returncode == 0
    assert [decode_frame(r.value, r.headers)[0].product for r in read_topic_sync(settings, FRAMES, expect=1)] \
        == ["front-cover"]


def test_cli_missing_path(tmp_path, cli_env):
    missing = tmp_path / "nope"
    result = run_cli(["ingest", str(missing)], cli_env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: path not found: {missing}"


def test_cli_unreachable_bootstrap(cli_env, free_port_closed):
    env = cli_env | {"LINEGUARD_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port_closed}"}
    result = run_cli(["ingest", "simulator", "--limit", "1"], env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot reach Kafka bootstrap server 127.0.0.1:{free_port_closed}")
    assert "LINEGUARD_KAFKA_BOOTSTRAP" in last


def test_cli_bad_setting_names_the_variable(cli_env):
    result = run_cli(["ingest", "simulator", "--limit", "1"], cli_env | {"LINEGUARD_JPEG_QUALITY": "500"})
    assert result.returncode == 2
    assert "LINEGUARD_JPEG_QUALITY" in result.stderr


def test_cli_simulator_with_rate_and_cameras(cli_env, settings):
    env = cli_env | {"LINEGUARD_TOPIC_PREFIX": settings.topic_prefix}
    result = run_cli(["ingest", "simulator", "--limit", "10", "--rate", "20", "--cameras", "2"], env)
    assert result.returncode == 0, result.stderr
    assert "published 10 frame(s)" in result.stderr
    records = read_topic_sync(settings, FRAMES, expect=10)
    assert len(records) == 10
    metas = sorted((decode_frame(r.value, r.headers)[0] for r in records), key=lambda m: m.captured_at)
    span = (metas[-1].captured_at - metas[0].captured_at).total_seconds()
    assert span >= 9 / 20 * 0.8, f"--rate 20 should pace 10 frames over ~0.45 s, took {span:.3f} s"
