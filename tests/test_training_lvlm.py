"""`lineguard train lvlm`: the adapters learn from the frozen LLM's cross-entropy, travel through the registry, and
reach the model that answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_lvlm import EMBED_DIM, save_tiny_llama

from inference.model.lvlm import AnomalyLVLM, LvlmConfig, first_answer
from inference.model.verdict import ModelVerdict
from inference.registry import LVLM_PRODUCT, ModelRegistry
from training.lvlm import (
    LvlmTrainConfig,
    Sample,
    agreement,
    position_of,
    positions_said,
    said_anomalous,
    train_adapters,
    train_lvlm,
)


def blob_samples(n: int, seed: int = 0, embed_dim: int = EMBED_DIM) -> list[Sample]:
    """Maps with one bright square (flagged, at its 3x3 position) or none (normal), in units of the threshold."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        anomaly_map = (rng.random((224, 224)) * 0.3).astype(np.float32)
        if i % 2:
            x, y = rng.uniform(0.05, 0.95, 2)
            cx, cy = int(x * 224), int(y * 224)
            anomaly_map[max(cy - 14, 0):cy + 14, max(cx - 14, 0):cx + 14] = 2.0
            verdict = ModelVerdict(2.0, 1.0, True, 0.9, [], [position_of(x, y)])
        else:
            verdict = ModelVerdict(0.3, 1.0, False, 0.9, [], [])
        samples.append(Sample(verdict, anomaly_map, rng.standard_normal(embed_dim).astype(np.float32),
                              first_answer(verdict)))
    return samples


def test_replies_are_read_as_the_verdict_would_say_them():
    assert said_anomalous("Yes, there is an anomaly in the image, at the top left of the image.") is True
    assert said_anomalous("No, there is no anomaly in the image.") is False
    assert said_anomalous("The image appears to be a product.") is None
    assert positions_said("Yes, there are 2 anomalies, at the top left and center of the image.") == {"top left",
                                                                                                     "center"}
    assert position_of(0.1, 0.9) == "bottom left" and position_of(0.5, 0.5) == "center"
    samples = blob_samples(4)
    replies = ["No.", first_answer(samples[1].verdict), "Yes, there is an anomaly.", "Yes, at the nowhere."]
    result = agreement(samples, replies)
    assert result["yes_no_accuracy"] == 75.0           # the third reply contradicts a normal verdict
    assert result["position_accuracy"] == 50.0 and result["flagged_frames"] == 2


def test_adapters_round_trip_and_refuse_another_llm_width(tmp_path):
    path = save_tiny_llama(tmp_path / "tiny")
    trained = AnomalyLVLM(LvlmConfig(llm=path, seed=1), embed_dim=EMBED_DIM)
    fresh = AnomalyLVLM(LvlmConfig(llm=path, seed=2), embed_dim=EMBED_DIM)
    frames = blob_samples(2)
    assert not torch.allclose(trained.soft_tokens(frames)[1], fresh.soft_tokens(frames)[1])
    fresh.load_adapters(trained.adapter_bytes())
    assert fresh.trained
    for a, b in zip(trained.soft_tokens(frames), fresh.soft_tokens(frames), strict=True):
        torch.testing.assert_close(a, b)
    other_encoder = AnomalyLVLM(LvlmConfig(llm=path), embed_dim=EMBED_DIM * 2)
    with pytest.raises(ValueError, match="encoder width"):
        other_encoder.load_adapters(trained.adapter_bytes())
    with pytest.raises(ValueError, match="unreadable"):
        other_encoder.load_adapters(b"not a torch file")


