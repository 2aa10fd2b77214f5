"""Evaluate the model on an MVTec-layout folder: train/good, test/<type>, ground_truth/<type>/<id>_mask.png.

For each seed, k references are drawn from train/good (k = 0 zero-shot, "all" = unsupervised), the
threshold is derived from them alone, and every test image is scored in batches. Metrics come from
`inference.metrics`, the module the training job uses too.

Example:
    >>> result = evaluate(Path("mvtec-ad/bottle"), shots=1, seeds=3)
    >>> sorted(result)[:4]
    ['accuracy', 'accuracy_std', 'confidence_ece', 'encoder']
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from . import metrics
from .model.api import InspectionModel, ModelConfig
from .model.encoders import EncoderConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
# reported per seed and as mean ± std; the verdict's figures are those of the automatic threshold, and
# best_balanced_accuracy (any threshold, chosen on the test labels) is an upper bound for reference only
METRICS = ("image_auroc", "pixel_auroc", "accuracy", "balanced_accuracy", "recall", "false_alarm_rate",
           "best_balanced_accuracy", "threshold_gap", "location_accuracy", "confidence_ece")


@dataclass
class TestImage:
    path: Path
    defect_type: str            # "good" for normal images
    mask_path: Path | None


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def read_image(path: Path) -> np.ndarray:
    """Grey, RGB or RGBA file -> (H, W) grey or (H, W, 3) BGR uint8 (16-bit scaled down)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot read image {path}")
    if image.dtype == np.uint16:
        image = (image / 257).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def read_mask(test: TestImage, shape: tuple[int, int]) -> np.ndarray:
    """Ground truth at the image's resolution: (H, W) bool, all False for good images."""
    if test.mask_path is None:
        return np.zeros(shape, bool)
    mask = cv2.imread(str(test.mask_path), cv2.IMREAD_GRAYSCALE)
    if mask.shape != shape:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return mask > 127


def test_set(root: Path) -> list[TestImage]:
    items = []
    for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        for path in list_images(folder):
            mask = None
            if folder.name != "good":
                candidate = root / "ground_truth" / folder.name / f"{path.stem}_mask.png"
                mask = candidate if candidate.exists() else None
            items.append(TestImage(path, folder.name, mask))
    if not items:
        raise ValueError(f"{root}/test holds no images")
    return items


def parse_shots(shots: int | str) -> int | None:
    """0, 1, 2, ... or "all" (None)."""
    if isinstance(shots, str):
        if shots.strip().lower() == "all":
            return None
        shots = int(shots)
    if shots < 0:
        raise ValueError("shots must be >= 0 or 'all'")
    return shots


