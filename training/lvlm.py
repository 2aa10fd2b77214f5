"""`lineguard train lvlm`: AnomalyGPT's adapters (image projection, prompt learner), trained as AnomalyGPT trains
them: the frozen LLM's cross-entropy on the answer sentence.

The LLM is asked "Is there any anomaly in the image?" with the verdict's facts **withheld** from its prompt,
so only the soft tokens (the image token and the 18 prompt tokens made from the anomaly map) can tell it
what the inspection found. The answer it learns is AnomalyGPT's sentence for the verdict ("Yes, there is
an anomaly in the image, at the top left of the image."). A frame an operator labelled says what the verdict
should have been: labelled good, the answer is "No, ..."; labelled defective, "Yes, ..." at the verdict's
positions (or at the map's maximum when the verdict passed it).

Training data:
- simulated parts (ingest/simulator.py) of every simulated product, half of them defective, scored by the
  model against a few references, as a line would show them;
- simulated anomalies (inference/model/synthetic.py) pasted onto good parts, for defects anywhere;
- labelled frames from the records store, when there are any.

What the soft tokens carry is measured on simulated parts the adapters never saw: the LLM's own answers
(greedy, no guard, facts withheld), before and after training, as Yes/No agreement with the verdict and
position accuracy (the positions named are the verdict's, on frames it flags).

    >>> data = simulated_samples(model, 320, seed=0)
    >>> before = measure(lvlm, held_out)                     # {"yes_no_accuracy": 51.2, ...}
    >>> losses = train_adapters(lvlm, data, LvlmTrainConfig(steps=200))
    >>> after = measure(lvlm, held_out)                      # {"yes_no_accuracy": 97.5, ...}
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from inference.model.lvlm import FIRST_QUESTION, AnomalyLVLM, LvlmConfig, first_answer, positions_in
from inference.model.synthetic import simulate_batch
from inference.model.verdict import ModelVerdict
from inference.registry import LVLM_PRODUCT, ModelRegistry
from lineguard.logging import get_logger
from lineguard.settings import Settings
from storage.labels import training_examples
from storage.records import RecordStore
from storage.settings import StorageSettings

log = get_logger(__name__)


@dataclass
class LvlmTrainConfig:
    steps: int = 240             # optimiser steps
    batch: int = 8               # answers per step, half of them "Yes" where the data allows
    lr: float = 2e-3             # AdamW, cosine decay to 0
    seed: int = 0
    max_new_tokens: int = 28     # when measuring: the longest first answer is about 25 tokens


@dataclass
class Sample:
    """What the LVLM reads of one scored frame, and the sentence it should answer."""

    verdict: ModelVerdict
    anomaly_map: np.ndarray      # (S, S) float32 at the prompt learner's side
    embedding: np.ndarray        # (D,) the encoder's global embedding
    answer: str


def sample_of(scored, map_size: int, is_defect: bool | None = None) -> Sample:
    """A training sample from a ScoredFrame; `is_defect` (an operator's label) overrides the verdict's decision."""
    verdict = scored.verdict
    if is_defect is not None and is_defect != verdict.is_anomalous:
        positions = list(verdict.positions) if is_defect else []
        if is_defect and not positions:   # the verdict passed it: its map's maximum is where to look
            h, w = scored.anomaly_map.shape
            y, x = np.unravel_index(int(np.argmax(scored.anomaly_map)), (h, w))
            positions = [position_of(x / w, y / h)]
        verdict = replace(verdict, is_anomalous=is_defect, positions=positions)
    small = cv2.resize(scored.anomaly_map.astype(np.float32), (map_size, map_size), interpolation=cv2.INTER_AREA)
    return Sample(verdict, small, np.asarray(scored.embedding, np.float32), first_answer(verdict))


def position_of(x: float, y: float) -> str:
    """The 3x3 position word of a point given as fractions of the frame's width and height."""
    row, col = min(int(y * 3), 2), min(int(x * 3), 2)
    return (("top left", "top", "top right"), ("left", "center", "right"),
            ("bottom left", "bottom", "bottom right"))[row][col]


# --- data ------------------------------------------------------------------------------------------

def simulated_samples(model, n: int, seed: int = 0, references: int = 4, map_size: int = 224,
                      batch: int = 16) -> list[Sample]:
    """n samples of simulated parts, scored by `model` against `references` good parts per product: half
    rendered by the line simulator (a random half of them defective), half good parts with a synthetic
    anomaly pasted on (anywhere on the frame). The model's states of the simulated products are replaced."""
    from ingest.publisher import as_published
    from ingest.simulator import PRODUCTS, LineSimulator

    simulator = LineSimulator(products=PRODUCTS, defect_rate=0.5, seed=seed)
    for product in PRODUCTS:
        good = simulator.normal_references(product, references)
        model.set_references(product, [as_published(image, 90)[..., ::-1].copy() for image in good])
    rng = np.random.default_rng(seed)
    frames: list[tuple[str, np.ndarray]] = []
    for i in range(n):
        part = simulator.part(i)
        image = part.image
        if i % 2 == 1 and part.defect_type is None:
            image = simulate_batch([image], 1, rng)[0][0]
        frames.append((part.product, as_published(image, 90)[..., ::-1].copy()))   # RGB, as the worker decodes
    samples = []
    for start in range(0, n, batch):
        samples += [sample_of(scored, map_size) for scored in model.score(frames[start:start + batch])]
    return samples


# --- training --------------------------------------------------------------------------------------

def _balanced_batches(samples: list[Sample], config: LvlmTrainConfig):
    """Index batches with as many "Yes" as "No" answers where both exist (the line shows far more No)."""
    rng = np.random.default_rng(config.seed)
    yes = np.array([i for i, s in enumerate(samples) if s.verdict.is_anomalous])
    no = np.array([i for i, s in enumerate(samples) if not s.verdict.is_anomalous])
    for _ in range(config.steps):
        if len(yes) and len(no):
            half = config.batch // 2
            yield np.concatenate([rng.choice(yes, half), rng.choice(no, config.batch - half)])
        else:
            yield rng.choice(len(samples), config.batch)


def train_adapters(lvlm: AnomalyLVLM, samples: list[Sample], config: LvlmTrainConfig | None = None,
                   progress=None) -> list[float]:
    """Train the adapters in place; returns the loss of every step. `progress(step, loss)` is called after
    each step."""
    config = config or LvlmTrainConfig()
    if not samples:
        raise ValueError("no training samples")
    parameters = lvlm.adapters()
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.steps)
    losses = []
    lvlm.train()
    lvlm.llm.eval()                       # frozen: no dropout, no gradients of its own
    try:
        for step, batch in enumerate(_balanced_batches(samples, config)):
            chosen = [samples[i] for i in batch]
            loss = lvlm.training_loss(chosen, [s.answer for s in chosen])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, losses[-1])
    finally:
        for parameter in parameters:
            parameter.requires_grad_(False)
        lvlm.eval()
    lvlm.trained = True
    return losses