def test_the_frozen_llm_teaches_the_adapters_only():
    """SmolLM2-135M (the default GGUF): a few steps on one set of answers lower its cross-entropy on them,
    with gradients in the adapters only; the LLM's weights do not move."""
    lvlm = AnomalyLVLM(LvlmConfig(), embed_dim=EMBED_DIM)
    samples = blob_samples(8)
    llm_before = lvlm.llm.model.layers[0].self_attn.q_proj.weight.clone()
    with torch.no_grad():
        before = float(lvlm.training_loss(samples, [s.answer for s in samples]))
    losses = train_adapters(lvlm, samples, LvlmTrainConfig(steps=8, batch=8, lr=2e-3))
    with torch.no_grad():
        after = float(lvlm.training_loss(samples, [s.answer for s in samples]))
    assert after < 0.7 * before, (before, after, losses)
    assert torch.equal(lvlm.llm.model.layers[0].self_attn.q_proj.weight, llm_before)
    assert not any(p.requires_grad for p in lvlm.llm.parameters())
    assert not any(p.requires_grad for p in lvlm.adapters())   # frozen again after training


def test_train_lvlm_registers_promotes_and_the_model_answers_with_them(tmp_path, model):
    """The whole command on a tiny LLM: simulated parts scored by the real model, a registry version of the
    adapters, promoted (a random tiny LLM cannot get worse than itself), loaded by the answering model."""
    from dialogue_helpers import storage_settings_for

    from lineguard.settings import load_settings
    from storage.artifacts import open_artifact_store

    path = save_tiny_llama(tmp_path / "tiny")
    settings = load_settings(state_dir=tmp_path / "state")
    storage = storage_settings_for(tmp_path)
    run = train_lvlm(settings, storage, model=model, llm=path, config=LvlmTrainConfig(steps=2, batch=4),
                     simulated=8, held_out=8, publish=False)
    assert run.decision == "promoted" and run.version == f"{LVLM_PRODUCT}.v0001"
    assert run.samples == 8 and run.labelled == 0 and len(run.losses) == 2
    assert run.candidate["frames"] == 8 and set(run.current) == set(run.candidate)
    registry = ModelRegistry(storage.db_url(settings), open_artifact_store(storage.artifacts(settings)))
    try:
        version, weights = registry.live_adapters()
        assert version == run.version
        shown = registry.get(version)
        assert shown.lineage["simulated"] == 8 and "candidate" in shown.metrics
    finally:
        registry.close()
    answering = AnomalyLVLM(LvlmConfig(llm=path), embed_dim=model.encoder.embed_dim)
    answering.load_adapters(weights)
    assert answering.trained


def test_the_dialogue_follows_the_live_adapters_of_the_registry(tmp_path):
    """A promoted `lvlm` version reaches the answering model at its next answer; a rollback to no version brings
    the untrained adapters back."""
    from dialogue.answers import LvlmAnswerer
    from inference.model.api import InspectionModel, ModelConfig
    from inference.model.encoders import EncoderConfig
    from lineguard.artifacts import LocalArtifactStore

    path = save_tiny_llama(tmp_path / "tiny")
    model = InspectionModel(ModelConfig(encoder=EncoderConfig.parse("random:vit-tiny"), device="cpu", llm=path))
    trained = AnomalyLVLM(LvlmConfig(llm=path, seed=5), embed_dim=model.encoder.embed_dim)
    frames = blob_samples(2, embed_dim=model.encoder.embed_dim)
    from storage_helpers import migrated

    registry = ModelRegistry(migrated(f"sqlite:///{tmp_path / 'records.sqlite'}"),
                             LocalArtifactStore(tmp_path / "artifacts"))
    try:
        released = registry.register(LVLM_PRODUCT, None, "lvlm:test", parent=None, metrics={}, lineage={},
                                     bundle=trained.adapter_bytes())
        registry.promote(released.version)
        answerer = LvlmAnswerer(model, None, None, adapters=registry.live_adapters, adapters_every_s=0)
        answerer._refresh_adapters()
        assert model.lvlm_adapters[0] == released.version and model.lvlm.trained
        torch.testing.assert_close(model.lvlm.soft_tokens(frames)[1], trained.soft_tokens(frames)[1])
        registry.rollback(LVLM_PRODUCT)
        answerer._refresh_adapters()
        assert model.lvlm_adapters is None and not model.lvlm.trained
    finally:
        registry.close()
