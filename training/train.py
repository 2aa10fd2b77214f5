"""`lineguard train`: a candidate model version per product from operators' labels, judged by an evaluation gate.

For each product with labels newer than those its last registered version was built from (or all its labels,
when it has no version yet):

1. the labels (`storage.labels.training_examples`, the latest label per frame) are split by time: the newest
   `holdout` share (25 %) is never fitted on;
2. the candidate learns from the older labels (`training.learn.learn`: frames labelled good widen the normal
   memory, the threshold is re-derived from the labelled scores);
3. the gate scores the held-out labels with the current version and the candidate, and both on the product's
   references (false alarms) and on simulated anomalies made from them (recall that no label can fake):
   the candidate is promoted only if its balanced accuracy on the held-out labels gains at least
   `min_gain` points and no recall or false-alarm rate is worse by more than `tolerance` points;
4. the candidate is registered (`inference.registry`) as `candidate` and promoted, or `rejected` with the
   reasons; a promotion publishes `ModelUpdate(kind="model_released")`, and every worker installs the
   version at its next batch boundary;
5. a report per product: JSON, a Markdown summary and a PNG of both versions' scores against their thresholds.

    >>> results = train(settings, storage_settings)             # every product with new labels
    >>> results[0].decision, results[0].reasons
    ('promoted', [])

`--nightly` does nothing (and says so) when no product has new labels; a lock file keeps two runs apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from inference import metrics
from inference.registry import ModelRegistry, ModelVersion
from lineguard.logging import get_logger
from lineguard.settings import Settings
from storage.labels import TrainingExample, training_examples
from storage.masks import MaskError, decode_mask
from storage.records import RecordStore
from storage.settings import StorageSettings

from .learn import Labelled, LearnConfig, learn, score_with

log = get_logger(__name__)


@dataclass
class GateConfig:
    holdout: float = 0.25        # the newest share of a product's labels, never fitted on
    min_gain: float = 1.0        # balanced-accuracy points the candidate must add on the held-out labels
    tolerance: float = 2.0       # points of recall or false-alarm rate it may lose
    simulated_tolerance: float = 10.0   # points of recall on the simulated anomalies (16 of them: one miss is 6)
    min_labels: int = 4          # fewer labels: no candidate
    simulated: int = 16          # simulated anomalies made from the references (a recall labels cannot fake)


class TrainingLocked(RuntimeError):
    """Another `lineguard train` holds the lock."""


@dataclass
class ProductResult:
    product: str
    decision: str                # "promoted", "rejected", "dry-run: would promote", "skipped: ..."
    reasons: list[str] = field(default_factory=list)
    version: str | None = None
    parent: str | None = None
    labels_fitted: int = 0
    labels_held_out: int = 0
    current: dict = field(default_factory=dict)
    candidate: dict = field(default_factory=dict)
    report: str | None = None


# --- the gate --------------------------------------------------------------------------------------

def evaluate(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Verdict metrics of scores at a threshold (NaN where a class is absent)."""
    if scores.size == 0:
        return {"recall": math.nan, "false_alarm_rate": math.nan, "balanced_accuracy": math.nan}
    return metrics.verdict_metrics(labels, scores > threshold)


def _accuracy(result: dict[str, float]) -> float:
    """Balanced accuracy, or the one class's accuracy when the held-out labels have one class."""
    recall, false_alarms = result["recall"], result["false_alarm_rate"]
    parts = [x for x in (recall, None if math.isnan(false_alarms) else 100.0 - false_alarms)
             if x is not None and not math.isnan(x)]
    return float(np.mean(parts)) if parts else math.nan


def judge(current: dict, candidate: dict, config: GateConfig) -> list[str]:
    """Reasons to reject the candidate ([] = promote). `current` / `candidate`: {"held_out", "references",
    "simulated"} metric dicts."""
    reasons = []
    before, after = _accuracy(current["held_out"]), _accuracy(candidate["held_out"])
    if math.isnan(before) or math.isnan(after):
        reasons.append("no held-out labels to judge on")
    elif after - before < config.min_gain:
        reasons.append(f"held-out balanced accuracy {before:.1f} -> {after:.1f} ({after - before:+.1f}; "
                       f"needs {config.min_gain:+.1f})")
    for where in ("held_out", "references", "simulated"):
        for key, worse in (("recall", -1), ("false_alarm_rate", +1)):
            a, b = current[where].get(key, math.nan), candidate[where].get(key, math.nan)
            if math.isnan(a) or math.isnan(b):
                continue
            tolerance = config.simulated_tolerance if where == "simulated" else config.tolerance
            if (b - a) * worse > tolerance:
                reasons.append(f"{where.replace('_', '-')} {key.replace('_', ' ')} {a:.1f} -> {b:.1f} "
                               f"(tolerance {tolerance:.1f})")
    return reasons