def evaluate(root: Path, shots: int | str = 1, seeds: int = 1, encoder: str = "efficientnet-lite0",
             image_size: int | None = None, device: str = "auto", batch_size: int = 16,
             model: InspectionModel | None = None) -> dict:
    """Metrics on one MVTec-layout category, mean over seeds (with `<metric>_std`, and per seed)."""
    root = Path(root)
    k = parse_shots(shots)
    train = list_images(root / "train" / "good")
    if k is not None and k > len(train):
        raise ValueError(f"{k} shots asked, {root}/train/good has {len(train)} images")
    tests = test_set(root)
    started = time.perf_counter()
    images = [read_image(t.path) for t in tests]
    masks = [read_mask(t, image.shape[:2]) for t, image in zip(tests, images, strict=True)]
    labels = np.array([t.defect_type != "good" for t in tests])
    model = model or build_model(encoder, image_size, device, batch_size)
    product = root.name
    runs = []
    scoring_seconds = 0.0
    for seed in range(seeds):
        chosen = sorted(np.random.default_rng(seed).choice(len(train), k, replace=False)) if k else []
        references = [read_image(train[i]) for i in chosen] if k is not None else [read_image(p) for p in train]
        calibration = model.set_references(product, references)
        t0 = time.perf_counter()
        scored = model.score([(product, image) for image in images])
        scoring_seconds += time.perf_counter() - t0
        scores = np.array([s.verdict.score for s in scored])
        decided = metrics.verdict_metrics(labels, [s.verdict.is_anomalous for s in scored])
        best = metrics.best_balanced_accuracy(labels, scores)
        runs.append({
            "seed": seed,
            "references": [train[i].name for i in chosen] if k is not None else "all",
            "threshold": calibration.threshold,
            "calibration": calibration.method,
            "image_auroc": metrics.image_auroc(labels, scores),
            "pixel_auroc": metrics.pixel_auroc(masks, [at_mask_size(s.anomaly_map, m) for s, m in zip(scored, masks,
                                                                                                   strict=True)]),
            "accuracy": metrics.accuracy(labels, [s.verdict.is_anomalous for s in scored]),
            **decided,
            "best_balanced_accuracy": best,
            "threshold_gap": best - decided["balanced_accuracy"],
            "location_accuracy": metrics.location_accuracy(masks, [s.verdict.positions for s in scored]),
            "confidence_ece": metrics.expected_calibration_error(
                labels, [calibration.probability(s) for s in scores]),
            "per_defect_type": metrics.per_defect_type_auroc([t.defect_type for t in tests], scores),
        })
    seconds = time.perf_counter() - started
    result: dict = {"data": str(root), "product": product, "shots": "all" if k is None else k,
                    "seeds": seeds, "encoder": encoder, "image_size": model.encoder.image_size,
                    "device": str(model.device)}
    for name in METRICS:
        mean, std = metrics.mean_std([r[name] for r in runs])
        result[name], result[f"{name}_std"] = round(mean, 2), round(std, 2)
    types = sorted(runs[0]["per_defect_type"])
    result["per_defect_type"] = {t: round(metrics.mean_std([r["per_defect_type"][t] for r in runs])[0], 2)
                                 for t in types}
    result["n_test"] = len(tests)
    result["n_defective"] = int(labels.sum())
    result["seconds"] = round(seconds, 2)
    result["images_per_second"] = round(len(tests) * seeds / max(scoring_seconds, 1e-9), 2)
    result["runs"] = [{key: (round(v, 4) if isinstance(v, float) else v) for key, v in r.items()}
                      for r in runs]
    return result


def at_mask_size(anomaly_map: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The model-resolution map, bilinearly upsampled to its ground-truth mask's pixels."""
    if anomaly_map.shape == mask.shape:
        return anomaly_map
    return cv2.resize(anomaly_map, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_LINEAR)


def build_model(encoder: str = "efficientnet-lite0", image_size: int | None = None, device: str = "auto",
                batch_size: int = 16) -> InspectionModel:
    return InspectionModel(ModelConfig(encoder=EncoderConfig.parse(encoder, image_size=image_size), device=device,
                                       batch_size=batch_size))


def is_category(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def categories(folders: list[Path]) -> list[Path]:
    """Each `--data` folder is a category (train/ and test/ inside) or a folder of categories."""
    found = []
    for folder in map(Path, folders):
        if is_category(folder):
            found.append(folder)
            continue
        inside = sorted(p for p in folder.iterdir() if p.is_dir() and is_category(p)) if folder.is_dir() else []
        if not inside:
            raise ValueError(f"{folder} is neither an MVTec-layout category (train/, test/) nor a folder of them")
        found.extend(inside)
    return found


def evaluate_many(folders: list[Path], **kwargs) -> dict:
    """One result per category (keyed by its path relative to the common parent) and the mean over them."""
    roots = categories(folders)
    if len(roots) == 1 and len(folders) == 1 and is_category(Path(folders[0])):
        return evaluate(roots[0], **kwargs)
    model = kwargs.pop("model", None) or build_model(kwargs.get("encoder", "efficientnet-lite0"),
                                                     kwargs.get("image_size"), kwargs.get("device", "auto"),
                                                     kwargs.get("batch_size", 16))
    results = {f"{root.parent.name}/{root.name}": evaluate(root, model=model, **kwargs) for root in roots}
    first = next(iter(results.values()))
    mean = {name: round(float(np.mean([r[name] for r in results.values()])), 2) for name in METRICS}
    return {"categories": results, "mean": mean, "n_categories": len(results), "shots": first["shots"],
            "seeds": first["seeds"], "encoder": first["encoder"], "device": first["device"],
            "seconds": round(sum(r["seconds"] for r in results.values()), 2)}