# --- what the soft tokens carry --------------------------------------------------------------------

def said_anomalous(reply: str) -> bool | None:
    """Does the reply say there is an anomaly (True), that there is none (False), or neither (None)?"""
    text = reply.strip().lower()
    if re.match(r"^(yes\b|there (is|are) (an|\d+) anomal)", text):
        return True
    if re.match(r"^(no\b|there (is|are) no anomal)", text):
        return False
    return None


def positions_said(reply: str) -> set[str]:
    """The 3x3 position words a reply names (as the guard reads them)."""
    return positions_in(reply.lower())


@torch.inference_mode()
def withheld_replies(lvlm: AnomalyLVLM, samples: list[Sample], max_new_tokens: int = 28,
                     batch: int = 16) -> list[str]:
    """The LLM's own first answers (greedy, no guard) with the facts withheld from its prompt."""
    replies = []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        replies += lvlm.generate(chunk, [FIRST_QUESTION] * len(chunk), [[] for _ in chunk], max_new_tokens,
                                 facts=False)
    return replies


def agreement(samples: list[Sample], replies: list[str]) -> dict[str, float]:
    """Yes/No accuracy against the verdicts (%), position accuracy on the flagged frames that have positions
    (the positions named are the verdict's first two, %), and how many frames each figure counts."""
    decided = [said_anomalous(r) == s.verdict.is_anomalous for s, r in zip(samples, replies, strict=True)]
    placed = [positions_said(r) == set(s.verdict.positions[:2])
              for s, r in zip(samples, replies, strict=True) if s.verdict.is_anomalous and s.verdict.positions]
    return {"yes_no_accuracy": 100.0 * float(np.mean(decided)) if decided else 0.0,
            "position_accuracy": 100.0 * float(np.mean(placed)) if placed else 0.0,
            "frames": len(samples), "flagged_frames": len(placed)}


def measure(lvlm: AnomalyLVLM, samples: list[Sample], max_new_tokens: int = 28) -> dict:
    started = time.perf_counter()
    replies = withheld_replies(lvlm, samples, max_new_tokens)
    return {**agreement(samples, replies), "seconds": round(time.perf_counter() - started, 1),
            "examples": replies[:3]}


# --- `lineguard train lvlm` ------------------------------------------------------------------------