# --- one product -----------------------------------------------------------------------------------

def _artifact_image(store: RecordStore, uri: str | None, flags: int) -> np.ndarray | None:
    """A stored image decoded with cv2 `flags`; None when there is none (never stored, or purged)."""
    if not uri:
        return None
    try:
        data = store.artifacts.get(uri)
    except Exception:  # noqa: BLE001 - a purged artifact: the label teaches without it, or not at all
        return None
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def _image(store: RecordStore, example: TrainingExample) -> np.ndarray | None:
    return _artifact_image(store, example.image_uri, cv2.IMREAD_COLOR)   # BGR, as the worker decodes frames


def _mask(store: RecordStore, example: TrainingExample) -> np.ndarray | None:
    """The operator's mask of a frame labelled defective (True where the defect is), when one was drawn; else
    the verdict's regions stand in for it (training/learn.py)."""
    if not example.is_defect or not example.mask_uri:
        return None
    try:   # the label API's decoder and pixel limit: a stored mask is never decoded unchecked
        mask = decode_mask(store.artifacts.get(example.mask_uri))
    except MaskError as exc:
        log.warning("label_mask_refused", frame_id=example.frame_id, error=str(exc))
        return None
    except Exception:  # noqa: BLE001 - a purged artifact: the verdict's regions stand in
        return None
    return mask > 0 if mask.any() else None


def _split(examples: list[TrainingExample], holdout: float) -> tuple[list, list]:
    """(fit, held out): the newest `holdout` share, by label time, is held out (at least one when >= 2)."""
    ordered = sorted(examples, key=lambda e: (e.labeled_at, e.frame_id))
    n_out = min(len(ordered) - 1, max(1, math.ceil(holdout * len(ordered)))) if len(ordered) >= 2 else 0
    return ordered[:len(ordered) - n_out], ordered[len(ordered) - n_out:]


def train_product(model, product: str, examples: list[TrainingExample], store: RecordStore,
                  registry: ModelRegistry, *, gate: GateConfig, learn_config: LearnConfig | None = None,
                  dry_run: bool = False, report_dir: Path | None = None, seed: int = 0) -> ProductResult:
    """Build, judge and register (or, dry run, only judge) one product's candidate. `model` holds the
    product's current state (its live version, or its references)."""
    from inference.model.synthetic import simulate_anomaly

    current_state = model.states[product]
    parent = getattr(current_state, "version", None)
    labelled = [(e, image) for e in examples if (image := _image(store, e)) is not None]
    if len(labelled) < gate.min_labels:
        return ProductResult(product, f"skipped: {len(labelled)} labels with images (needs {gate.min_labels})",
                             parent=parent)
    fit, held_out = _split([e for e, _ in labelled], gate.holdout)
    images = {e.frame_id: image for e, image in labelled}
    candidate = learn(model, product, [Labelled(images[e.frame_id], e.is_defect, _mask(store, e)) for e in fit],
                      learn_config, seed=seed)

    held_images = [images[e.frame_id] for e in held_out]
    held_labels = np.array([e.is_defect for e in held_out], bool)
    rng = np.random.default_rng(seed)
    references = list(current_state.references)
    simulated = [simulate_anomaly(references[i % len(references)], rng)[0] for i in range(gate.simulated)] \
        if references and gate.simulated else []
    sets = {"held_out": (held_images, held_labels), "references": (references, np.zeros(len(references), bool)),
            "simulated": (simulated, np.ones(len(simulated), bool))}
    scores: dict[str, dict[str, np.ndarray]] = {"current": {}, "candidate": {}}
    results: dict[str, dict] = {"current": {}, "candidate": {}}
    for name, state in (("current", current_state), ("candidate", candidate.state)):
        for where, (pixels, labels) in sets.items():
            scores[name][where] = score_with(model, product, state, pixels)
            results[name][where] = evaluate(scores[name][where], labels, state.calibration.threshold)
        results[name]["threshold"] = state.calibration.threshold
    reasons = judge(results["current"], results["candidate"], gate)
    lineage = {"parent": parent, "label_ids": [e.frame_id for e in fit],
               "held_out_ids": [e.frame_id for e in held_out],
               "labels_until": max(e.labeled_at for e in examples).isoformat(), "method": candidate.method,
               "code_version": model.version, "trained_at": datetime.now(UTC).isoformat()}
    result = ProductResult(product, "", reasons, parent=parent, labels_fitted=len(fit),
                           labels_held_out=len(held_out), current=results["current"], candidate=results["candidate"])
    if dry_run:
        result.decision = "dry-run: would reject" if reasons else "dry-run: would promote"
    else:
        version = registry.register(product, candidate.state, model.version, parent=parent,
                                    metrics={"current": results["current"], "candidate": results["candidate"],
                                             "reasons": reasons}, lineage=lineage,
                                    status="rejected" if reasons else "candidate", note="; ".join(reasons))
        result.version = version.version
        if reasons:
            result.decision = "rejected"
        else:
            registry.promote(version.version)
            result.decision = "promoted"
    if report_dir is not None:
        result.report = str(write_report(report_dir, result, scores, held_labels))
    log.info("training_product_done", product=product, decision=result.decision, version=result.version,
             fitted=len(fit), held_out=len(held_out), reasons=reasons)
    return result


