"""Work at the model's resolution: JPEGs decoded at the DCT scale the model needs, maps and regions at model
resolution scaled back to frame pixels, and tiles for defects that are small next to the frame."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from inference import frames, metrics
from inference.eval import at_mask_size
from inference.model.api import Frame, InspectionModel, ModelConfig
from inference.model.tiles import NO_TILES, Tiling
from inference.model.verdict import Calibration, make_verdict
from inference.references import ReferenceError, ReferenceStore
from inference.registry import state_bytes, state_from_bytes
from ingest.simulator import LineSimulator
from lineguard.events import FrameMeta

# --- tiles ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, cols, rows", [("2x2", 2, 2), ("3X1", 3, 1), (" 1x4 ", 1, 4)])
def test_tiling_parses_cols_by_rows(text, cols, rows):
    tiling = Tiling.parse(text)
    assert (tiling.cols, tiling.rows, tiling.count, str(tiling)) == (cols, rows, cols * rows, f"{cols}x{rows}")


@pytest.mark.parametrize("text", ["2", "axb", "0x2", "9x9", "", "2x2x2"])
def test_tiling_refuses_what_it_cannot_cut(text):
    with pytest.raises(ValueError, match="tiles"):
        Tiling.parse(text)


@pytest.mark.parametrize("width, height, tiling", [(2048, 2048, "3x3"), (2448, 2048, "2x2"), (5472, 3648, "4x3"),
                                                    (641, 480, "3x2")])
def test_tiles_cover_the_frame_with_equal_overlapping_crops(width, height, tiling):
    tiling = Tiling.parse(tiling)
    boxes = tiling.boxes(width, height)
    assert len(boxes) == tiling.count
    covered = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1 in boxes:
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1, "every pixel is in a tile"
    sizes = {(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes}
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    assert max(widths) - min(widths) <= 1 and max(heights) - min(heights) <= 1
    if tiling.cols > 1:                                  # neighbours share about `overlap` of a tile
        (ax0, _, ax1, _), (bx0, _, _, _) = boxes[0], boxes[1]
        assert abs((ax1 - bx0) / (ax1 - ax0) - tiling.overlap) < 0.01


def test_stitched_map_puts_each_tile_where_it_came_from():
    tiling = Tiling.parse("3x2")
    width, height, side = 1200, 800, 64
    boxes = tiling.boxes(width, height)
    maps = np.zeros((tiling.count, side, side), np.float32)
    maps[4, side // 2, side // 2] = 1.0                 # a hot cell in the middle of tile 4 (row 1, col 1)
    whole = tiling.stitch(maps, width, height)
    y, x = np.unravel_index(np.argmax(whole), whole.shape)
    x0, y0, x1, y1 = boxes[4]
    assert abs(x * width / whole.shape[1] - (x0 + x1) / 2) < 16
    assert abs(y * height / whole.shape[0] - (y0 + y1) / 2) < 16
    flat = tiling.stitch(np.full((tiling.count, side, side), 0.3, np.float32), width, height)
    np.testing.assert_allclose(flat, 0.3, rtol=1e-6)     # overlaps are averaged, not summed


# --- model resolution ----------------------------------------------------------------------------------

def test_regions_found_at_model_resolution_are_given_in_frame_pixels():
    calibration = Calibration(threshold=0.4, normal_score=0.1, method="reshot")
    small = np.full((100, 100), 0.1, np.float32)
    small[20:30, 60:80] = 0.9                                       # 20 x 10 cells at model resolution
    verdict = make_verdict(small, calibration, mm_per_px=0.1, frame_size=(5000, 2000))
    [region] = verdict.regions
    assert (region.x, region.y, region.w, region.h) == (3000, 400, 1000, 200)    # 50 x 20 px per cell
    assert region.area_px == pytest.approx(200 * 50 * 20, rel=0.05)
    assert region.area_mm2 == pytest.approx(region.area_px * 0.01, rel=1e-3)
    assert verdict.positions == ["top right"]
    # the same map at frame resolution gives the same region
    full = cv2.resize(small, (5000, 2000), interpolation=cv2.INTER_NEAREST)
    [same] = make_verdict(full, calibration, mm_per_px=0.1).regions
    assert (same.x, same.y, same.w, same.h, same.area_px) == (region.x, region.y, region.w, region.h, region.area_px)


def _jpeg(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    image = cv2.resize(rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8), (width, height))
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


@pytest.mark.parametrize("size, needed, factor", [((2448, 2048), (320, 320), 4), ((5472, 3648), (320, 320), 8),
                                                  ((512, 512), (320, 320), 1), ((2448, 2048), (896, 896), 2),
                                                  ((2449, 2047), (300, 255), 8), ((640, 480), None, 1)])
def test_jpeg_is_decoded_at_the_largest_scale_down_that_keeps_what_the_model_needs(size, needed, factor):
    data = _jpeg(*size)
    meta = FrameMeta(frame_id="f", line_id="l", camera_id="c", product="p", captured_at="2026-01-01T00:00:00Z",
                     width=size[0], height=size[1])
    assert frames.reduction(size, needed) == factor
    image = frames.decode(data, meta, size, needed)
    assert (image.shape[1], image.shape[0]) == (-(-size[0] // factor), -(-size[1] // factor))
    if needed:
        assert image.shape[1] >= needed[0] and image.shape[0] >= needed[1]


def test_reduced_decode_changes_no_verdict_meaning():
    """A frame scored from a 1/4-scale decode gives the same decision and regions in frame pixels as from
    the full decode."""
    sim = LineSimulator(products=("disc",), size=256, seed=2)
    model = InspectionModel(ModelConfig(device="cpu"))
    model.set_references("disc", sim.normal_references("disc", 2))
    width, height = 2448, 2048
    parts = [sim.part(i, "disc", kind) for i, kind in enumerate(["scratch", None, "contamination", "dent"])]
    same_regions = 0
    for part in parts:
        data = cv2.imencode(".jpg", cv2.resize(part.image, (width, height), interpolation=cv2.INTER_CUBIC),
                            [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        meta = FrameMeta(frame_id="f", line_id="l", camera_id="c", product="disc",
                         captured_at="2026-01-01T00:00:00Z", width=width, height=height)
        full = frames.decode(data, meta, (width, height))
        reduced = frames.decode(data, meta, (width, height), model.needed_pixels("disc"))
        assert reduced.shape[:2] == (512, 612)
        a, b = model.score([Frame(full, "disc"), Frame(reduced, "disc", size=(width, height))])
        assert a.is_anomalous == b.is_anomalous and abs(a.score - b.score) < 0.1 * a.threshold
        for region in b.regions:
            assert region.x + region.w <= width and region.y + region.h <= height
        if a.regions and b.regions:
            ra, rb = a.regions[0], b.regions[0]
            same_regions += abs(ra.x - rb.x) < 60 and abs(ra.y - rb.y) < 60 and ra.position == rb.position
    assert same_regions >= 2


# --- tiles find small defects ----------------------------------------------------------------------------

FRAME = 2048


def _small_scratch(image: np.ndarray, rng: np.random.Generator, width: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A dark scratch `width` px wide and 20-40 px long on the part: 1 px once the frame is shrunk to 320."""
    image, mask = image.copy(), np.zeros(image.shape[:2], np.uint8)
    cx, cy = rng.integers(FRAME * 3 // 10, FRAME * 7 // 10, 2)
    length, angle = rng.integers(20, 40), rng.uniform(0, np.pi)
    dx, dy = length * np.cos(angle) / 2, length * np.sin(angle) / 2
    p0, p1 = (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy))
    cv2.line(image, p0, p1, (20, 20, 20), width)
    cv2.line(mask, p0, p1, 1, width)
    return image, mask