@dataclass
class LvlmRun:
    decision: str                        # "promoted", "rejected" or "dry-run: would promote"
    version: str | None
    reasons: list[str]
    current: dict                        # the live adapters (or the untrained ones) on the held-out parts
    candidate: dict                      # the trained adapters on the same parts
    train_seconds: float
    samples: int                         # training samples: simulated + labelled frames
    labelled: int
    losses: list[float] = field(default_factory=list)


def model_code(lvlm: AnomalyLVLM) -> str:
    """What adapters must match to be loaded: the LLM and the encoder width."""
    return (f"lvlm:{Path(lvlm.config.llm or 'SmolLM2-135M-Instruct').name}:d{lvlm.image_projection.out_features}"
            f":e{lvlm.image_projection.in_features}")


def labelled_samples(store: RecordStore, settings: Settings, model, map_size: int) -> dict[str, Sample]:
    """{frame id: sample} of the frames operators labelled, re-scored by `model` against their product's
    references; the label says what the answer should have been."""
    from inference.references import ReferenceStore

    from .train import _image

    references = ReferenceStore.from_settings(settings)
    samples = {}
    for example in training_examples(store):
        if example.product not in model.products():
            images = references.load(example.product)
            if not images:
                continue
            model.set_references(example.product, images, tiling=references.tiling(example.product))
        image = _image(store, example)
        if image is None:
            continue
        scored = model.score([(example.product, image)])[0]
        samples[example.frame_id] = sample_of(scored, map_size, is_defect=example.is_defect)
    return samples


def train_lvlm(settings: Settings, storage_settings: StorageSettings, *, model=None, llm: str | None = None,
               config: LvlmTrainConfig | None = None, simulated: int = 320, held_out: int = 160,
               dry_run: bool = False, publish: bool = True, progress=None) -> LvlmRun:
    """Train the adapters on simulated parts plus labelled frames, measure them with the facts withheld against
    the live (or untrained) adapters on held-out simulated parts, register them, and promote them when they
    agree with the verdicts at least as well on both Yes/No and positions."""
    from inference.scorer import build_scorer

    from .train import release, training_lock

    config = config or LvlmTrainConfig()
    with training_lock(settings.state_dir):
        store = RecordStore.from_settings(settings, storage_settings)
        registry = ModelRegistry(storage_settings.db_url(settings), store.artifacts)
        try:
            model = model or build_scorer(device="cpu", text=False)
            lvlm = AnomalyLVLM(LvlmConfig(llm=llm), model.encoder.embed_dim, device=model.device)
            data = simulated_samples(model, simulated + held_out, seed=config.seed, map_size=lvlm.config.map_size)
            train_set, test_set = data[:simulated], data[simulated:]
            labelled = labelled_samples(store, settings, model, lvlm.config.map_size)
            live = registry.live_adapters()
            parent = None
            if live is not None:
                try:
                    lvlm.load_adapters(live[1])
                    parent = live[0]
                except ValueError as exc:
                    log.warning("lvlm_live_adapters_not_loaded", version=live[0], error=str(exc))
            current = measure(lvlm, test_set, config.max_new_tokens)
            started = time.perf_counter()
            losses = train_adapters(lvlm, train_set + list(labelled.values()), config, progress)
            seconds = time.perf_counter() - started
            candidate = measure(lvlm, test_set, config.max_new_tokens)
            reasons = [f"{key} {candidate[key]:.1f} < {current[key]:.1f} of {parent or 'the untrained adapters'}"
                       for key in ("yes_no_accuracy", "position_accuracy") if candidate[key] < current[key]]
            decision = ("rejected" if reasons else "promoted") if not dry_run else \
                ("dry-run: would reject" if reasons else "dry-run: would promote")
            version = None
            if not dry_run:
                metrics = {"current": current, "candidate": candidate, "train_seconds": round(seconds, 1)}
                lineage = {"parent": parent, "simulated": simulated, "labelled": len(labelled),
                           "config": asdict(config), "label_frames": sorted(labelled)}
                registered = registry.register(LVLM_PRODUCT, None, model_code(lvlm), parent=parent, metrics=metrics,
                                               lineage=lineage, status="rejected" if reasons else "candidate",
                                               note="; ".join(reasons), bundle=lvlm.adapter_bytes())
                version = registered.version
                if not reasons:
                    registry.promote(version)
                    if publish:
                        release(settings, LVLM_PRODUCT, version)
            log.info("lvlm_trained", decision=decision, version=version, seconds=round(seconds, 1),
                     yes_no=candidate["yes_no_accuracy"], position=candidate["position_accuracy"])
            return LvlmRun(decision, version, reasons, current, candidate, round(seconds, 1), len(train_set) +
                           len(labelled), len(labelled), losses)
        finally:
            registry.close()
            store.close()
