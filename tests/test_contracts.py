"""Event contracts and settings: versioned, strict, and errors that name the setting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lineguard.events import (
    SCHEMA_VERSION,
    BadFrame,
    DeadLetter,
    FrameMeta,
    GroundTruth,
    Verdict,
    decode_frame,
    encode_frame,
)
from lineguard.settings import ConfigError, load_settings


def _meta(**overrides) -> FrameMeta:
    fields = dict(frame_id="line-1.cam-0.abc.0000001", line_id="line-1", camera_id="cam-0", product="disc",
                  width=256, height=256, ground_truth=GroundTruth(is_defect=True, defect_type="scratch",
                                                                  mask_png=b"\x89PNG\r\n\x1a\n..."))
    return FrameMeta(**fields | overrides)


def test_frame_round_trip_keeps_binary_ground_truth():
    meta = _meta()
    value, headers = encode_frame(meta, b"\xff\xd8jpeg")
    decoded, jpeg = decode_frame(value, headers)
    assert decoded == meta and jpeg == b"\xff\xd8jpeg"
    assert decoded.ground_truth.mask_png == b"\x89PNG\r\n\x1a\n..."
    assert json.loads(meta.to_bytes())["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (b"jpeg", [], "missing lineguard-meta header"),
        (b"jpeg", [("lineguard-meta", b"{not json")], "invalid FrameMeta"),
        (b"jpeg", [("lineguard-meta", b'{"frame_id": "x"}')], "invalid FrameMeta"),
        (b"", None, "missing"),
    ],
)
def test_bad_frames_give_a_reason(value, headers, reason):
    with pytest.raises(BadFrame, match=reason):
        decode_frame(value, headers)


def test_empty_payload_is_bad():
    _, headers = encode_frame(_meta(), b"x")
    with pytest.raises(BadFrame, match="empty frame payload"):
        decode_frame(b"", headers)


def test_unknown_schema_version_is_rejected():
    data = json.loads(_meta().to_bytes())
    data["schema_version"] = 99
    with pytest.raises(ValueError, match="schema_version 99"):
        FrameMeta.from_bytes(json.dumps(data).encode())


def test_contracts_forbid_unknown_fields_and_cap_positions():
    with pytest.raises(ValueError):
        FrameMeta.model_validate(json.loads(_meta().to_bytes()) | {"surprise": 1})
    with pytest.raises(ValueError):
        Verdict(frame_id="f", line_id="l", camera_id="c", product="p", captured_at="2026-01-01T00:00:00Z",
                score=1, threshold=0.5, is_anomalous=True, confidence=0.9, model_version="v",
                positions=["top", "left", "center"])


def test_dead_letter_carries_payload_and_reason():
    letter = DeadLetter(source_topic="lineguard.frames", partition=2, offset=17, key="cam-0",
                        reason="cannot decode JPEG", error_type="BadFrame", service="inference",
                        payload=b"\x00\x01")
    assert DeadLetter.from_bytes(letter.to_bytes()) == letter


def test_schema_command_writes_every_contract(tmp_path):
    result = subprocess.run([sys.executable, "-m", "deploy", "schema", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    for model in ("FrameMeta", "Verdict", "Heatmap", "Label", "DeadLetter", "ModelUpdate"):
        assert f"{model}.schema.json" in names
    schema = json.loads((tmp_path / "FrameMeta.schema.json").read_text())
    assert {"frame_id", "camera_id", "product", "captured_at", "width", "height"} <= set(schema["properties"])
    assert schema["properties"]["schema_version"]["default"] == SCHEMA_VERSION


def test_settings_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("LINEGUARD_PROFILE", "production")
    monkeypatch.delenv("LINEGUARD_KAFKA_BOOTSTRAP", raising=False)
    with pytest.raises(ConfigError, match="LINEGUARD_KAFKA_BOOTSTRAP"):
        load_settings()
    monkeypatch.setenv("LINEGUARD_KAFKA_BOOTSTRAP", "no-port-here")
    with pytest.raises(ConfigError, match="LINEGUARD_KAFKA_BOOTSTRAP"):
        load_settings()


def test_production_profile_passes_sasl_ssl_to_aiokafka(monkeypatch):
    from lineguard.kafka import client_kwargs, consumer_kwargs, producer_kwargs

    monkeypatch.setenv("LINEGUARD_PROFILE", "production")
    monkeypatch.setenv("LINEGUARD_KAFKA_BOOTSTRAP", "kafka-1:9093,kafka-2:9093")
    monkeypatch.setenv("LINEGUARD_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("LINEGUARD_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("LINEGUARD_KAFKA_SASL_USERNAME", "inspector")
    monkeypatch.setenv("LINEGUARD_KAFKA_SASL_PASSWORD", "s3cret")
    settings = load_settings()
    kwargs = client_kwargs(settings)
    assert kwargs["bootstrap_servers"] == "kafka-1:9093,kafka-2:9093"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512" and kwargs["sasl_plain_password"] == "s3cret"
    assert kwargs["ssl_context"] is not None
    # the Tansu work-arounds apply to the embedded profile only
    assert "max_batch_size" not in producer_kwargs(settings)
    assert "session_timeout_ms" not in consumer_kwargs(settings, "g")
    assert producer_kwargs(settings)["acks"] == "all"
    monkeypatch.setenv("LINEGUARD_PROFILE", "embedded")
    monkeypatch.setenv("LINEGUARD_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    embedded = load_settings()
    assert producer_kwargs(embedded)["max_batch_size"] == 1
    assert consumer_kwargs(embedded, "g")["session_timeout_ms"] == 6000