# --- reports ---------------------------------------------------------------------------------------

def write_report(folder: Path, result: ProductResult, scores: dict, held_labels: np.ndarray) -> Path:
    """<folder>/<product>-<time>.json, .md and .png; returns the JSON path."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{result.product}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    stem.with_suffix(".json").write_text(json.dumps(asdict(result) | {"report": None}, indent=2, default=str))
    rows = []
    for where in ("held_out", "references", "simulated"):
        for key in ("balanced_accuracy", "recall", "false_alarm_rate"):
            a, b = result.current.get(where, {}).get(key), result.candidate.get(where, {}).get(key)
            rows.append(f"| {where} | {key} | {_fmt(a)} | {_fmt(b)} |")
    stem.with_suffix(".md").write_text("\n".join([
        f"# Training report: {result.product}",
        "",
        f"Decision: **{result.decision}**" + (f" ({result.version})" if result.version else "")
        + f"; parent {result.parent or 'the references'}; {result.labels_fitted} labels fitted, "
        f"{result.labels_held_out} held out (the newest).",
        "",
        *(f"- {reason}" for reason in result.reasons),
        "",
        f"Thresholds: current {_fmt(result.current.get('threshold'), 4)}, "
        f"candidate {_fmt(result.candidate.get('threshold'), 4)}.",
        "",
        "| set | metric | current | candidate |",
        "|---|---|---|---|",
        *rows,
        "",
        f"![scores]({stem.with_suffix('.png').name})",
        "",
    ]))
    cv2.imwrite(str(stem.with_suffix(".png")), score_chart(scores, held_labels, result))
    return stem.with_suffix(".json")


def _fmt(value, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def score_chart(scores: dict, held_labels: np.ndarray, result: ProductResult, width: int = 900) -> np.ndarray:
    """Two strips (current, candidate): held-out scores as dots (green = labelled good, red = defect),
    simulated anomalies as grey ticks, the threshold as a blue line, on one log axis."""
    strip, margin = 120, 60
    canvas = np.full((2 * strip + 2 * margin, width, 3), 255, np.uint8)
    every = np.concatenate([np.ravel(v) for side in scores.values() for v in side.values()]
                           + [[result.current.get("threshold", 1.0), result.candidate.get("threshold", 1.0)]])
    every = every[np.isfinite(every) & (every > 0)]
    low, high = (np.log10(every.min()), np.log10(every.max())) if every.size else (-2.0, 0.0)
    high = max(high, low + 1e-3)

    def x_of(value: float) -> int:
        return int(margin + (np.log10(max(value, 1e-12)) - low) / (high - low) * (width - 2 * margin))

    for row, name in enumerate(("current", "candidate")):
        top = margin // 2 + row * (strip + margin)
        cv2.putText(canvas, name, (8, top + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.line(canvas, (margin, top + strip - 10), (width - margin, top + strip - 10), (0, 0, 0), 1)
        rng = np.random.default_rng(row)
        for value in scores[name].get("simulated", []):
            x = x_of(float(value))
            cv2.line(canvas, (x, top + strip - 18), (x, top + strip - 10), (150, 150, 150), 1)
        for value, is_defect in zip(scores[name].get("held_out", []), held_labels, strict=False):
            y = top + 25 + int(rng.integers(0, strip - 50))
            cv2.circle(canvas, (x_of(float(value)), y), 4, (40, 40, 220) if is_defect else (40, 160, 40), -1)
        threshold = result.current.get("threshold") if name == "current" else result.candidate.get("threshold")
        if threshold:
            x = x_of(float(threshold))
            cv2.line(canvas, (x, top), (x, top + strip - 10), (220, 90, 0), 2)
    for tick in np.arange(np.floor(low), np.ceil(high) + 1):
        x = x_of(10 ** tick)
        if margin <= x <= width - margin:
            cv2.putText(canvas, f"1e{int(tick)}", (x - 12, canvas.shape[0] - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


# --- the run ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def training_lock(state_dir: Path):
    """An exclusive lock on <state_dir>/train.lock; raises TrainingLocked when another run holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "train.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingLocked(f"another `lineguard train` is running (lock {state_dir / 'train.lock'})") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _trained_until(versions: list[ModelVersion]) -> datetime | None:
    """The newest label any registered version (promoted or rejected) was built from: labels after it are new.
    A rejected run counts too, so a nightly run does not rebuild the same candidate from the same labels."""
    seen = [datetime.fromisoformat(v.lineage["labels_until"]) for v in versions if v.lineage.get("labels_until")]
    return max(seen, default=None)


