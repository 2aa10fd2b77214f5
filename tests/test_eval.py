"""`lineguard eval` on a tiny MVTec-layout folder made here from simulated parts: greyscale and RGB
images of different sizes, masks for the defect types."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from deploy.app import app
from inference.eval import evaluate, parse_shots
from ingest.simulator import LineSimulator
from tests.test_encoders_clip import save_tiny_clip


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec") / "disc"
    sim = LineSimulator(products=("disc",), size=160, seed=3)
    sizes = [(160, 160), (200, 180), (128, 128)]

    def write(path, image, index):
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = sizes[index % len(sizes)]
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST if image.ndim == 2 else cv2.INTER_AREA)
        if index % 2 and image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)                    # greyscale files too
        cv2.imwrite(str(path), image)

    for i, image in enumerate(sim.normal_references("disc", 3)):
        write(root / "train" / "good" / f"{i:03d}.png", image, i)
    for i in range(3):
        write(root / "test" / "good" / f"{i:03d}.png", sim.part(50 + i, "disc", None).image, i)
    for defect in ("scratch", "missing_piece"):
        for i in range(3):
            part = sim.part(10 * i, "disc", defect)
            write(root / "test" / defect / f"{i:03d}.png", part.image, i)
            write(root / "ground_truth" / defect / f"{i:03d}_mask.png", part.mask, i)
    return root


def test_eval_command_prints_one_json_object(mvtec):
    result = CliRunner().invoke(app, ["eval", "--data", str(mvtec), "--shots", "1", "--seeds", "2",
                                      "--size", "128", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)                     # nothing but the object on stdout
    for key in ("image_auroc", "pixel_auroc", "accuracy", "location_accuracy"):
        assert 0.0 <= report[key] <= 100.0 and f"{key}_std" in report
    assert set(report["per_defect_type"]) == {"scratch", "missing_piece"}
    assert report["n_test"] == 9 and report["n_defective"] == 6 and report["shots"] == 1 and report["seeds"] == 2
    assert report["seconds"] > 0 and report["images_per_second"] > 0
    assert report["pixel_auroc"] > 80.0


def test_eval_all_shots_and_per_seed_runs(mvtec):
    report = evaluate(mvtec, shots="all", seeds=1, image_size=96, device="cpu")
    assert report["shots"] == "all" and report["runs"][0]["references"] == "all"
    assert report["runs"][0]["calibration"] in ("reshot", "held-out", "simulated", "balanced")


def test_eval_rejects_bad_shots(mvtec):
    assert parse_shots("all") is None and parse_shots("2") == 2
    with pytest.raises(ValueError):
        parse_shots(-1)
    with pytest.raises(ValueError):
        evaluate(mvtec, shots=5, image_size=96, device="cpu")   # only 3 normal training images
    result = CliRunner().invoke(app, ["eval", "--data", str(mvtec), "--shots", "0", "--size", "96",
                                      "--device", "cpu"])
    assert result.exit_code != 0                               # zero-shot needs a text tower
    assert "text tower" in result.output


def test_masks_follow_image_size(mvtec):
    from inference.eval import read_image, read_mask, test_set

    for item in test_set(mvtec):
        image = read_image(item.path)
        mask = read_mask(item, image.shape[:2])
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        assert mask.any() == (item.defect_type != "good")
    assert np.unique([read_image(t.path).ndim for t in test_set(mvtec)]).tolist() == [2, 3]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_eval_zero_shot_with_a_text_tower_encoder(mvtec, clip_dir):
    result = CliRunner().invoke(app, ["eval", "--data", str(mvtec), "--shots", "0", "--encoder", f"clip:{clip_dir}",
                                      "--device", "cpu", "--json", "--runs"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["encoder"] == f"clip:{clip_dir}" and report["shots"] == 0
    assert report["image_size"] == 32                      # the tiny CLIP's own input side, not the CNN's 320
    [run] = report["runs"]
    assert run["references"] == [] and run["calibration"] == "zero-shot" and run["threshold"] == 0.5
    for key in ("image_auroc", "pixel_auroc", "accuracy", "location_accuracy"):
        assert 0.0 <= report[key] <= 100.0
    assert set(report["per_defect_type"]) == {"scratch", "missing_piece"}
    assert report["n_test"] == 9 and report["images_per_second"] > 0


def test_eval_uses_the_encoder_it_is_given(mvtec, clip_dir, monkeypatch):
    import inference.eval as eval_module

    built = []

    class Spy(eval_module.InspectionModel):
        def __init__(self, config):
            super().__init__(config)
            built.append(self)

    monkeypatch.setattr(eval_module, "InspectionModel", Spy)
    result = CliRunner().invoke(app, ["eval", "--data", str(mvtec), "--shots", "1", "--encoder",
                                      f"clip:{clip_dir}@1,2,3,4", "--size", "64", "--device", "cpu", "--json",
                                      "--runs"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    [model] = built
    assert type(model.encoder).__name__ == "ClipEncoder" and model.encoder.layers == (1, 2, 3, 4)
    assert model.encoder.has_text and model.encoder.image_size == 64 == report["image_size"]
    assert report["encoder"] == f"clip:{clip_dir}@1,2,3,4" and report["runs"][0]["calibration"] != "held-out"
    assert len(report["runs"][0]["references"]) == 1


def test_eval_zero_shot_without_a_text_tower_is_a_clear_error(mvtec):
    result = CliRunner().invoke(app, ["eval", "--data", str(mvtec), "--shots", "0", "--encoder", "random:vit-tiny",
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 2
    assert result.stdout == ""                             # no half-written JSON object
    assert result.stderr.startswith("error: ") and "zero-shot needs an encoder with a text tower" in result.stderr
    assert "Traceback" not in result.output


def test_eval_over_a_folder_of_categories_and_several_data_options(mvtec, tmp_path):
    import shutil

    parent = tmp_path / "set"
    shutil.copytree(mvtec, parent / "disc")
    shutil.copytree(mvtec, parent / "disc_copy")
    (parent / "notes").mkdir()                                    # not a category: ignored
    result = CliRunner().invoke(app, ["eval", "--data", str(parent), "--shots", "1", "--size", "96",
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(report["categories"]) == ["set/disc", "set/disc_copy"] and report["n_categories"] == 2
    one, two = report["categories"].values()
    for name in ("image_auroc", "balanced_accuracy", "recall", "false_alarm_rate", "best_balanced_accuracy",
                 "threshold_gap", "confidence_ece"):
        assert report["mean"][name] == pytest.approx((one[name] + two[name]) / 2, abs=0.011)
    assert one["n_test"] == two["n_test"] == 9 and one["product"] == "disc" and two["product"] == "disc_copy"
    again = CliRunner().invoke(app, ["eval", "--data", str(parent / "disc"), "--data", str(mvtec), "--shots", "1",
                                     "--size", "96", "--device", "cpu"])
    assert again.exit_code == 0 and len(json.loads(again.stdout)["categories"]) == 2
    bad = CliRunner().invoke(app, ["eval", "--data", str(parent / "notes"), "--device", "cpu"])
    assert bad.exit_code == 2 and "neither an MVTec-layout category" in bad.output


def test_eval_reports_the_verdict_against_the_best_threshold(mvtec):
    report = evaluate(mvtec, shots=2, seeds=2, image_size=96, device="cpu")
    for run in report["runs"]:
        assert run["best_balanced_accuracy"] >= run["balanced_accuracy"]
        assert run["threshold_gap"] == pytest.approx(run["best_balanced_accuracy"] - run["balanced_accuracy"])
        assert run["balanced_accuracy"] == pytest.approx((run["recall"] + 100 - run["false_alarm_rate"]) / 2)
    for name in ("balanced_accuracy", "recall", "false_alarm_rate", "best_balanced_accuracy", "threshold_gap"):
        assert f"{name}_std" in report


def test_the_threshold_never_reads_the_test_set(mvtec, tmp_path):
    """Replace every test image (good ones by defective ones and back): the thresholds stay the same."""
    import shutil

    changed = tmp_path / "disc"
    shutil.copytree(mvtec, changed)
    defective = sorted((changed / "test" / "scratch").iterdir())
    good = sorted((changed / "test" / "good").iterdir())
    for a, b in zip(defective, good, strict=False):
        swap = a.read_bytes()
        a.write_bytes(b.read_bytes())
        b.write_bytes(swap)
    for path in (changed / "test" / "missing_piece").iterdir():
        cv2.imwrite(str(path), 255 - cv2.imread(str(path)))
    for shots in (1, 2):
        original = evaluate(mvtec, shots=shots, seeds=1, image_size=96, device="cpu")
        swapped = evaluate(changed, shots=shots, seeds=1, image_size=96, device="cpu")
        assert [r["threshold"] for r in original["runs"]] == [r["threshold"] for r in swapped["runs"]]
        assert original["image_auroc"] != swapped["image_auroc"]      # the test set did change
