"""Frame sources: folders (plain and MVTec), videos, streams, the simulator, and dispatch."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from ingest.simulator import LineSimulator
from ingest.sources import (
    FolderSource,
    SimulatorSource,
    SourceError,
    SourceFrame,
    VideoSource,
    open_source,
)


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def _image(seed: int, shape=(48, 64, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    """A tiny MVTec-style tree: bottle/{train/good, test/good, test/scratch, ground_truth/scratch}."""
    root = tmp_path / "mvtec-ad" / "bottle"
    _write(root / "train" / "good" / "000.png", _image(0))
    _write(root / "train" / "good" / "001.png", _image(1))
    _write(root / "test" / "good" / "000.png", _image(2))
    _write(root / "test" / "scratch" / "000.png", _image(3))
    _write(root / "test" / "scratch" / "001.png", _image(4))
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 30:40] = 255
    _write(root / "ground_truth" / "scratch" / "000_mask.png", mask)  # 001 has no mask
    (root / "license.txt").write_text("not an image")
    return root


def _decode_mask(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)


def test_mvtec_tree_gives_products_ground_truth_and_masks(mvtec):
    frames = list(FolderSource(mvtec).frames())
    names = [Path(f.source).relative_to(mvtec).as_posix() for f in frames]
    assert names == ["test/good/000.png", "test/scratch/000.png", "test/scratch/001.png",
                     "train/good/000.png", "train/good/001.png"]  # sorted, masks not among them
    assert {f.product for f in frames} == {"bottle"}
    assert all(f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 for f in frames)
    truth = {name: f.ground_truth for name, f in zip(names, frames, strict=True)}
    assert truth["train/good/000.png"].is_defect is False
    assert truth["test/good/000.png"].is_defect is False
    assert truth["test/good/000.png"].defect_type is None
    scratched = truth["test/scratch/000.png"]
    assert scratched.is_defect and scratched.defect_type == "scratch"
    mask = _decode_mask(scratched.mask_png)
    assert mask.shape == (48, 64) and set(np.unique(mask)) == {0, 255}
    assert mask[15, 35] == 255 and mask[0, 0] == 0
    assert truth["test/scratch/001.png"].is_defect and truth["test/scratch/001.png"].mask_png is None


@pytest.mark.parametrize("inner", ["test", "test/scratch", "test/scratch/000.png"])
def test_mvtec_subfolder_finds_its_root(mvtec, inner):
    frames = list(FolderSource(mvtec / inner).frames())
    assert frames and all(f.product == "bottle" for f in frames)
    scratched = [f for f in frames if f.source.endswith("scratch/000.png")][0]
    assert scratched.ground_truth.defect_type == "scratch"
    assert _decode_mask(scratched.ground_truth.mask_png).shape == (48, 64)


def test_folder_above_mvtec_products(mvtec):
    _write(mvtec.parent / "cable" / "test" / "good" / "000.png", _image(9))
    frames = list(FolderSource(mvtec.parent).frames())
    assert {f.product for f in frames} == {"bottle", "cable"}


def test_explicit_product_overrides_the_folder_name(mvtec):
    assert {f.product for f in FolderSource(mvtec, product="flask").frames()} == {"flask"}


def test_plain_folder_recursive_sorted_and_greyscale_to_bgr(tmp_path):
    folder = tmp_path / "shots"
    grey = np.full((20, 30), 77, np.uint8)
    _write(folder / "b.png", grey)
    _write(folder / "a.jpg", _image(5, (20, 30, 3)))
    _write(folder / "sub" / "c.bmp", _image(6, (20, 30, 3)))
    (folder / "notes.txt").write_text("skip me")
    source = FolderSource(folder)
    frames = list(source.frames())
    assert [Path(f.source).name for f in frames] == ["a.jpg", "b.png", "c.bmp"]
    assert {f.product for f in frames} == {"shots"}
    assert all(f.ground_truth is None for f in frames)
    b = frames[1].image
    assert b.shape == (20, 30, 3) and b.dtype == np.uint8 and (b == 77).all()
    assert FolderSource(folder, product="tile").product == "tile"
    assert len(list(source.frames())) == 3  # a fresh pass each call


def test_corrupt_jpeg_is_skipped_and_listed(tmp_path):
    folder = tmp_path / "line"
    _write(folder / "000.png", _image(7))
    bad = folder / "001.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (folder / "002.png").write_bytes(b"")
    _write(folder / "003.png", _image(8))
    source = FolderSource(folder)
    frames = list(source.frames())
    assert [Path(f.source).name for f in frames] == ["000.png", "003.png"]
    assert [Path(path).name for path, _ in source.skipped] == ["001.jpg", "002.png"]
    assert all(reason for _, reason in source.skipped)
    list(source.frames())  # looping does not count the same bad file twice
    assert len(source.skipped) == 2


def test_missing_and_unreadable_paths_raise_naming_them(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SourceError, match=re.escape(f"path not found: {missing}")):
        FolderSource(missing)
    with pytest.raises(SourceError, match="path not found: .*nowhere"):
        open_source(str(missing))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(SourceError, match=re.escape(f"cannot read image: {bad}")):
        FolderSource(bad)
    with pytest.raises(SourceError, match="cannot read image: .*broken.png"):
        open_source(str(bad))
    with pytest.raises(SourceError, match="path not found: .*missing.avi"):
        VideoSource(str(tmp_path / "missing.avi"), product="disc")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no images found"):
        FolderSource(empty)


def test_single_image_file(tmp_path):
    path = _write(tmp_path / "parts" / "x.png", _image(1))
    frames = list(FolderSource(path).frames())
    assert len(frames) == 1 and frames[0].product == "parts" and frames[0].source == str(path)


def _video(path: Path, n: int, size=(64, 48)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened()
    for i in range(n):
        frame = np.full((size[1], size[0], 3), 20 * i, np.uint8)
        writer.write(frame)
    writer.release()
    return path


def test_video_file_read_back_frame_by_frame(tmp_path):
    path = _video(tmp_path / "line.avi", 7)
    source = VideoSource(str(path), product="disc")
    frames = list(source.frames())
    assert len(frames) == 7
    assert all(isinstance(f, SourceFrame) and f.image.shape == (48, 64, 3) for f in frames)
    assert [int(round(f.image.mean() / 20)) for f in frames] == list(range(7))
    assert frames[0].product == "disc" and frames[0].source == str(path)
    assert len(list(source.frames())) == 7  # the next pass starts again from the beginning


def test_unopenable_stream_raises_naming_it():
    url = "rtsp://127.0.0.1:9/nothing"
    with pytest.raises(SourceError, match=re.escape(f"cannot open stream: {url}")):
        VideoSource(url, product="disc", open_timeout_s=2)


def test_simulator_source_frames_carry_ground_truth():
    source = SimulatorSource(LineSimulator(defect_rate=0.5, seed=2, size=128))
    frames = list(itertools.islice(source.frames(), 12))
    assert len(frames) == 12 and source.skipped == []
    assert all(f.source == "simulator" and f.image.shape == (128, 128, 3) for f in frames)
    assert [f.product for f in frames[:2]] == ["disc", "tile"]
    assert all(f.mm_per_px and f.mm_per_px > 0 for f in frames)
    defective = [f for f in frames if f.ground_truth.is_defect]
    assert defective and len(defective) < 12
    for frame in frames:
        mask = _decode_mask(frame.ground_truth.mask_png)
        assert mask.shape == (128, 128)
        assert mask.any() == frame.ground_truth.is_defect
    # a fresh pass replays the same line
    again = next(iter(source.frames()))
    assert np.array_equal(again.image, frames[0].image)


def test_open_source_dispatch(tmp_path, mvtec):
    assert isinstance(open_source("simulator"), SimulatorSource)
    sim = open_source("sim", product="tile", seed=5, size=64, defect_rate=0.0)
    frame = next(iter(sim.frames()))
    assert frame.product == "tile" and frame.image.shape == (64, 64, 3) and not frame.ground_truth.is_defect
    assert isinstance(open_source(str(mvtec)), FolderSource)
    assert isinstance(open_source(str(mvtec / "test" / "good" / "000.png")), FolderSource)
    assert isinstance(open_source(str(_video(tmp_path / "v.avi", 2))), VideoSource)
    with pytest.raises(SourceError, match="cannot open stream: rtsp://127.0.0.1:9/x"):
        open_source("rtsp://127.0.0.1:9/x")
    with pytest.raises(SourceError, match="simulator: unknown product"):
        open_source("simulator", product="bottle")