def test_small_defects_are_found_with_tiles_and_missed_without():
    """2048 px parts (rendered at 1024, upsampled) with 6 px scratches: the whole frame, shrunk to the
    encoder's 320 px, loses them; 3x3 tiles keep them."""
    sim = LineSimulator(products=("disc",), size=FRAME // 2, seed=4)
    grow = lambda image: cv2.resize(image, (FRAME, FRAME), interpolation=cv2.INTER_LINEAR)  # noqa: E731
    references = [grow(image) for image in sim.normal_references("disc", 2)]
    rng = np.random.default_rng(0)
    goods = [grow(sim.part(i, "disc", None).image) for i in range(6)]
    bads = [_small_scratch(grow(sim.part(100 + i, "disc", None).image), rng) for i in range(6)]
    images = goods + [image for image, _ in bads]
    masks = [np.zeros((FRAME, FRAME), np.uint8)] * len(goods) + [mask for _, mask in bads]
    labels = np.array([False] * len(goods) + [True] * len(bads))
    model = InspectionModel(ModelConfig(device="cpu"))
    found = {}
    for tiles in ("1x1", "3x3"):
        model.set_references("disc", references, tiling=Tiling.parse(tiles))
        started = time.perf_counter()
        scored = model.score([Frame(image, "disc") for image in images])
        ms_per_frame = (time.perf_counter() - started) * 1000 / len(images)
        found[tiles] = (metrics.pixel_auroc(masks, [at_mask_size(s.anomaly_map, m) for s, m in zip(scored, masks,
                                                                                                     strict=True)]),
                        metrics.image_auroc(labels, np.array([s.score for s in scored])), ms_per_frame)
        print(f"{tiles}: pixel AUROC {found[tiles][0]:.1f}, image AUROC {found[tiles][1]:.1f}, "
              f"{ms_per_frame:.0f} ms per frame")
    (whole_pixel, whole_image, _), (tiled_pixel, tiled_image, _) = found["1x1"], found["3x3"]
    assert tiled_pixel >= 97.0 and tiled_pixel - whole_pixel >= 5.0, found
    assert tiled_image >= whole_image + 5.0, found


# --- where the setting lives ------------------------------------------------------------------------

def test_tiles_are_a_product_setting_stored_with_its_references(tmp_path):
    store = ReferenceStore(tmp_path)
    assert store.tiling("disc") == NO_TILES
    store.set_tiling("disc", Tiling.parse("2x3"))
    assert store.tiling("disc") == Tiling(2, 3)
    (store.root / "disc" / "config.json").write_text('{"tiles": "lots"}')
    with pytest.raises(ReferenceError, match="config.json"):
        store.tiling("disc")


def test_a_registry_bundle_keeps_the_tiling():
    sim = LineSimulator(products=("tile",), size=128, seed=1)
    model = InspectionModel(ModelConfig(device="cpu"))
    state = model.state_from_references("tile", sim.normal_references("tile", 1), Tiling.parse("2x2"))
    assert state.tiling == Tiling(2, 2) and state.memory.n_references == 4     # the memory holds tiles
    assert state_from_bytes(state_bytes(state)).tiling == Tiling(2, 2)
    model.states["tile"] = state
    assert model.needed_pixels("tile") == (600, 600)        # 2 tiles of 320 px sharing 1/8 of a tile


# --- in the worker ---------------------------------------------------------------------------------------

class _Watching:
    """The real model, noting the size of every image the worker hands it."""

    def __init__(self, inner):
        self.inner, self.shapes = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def set_references(self, product, images, tiling=None):   # the inner model holds these products already
        pass

    def score(self, frames):
        self.shapes.extend((f.image.shape[1], f.image.shape[0], f.size) for f in frames)
        return self.inner.score(frames)


def test_the_worker_decodes_5_mp_frames_at_model_resolution_and_answers_in_frame_pixels(settings, model):
    import asyncio

    from helpers import read_topic
    from worker_helpers import group

    from inference.outputs import HEATMAP_MAX_SIDE, OVERLAY_MAX_SIDE
    from inference.worker import InferenceWorker, WorkerConfig
    from ingest.publisher import encode_jpeg
    from lineguard.events import Heatmap, Verdict, encode_frame
    from lineguard.kafka import make_producer, start_client
    from lineguard.topics import FRAMES, HEATMAPS, VERDICTS

    width, height = 2448, 2048
    sim = LineSimulator(products=("disc",), seed=9)
    parts = [sim.part(i, "disc", kind) for i, kind in enumerate(["scratch", None, "missing_piece", None])]

    async def produce() -> None:
        producer = await start_client(settings, make_producer(settings))
        try:
            for i, part in enumerate(parts):
                jpeg, w, h = encode_jpeg(cv2.resize(part.image, (width, height), interpolation=cv2.INTER_CUBIC), 90)
                meta = FrameMeta(frame_id=f"big-{i}", line_id="l", camera_id="cam-0", product="disc", width=w,
                                 height=h, mm_per_px=0.05)
                value, headers = encode_frame(meta, jpeg)
                await producer.send_and_wait(settings.topic(FRAMES), value, key=b"cam-0", headers=headers)
        finally:
            await producer.stop()

    async def run(worker) -> None:
        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 120
        while worker.metrics.frames_total() < len(parts) and time.monotonic() < deadline:
            assert not task.done(), task.exception() if task.done() else None
            await asyncio.sleep(0.1)
        worker.stop()
        await asyncio.wait_for(task, 60)

    asyncio.run(produce())
    watching = _Watching(model)
    worker = InferenceWorker(settings, watching, WorkerConfig(max_batch=8, max_wait_ms=200, explain=False,
                                                              group_id=group(settings)))
    asyncio.run(run(worker))
    # lite0 needs 320 px: a 2448x2048 JPEG decodes at 1/4 (612x512), and the model knows the frame's size
    assert watching.shapes == [(612, 512, (width, height))] * len(parts)
    verdicts = [Verdict.from_bytes(r.value) for r in asyncio.run(read_topic(settings, VERDICTS, expect=len(parts)))]
    heatmaps = [Heatmap.from_bytes(r.value) for r in asyncio.run(read_topic(settings, HEATMAPS, expect=len(parts)))]
    flagged = [v for v in verdicts if v.is_anomalous]
    assert {v.frame_id for v in flagged} >= {"big-0", "big-2"}
    for verdict in flagged:
        assert verdict.regions
        for region in verdict.regions:           # frame pixels, and mm² from the frame's mm_per_px
            assert 0 <= region.x < region.x + region.w <= width and 0 <= region.y < region.y + region.h <= height
            assert region.area_mm2 == pytest.approx(region.area_px * 0.05**2, rel=1e-3)
    big = max(r.w * r.h for v in flagged for r in v.regions)
    assert big > 100 * 100, "regions are scaled to the 2448 px frame, not left at the model's 320 px"
    for heatmap in heatmaps:
        png = cv2.imdecode(np.frombuffer(heatmap.map_png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert png.shape == (round(HEATMAP_MAX_SIDE * height / width), HEATMAP_MAX_SIDE)   # the frame's shape
        if heatmap.overlay_jpeg is not None:
            overlay = cv2.imdecode(np.frombuffer(heatmap.overlay_jpeg, np.uint8), cv2.IMREAD_COLOR)
            assert overlay.shape[:2] == (round(OVERLAY_MAX_SIDE * height / width), OVERLAY_MAX_SIDE)
