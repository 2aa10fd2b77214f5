"""The default model (efficientnet-lite0 from its pip package) on simulated parts: the reference memory
finds defects, results have the right shapes and are deterministic, and the threshold comes from the
references alone."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inference import metrics
from inference.eval import at_mask_size
from inference.model.api import Frame, InspectionModel, ModelConfig, ScoredFrame
from inference.model.encoders import EncoderConfig
from inference.model.verdict import VerdictConfig
from ingest.simulator import LineSimulator
from lineguard.events import POSITIONS, Verdict

SIZE = 192  # simulated frames; the encoder sees 224 px so the tests stay fast on 2 cores


@pytest.fixture(scope="module")
def sim():
    return LineSimulator(products=("disc", "tile"), defect_rate=0.5, size=SIZE, seed=11)


@pytest.fixture(scope="module")
def model(sim):
    model = InspectionModel(ModelConfig(encoder=EncoderConfig(image_size=224), device="cpu", batch_size=8))
    for product in ("disc", "tile"):
        model.add_references(product, sim.normal_references(product, 1))
    return model


@pytest.fixture(scope="module")
def parts(sim):
    """Per product: 12 defective parts (3 of each type) and 6 good ones, not the references."""
    out = {}
    for product in ("disc", "tile"):
        bad = [sim.part(i, product, t) for i, t in enumerate(["scratch", "dent", "missing_piece", "contamination"] * 3)]
        good = [sim.part(100 + i, product, None) for i in range(6)]
        out[product] = bad + good
    return out


@pytest.fixture(scope="module")
def scored(model, parts):
    frames = [Frame(p.image, p.product, 0.25) for product in parts for p in parts[product]]
    return frames, model.score(frames)


def test_memory_bank_finds_synthetic_defects(parts, scored):
    frames, results = scored
    by_product = {}
    for frame, result, part in zip(frames, results, [p for ps in parts.values() for p in ps], strict=True):
        by_product.setdefault(frame.product, []).append((part, result))
    for product, pairs in by_product.items():
        masks = [part.mask for part, _ in pairs]
        maps = [at_mask_size(result.anomaly_map, part.mask) for part, result in pairs]
        pixel = metrics.pixel_auroc(masks, maps)
        assert pixel > 90.0, f"{product}: pixel AUROC {pixel:.1f}"
        labels = np.array([part.defect_type is not None for part, _ in pairs])
        image = metrics.image_auroc(labels, np.array([r.verdict.score for _, r in pairs]))
        assert image > 80.0, f"{product}: image AUROC {image:.1f}"
        # on the parts it flags, the hottest pixel lies on (or right next to) the defect
        hits = []
        for part, result in pairs:
            if part.defect_type is None or not result.verdict.is_anomalous:
                continue
            y, x = np.unravel_index(np.argmax(result.anomaly_map), result.anomaly_map.shape)
            y, x = y * SIZE // result.anomaly_map.shape[0], x * SIZE // result.anomaly_map.shape[1]  # frame px
            near = cv2.dilate(part.mask, np.ones((25, 25), np.uint8))
            hits.append(bool(near[y, x]))
        assert hits and np.mean(hits) >= 0.75, f"{product}: peak on defect in {np.mean(hits):.0%}"


def test_results_match_frames_and_map_events(scored):
    frames, results = scored
    assert len(results) == len(frames)
    for frame, result in zip(frames, results, strict=True):
        assert isinstance(result, ScoredFrame) and result.product == frame.product
        verdict, anomaly_map = result                       # unpacks as (verdict, map)
        assert anomaly_map.shape == (224, 224) and anomaly_map.dtype == np.float32   # model resolution
        assert verdict.score == pytest.approx(float(anomaly_map.max()))
        assert verdict.is_anomalous == (verdict.score > verdict.threshold) == bool(verdict.regions)
        assert 0.5 <= verdict.confidence <= 1.0
        assert len(verdict.positions) <= 2 and set(verdict.positions) <= set(POSITIONS)
        for region in verdict.regions:
            assert region.peak_score > verdict.threshold
            assert region.area_mm2 == pytest.approx(region.area_px * 0.25**2, rel=1e-3)
            assert 0 <= region.x < region.x + region.w <= frame.image.shape[1]               # frame pixels
            assert 0 <= region.y < region.y + region.h <= frame.image.shape[0]
        # the verdict's fields are the event contract's
        Verdict(frame_id="f", line_id="l", camera_id="c", product=frame.product, captured_at="2026-01-01T00:00:00Z",
                model_version="test", **verdict.event_fields())


def test_any_size_grey_or_colour_and_mixed_products(model, sim):
    disc = sim.part(7, "disc", "scratch").image
    tile = sim.part(8, "tile", None).image
    frames = [
        Frame(disc, "disc"),
        Frame(cv2.cvtColor(tile, cv2.COLOR_BGR2GRAY), "tile"),             # (H, W) grey
        ("disc", cv2.resize(disc, (300, 170))),                           # tuple, non-square
        Frame(cv2.resize(tile, (97, 131))[:, :, :1], "tile"),              # (H, W, 1)
    ]
    results = model.score(frames)
    assert [r.product for r in results] == ["disc", "tile", "disc", "tile"]
    assert [r.anomaly_map.shape for r in results] == [(224, 224)] * 4                   # model resolution
    flagged = [(r, f) for r, f in zip(results, frames, strict=True) if r.verdict.regions]
    assert flagged, "the scratched disc is flagged"
    for result, frame in flagged:                                                       # regions: frame pixels
        height, width = (frame[1] if isinstance(frame, tuple) else frame.image).shape[:2]
        assert all(r.x + r.w <= width and r.y + r.h <= height for r in result.verdict.regions)
    assert all(r.embedding.shape == (model.encoder.embed_dim,) for r in results)
    with pytest.raises(KeyError):
        model.score([Frame(disc, "unknown-product")])


def test_deterministic_and_batch_independent(model, parts):
    frames = [Frame(p.image, p.product) for p in parts["disc"][:3] + parts["tile"][:2]]
    once = model.score(frames)
    again = model.score(frames)
    alone = [model.score([f])[0] for f in frames]
    for a, b, c in zip(once, again, alone, strict=True):
        assert np.array_equal(a.anomaly_map, b.anomaly_map)
        np.testing.assert_allclose(a.anomaly_map, c.anomaly_map, rtol=1e-4, atol=1e-5)
        assert a.verdict == b.verdict


def test_threshold_comes_from_references_only(sim):
    model = InspectionModel(ModelConfig(encoder=EncoderConfig(image_size=128), device="cpu"))
    references = sim.normal_references("disc", 2)
    first = model.set_references("disc", references)
    assert first.method in ("reshot", "held-out", "simulated", "balanced") and first.threshold > first.normal_score > 0
    # scoring anything, defects included, never moves it
    model.score([Frame(sim.part(i, "disc", "dent").image, "disc") for i in range(4)])
    assert model.states["disc"].calibration == first
    # the same references give the same threshold in a fresh model; other references another one
    fresh = InspectionModel(ModelConfig(encoder=EncoderConfig(image_size=128), device="cpu"))
    assert fresh.set_references("disc", references).threshold == pytest.approx(first.threshold)
    other = fresh.set_references("disc", sim.normal_references("disc", 3)[1:])
    assert other.threshold != pytest.approx(first.threshold)
    # one reference: re-shot views only; the older margin rule holds references out from 8 on
    assert fresh.set_references("disc", references[:1]).method in ("reshot", "simulated")
    margin = InspectionModel(ModelConfig(encoder=EncoderConfig(image_size=128), device="cpu",
                                         verdict=VerdictConfig(rule="margin")))
    many = margin.set_references("disc", sim.normal_references("disc", 8))
    assert many.method == "held-out" and many.n_samples == 8
    assert margin.set_references("disc", references).method == "jitter"
    # add_references appends and recalibrates
    fresh.set_references("tile", sim.normal_references("tile", 1))
    fresh.add_references("tile", sim.normal_references("tile", 2)[1:])
    assert fresh.states["tile"].memory.n_references == 2


def test_folded_batchnorm_encoder_matches_the_original_network():
    """The encoder folds its frozen BatchNorms into the convs; its stage taps must not change."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from inference.model.encoders import build_encoder, efficientnet_weights_path

    encoder = build_encoder(EncoderConfig()).eval()
    original = EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
    original.load_state_dict(torch.load(efficientnet_weights_path("efficientnet-lite0"), map_location="cpu",
                                        weights_only=True))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        folded = encoder(x)
        y = original._swish(original._bn0(original._conv_stem(x)))
        taps = []
        for i, block in enumerate(original._blocks):
            y = block(y)
            if i in encoder.taps:
                taps.append(y)
    for ours, theirs in zip(folded.patch_features, taps, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_greedy_coreset_keeps_rare_normal_patches():
    """A coreset of a bank dominated by one kind of patch still holds the rare kinds (k-center greedy)."""
    import torch

    from inference.model.decoder import greedy_coreset

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    counts = (2000, 4, 4)
    bank = torch.cat([c + 0.01 * torch.randn(n, 16, generator=g) for c, n in zip(centres, counts, strict=True)])
    bank = torch.nn.functional.normalize(bank, dim=1)
    picked = greedy_coreset(bank, 12, torch.Generator().manual_seed(1))
    assert len(set(picked.tolist())) == 12
    kinds = {0 if i < 2000 else 1 if i < 2004 else 2 for i in picked.tolist()}
    assert kinds == {0, 1, 2}


def test_opening_answers_come_from_the_verdict_without_loading_the_llm(model, scored):
    """The worker asks only the opening question: it must not wait for (or hold) a language model."""
    _, results = scored
    answers = model.answer(results)
    assert model._lvlm is None
    for result, answer in zip(results, answers, strict=True):
        if result.verdict.is_anomalous:
            assert answer.startswith("Yes, there"), answer
            assert all(position in answer for position in result.verdict.positions)
        else:
            assert answer == "No, there is no anomaly in the image."
    assert model.answer(results[:1], "Is there any anomaly in the image?") == answers[:1]


def test_learned_prototypes_find_defects_they_never_saw(model, parts):
    """Without a text tower the semantic branch is learned per product, from the one reference and
    simulated anomalies pasted onto it: alone, it already points at the simulator's real defect types,
    which it never saw; untrained (random) prototypes do not."""
    import torch

    from inference.model.synthetic import simulate_anomaly

    image = parts["disc"][0].image
    anomalous, mask = simulate_anomaly(image, np.random.default_rng(0), "blob")
    assert mask.any() and np.abs(anomalous.astype(int) - image).max(-1)[mask].min() >= 12

    def branch_auroc(product: str, prototypes) -> float:
        bad = [p for p in parts[product] if p.defect_type is not None]
        with torch.inference_mode():
            stages = model._encode(model.encoder.preprocess([p.image for p in bad])).patch_features
            semantic = model.decoder.semantic(stages, prototypes)
        maps = [cv2.resize(m, (SIZE, SIZE)) for m in semantic[:, 0].numpy()]
        return metrics.pixel_auroc([p.mask for p in bad], maps)

    for product in ("disc", "tile"):
        learned = model.states[product].prompts
        assert isinstance(learned, list) and [p.shape for p in learned] == [(2, c) for c in model.encoder.stage_dims]
        generator = torch.Generator().manual_seed(0)
        random = [torch.randn(2, c, generator=generator) for c in model.encoder.stage_dims]
        trained, untrained = branch_auroc(product, learned), branch_auroc(product, random)
        assert trained > 70.0 and trained > untrained + 15, f"{product}: {trained:.1f} vs random {untrained:.1f}"