def plan(store: RecordStore, registry: ModelRegistry, *, product: str | None = None,
         since: datetime | None = None) -> dict[str, list[TrainingExample]]:
    """{product: its labels} for every product with a label newer than its live version's (or `since`)."""
    examples = training_examples(store, product=product)
    by_product: dict[str, list[TrainingExample]] = {}
    for example in examples:
        by_product.setdefault(example.product, []).append(example)
    todo = {}
    for name, items in sorted(by_product.items()):
        cutoff = since or _trained_until(registry.versions(name))
        if cutoff is None or any(e.labeled_at > cutoff for e in items):
            todo[name] = items
    return todo


def train(settings: Settings, storage_settings: StorageSettings, *, model=None, product: str | None = None,
          since: datetime | None = None, dry_run: bool = False, gate: GateConfig | None = None,
          learn_config: LearnConfig | None = None, report_dir: Path | None = None,
          publish: bool = True, progress=None) -> list[ProductResult]:
    """The whole run (see the module docstring). `model` defaults to the workers' default model; a promotion
    publishes a ModelUpdate on the broker unless `publish` is False."""
    from inference.references import ReferenceStore

    gate = gate or GateConfig()
    report_dir = report_dir or settings.state_dir / "training-reports"
    with training_lock(settings.state_dir):
        store = RecordStore.from_settings(settings, storage_settings)
        registry = ModelRegistry(storage_settings.db_url(settings), store.artifacts)
        try:
            todo = plan(store, registry, product=product, since=since)
            if not todo:
                log.info("training_nothing_to_do", reason="no new labels since the live versions")
                return []
            if model is None:
                from inference.scorer import build_scorer

                model = build_scorer(device="cpu", text=False)
            references = ReferenceStore.from_settings(settings)
            results = []
            for name, examples in todo.items():
                if progress is not None:
                    progress(name, len(examples))
                images = references.load(name)
                if not images and name not in model.products():
                    results.append(ProductResult(name, "skipped: the product has no references"))
                    continue
                if images:
                    model.set_references(name, images, tiling=references.tiling(name))
                live = registry.live(name)
                if live is not None:
                    registry.install(model, live.version)
                results.append(train_product(model, name, examples, store, registry, gate=gate,
                                             learn_config=learn_config, dry_run=dry_run, report_dir=report_dir))
            for result in results:
                if result.decision == "promoted" and publish:
                    release(settings, result.product, result.version)
            return results
        finally:
            registry.close()
            store.close()


def release(settings: Settings, product: str, version: str | None) -> None:
    """Publish ModelUpdate(kind="model_released"): every worker installs `version` (None: the references
    alone) of `product` at its next batch boundary."""
    import asyncio

    from lineguard.events import ModelUpdate
    from lineguard.kafka import make_producer, start_client
    from lineguard.topics import MODEL_UPDATES

    async def send() -> None:
        producer = await start_client(settings, make_producer(settings))
        try:
            update = ModelUpdate(kind="model_released", product=product, model_version=version)
            await producer.send_and_wait(settings.topic(MODEL_UPDATES), update.to_bytes(), key=product.encode())
        finally:
            await producer.stop()

    asyncio.run(send())
