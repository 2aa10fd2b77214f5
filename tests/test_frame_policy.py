"""The size policy (JPEG header read before decoding), id limits in the contracts, the memory budget."""

from __future__ import annotations

import asyncio
import json

import cv2
import numpy as np
import pytest

from inference.budget import MemoryBudget
from inference.frames import FrameRejected, check_size, decode, frame_size
from lineguard.events import DeadLetter, FrameMeta, Label, Verdict, json_schemas
from lineguard.settings import ConfigError, frame_cost_bytes, load_settings


def _jpeg(width: int, height: int, *extra_flags: int) -> bytes:
    flags = [cv2.IMWRITE_JPEG_QUALITY, 80, *extra_flags]
    return cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8), flags)[1] \
        .tobytes()


def _meta(width: int, height: int) -> FrameMeta:
    return FrameMeta(frame_id="f-1", line_id="line-1", camera_id="cam-0", product="disc", width=width, height=height)


@pytest.mark.parametrize(("width", "height"), [(1, 1), (640, 480), (333, 1001), (4000, 16)])
def test_frame_size_reads_the_start_of_frame_header(width, height):
    assert frame_size(_jpeg(width, height)) == (width, height)


def test_frame_size_reads_progressive_and_restart_marker_jpegs():
    assert frame_size(_jpeg(300, 200, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)) == (300, 200)
    assert frame_size(_jpeg(300, 200, cv2.IMWRITE_JPEG_RST_INTERVAL, 4)) == (300, 200)


def test_frame_size_needs_no_pixels_of_a_forged_bomb():
    jpeg = bytearray(_jpeg(16, 16))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = (65000).to_bytes(2, "big") + (64000).to_bytes(2, "big")
    assert frame_size(bytes(jpeg)) == (64000, 65000)


@pytest.mark.parametrize(("data", "reason"), [
    (cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes(), "not a JPEG"),
    (b"", "not a JPEG"),
    (b"\xff\xd8\xff\xd9", "no start-of-frame"),
    (_jpeg(64, 64)[:300], "truncated"),
    (b"\xff\xd8\x00\x00garbage\xff\xd9", "corrupt JPEG header"),
])
def test_unreadable_headers_are_rejected_with_a_reason(data, reason):
    with pytest.raises(FrameRejected, match=reason) as caught:
        frame_size(data)
    assert caught.value.error_type == "UndecodableImage"


def test_size_policy_names_the_limit_and_the_mismatch():
    with pytest.raises(FrameRejected, match=r"12000x12000 = 144.0 MP, above LINEGUARD_MAX_FRAME_PIXELS = 36.0 MP") \
            as caught:
        check_size(_meta(12000, 12000), (12000, 12000), 36_000_000)
    assert caught.value.error_type == "OversizeFrame"
    with pytest.raises(FrameRejected, match="JPEG is 512x512 but its FrameMeta says 64x9000") as caught:
        check_size(_meta(64, 9000), (512, 512), 36_000_000)
    assert caught.value.error_type == "MetaMismatch"
    check_size(_meta(6000, 6000), (6000, 6000), 36_000_000)   # exactly at the limit is fine


def test_decode_ignores_exif_orientation_and_matches_the_header():
    jpeg = _jpeg(40, 20)
    image = decode(jpeg, _meta(40, 20), frame_size(jpeg))
    assert image.shape == (20, 40, 3)


@pytest.mark.parametrize(("field", "value"), [
    ("frame_id", "f" * 20_000), ("frame_id", "a/../b"), ("camera_id", "cam 0"), ("camera_id", "cam-0\n"),
    ("line_id", ""), ("product", "p" * 129), ("product", "disc\x00"), ("frame_id", "-leading-dash"),
])
def test_ids_outside_their_limits_fail_the_contract(field, value):
    data = json.loads(_meta(8, 8).to_bytes()) | {field: value}
    with pytest.raises(ValueError, match=field):
        FrameMeta.from_bytes(json.dumps(data).encode())


def test_real_world_ids_pass():
    meta = FrameMeta(frame_id="line-1.cam-0.3f9a2c.0000042", line_id="L2_press", camera_id="basler:22411723",
                     product="metal_plate", width=8, height=8)
    assert FrameMeta.from_bytes(meta.to_bytes()) == meta
    label = Label(frame_id=meta.frame_id, operator="j.smith@plant-4", is_defect=True, defect_type="hairline crack")
    assert Label.from_bytes(label.to_bytes()) == label
    with pytest.raises(ValueError, match="operator"):
        Label(frame_id="f", operator="x" * 200, is_defect=False)


def test_json_schemas_carry_the_id_limits():
    schemas = json_schemas()
    for name, fields in {"FrameMeta": ("frame_id", "line_id", "camera_id", "product"),
                         "Verdict": ("frame_id", "line_id", "camera_id", "product"),
                         "Heatmap": ("frame_id", "camera_id", "product"), "Label": ("frame_id", "operator")}.items():
        for field in fields:
            spec = schemas[name]["properties"][field]
            assert (spec["maxLength"], spec["minLength"], spec["pattern"][0]) == (128, 1, "^"), (name, field)
    assert Verdict.model_fields["frame_id"].metadata  # the same constraint object validates and documents
    assert "frame_id" not in DeadLetter.model_fields   # a dead letter keeps whatever came in, as its payload


def test_budget_must_hold_one_largest_frame(monkeypatch):
    monkeypatch.setenv("LINEGUARD_WORKER_MEMORY_MB", "128")
    with pytest.raises(ConfigError, match="LINEGUARD_WORKER_MEMORY_MB=128 cannot hold one frame of "
                                          "LINEGUARD_MAX_FRAME_PIXELS"):
        load_settings()
    monkeypatch.setenv("LINEGUARD_MAX_FRAME_PIXELS", "5000000")
    assert load_settings().worker_memory_mb == 128
    monkeypatch.setenv("LINEGUARD_MAX_FRAME_PIXELS", "many")
    with pytest.raises(ConfigError, match="LINEGUARD_MAX_FRAME_PIXELS"):
        load_settings()


def test_default_limit_takes_a_30_mp_camera():
    settings = load_settings()
    assert 5472 * 5472 <= settings.max_frame_pixels < 100_000_000
    assert frame_cost_bytes(settings.max_frame_pixels) <= settings.worker_memory_mb * 2**20


def test_memory_budget_waits_until_frames_are_released():
    async def scenario() -> list[str]:
        budget = MemoryBudget(100)
        events = []
        await budget.acquire(60)
        await budget.acquire(40)
        waiter = asyncio.create_task(budget.acquire(50))
        await asyncio.sleep(0.05)
        events.append(f"waiting={not waiter.done()} in_use={budget.in_use}")
        budget.release(40)
        await asyncio.sleep(0.05)
        events.append(f"waiting={not waiter.done()} in_use={budget.in_use}")   # 60 + 50 > 100: still waits
        budget.release(60)
        await asyncio.wait_for(waiter, 1)
        events.append(f"in_use={budget.in_use} peak={budget.peak}")
        with pytest.raises(ValueError, match="never fit"):
            await budget.acquire(101)
        return events

    assert asyncio.run(scenario()) == ["waiting=True in_use=100", "waiting=True in_use=60", "in_use=50 peak=100"]
