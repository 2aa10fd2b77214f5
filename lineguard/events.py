"""Event contracts: every message on a lineguard topic is one of these pydantic models.

Each model carries `schema_version`; a consumer rejects (dead-letters) a message whose
major version it does not know. Binary payloads (PNG, JPEG) travel base64-encoded inside
JSON, except the camera frame itself, which travels as raw JPEG bytes in the Kafka value
with its `FrameMeta` as JSON in the `lineguard-meta` header (see `encode_frame`).

Example:
    >>> meta = FrameMeta(frame_id="cam-0-000001", line_id="line-1", camera_id="cam-0",
    ...                  product="disc", width=256, height=256)
    >>> value, headers = encode_frame(meta, b"\\xff\\xd8...")
    >>> decode_frame(value, headers)[0] == meta
    True
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

SCHEMA_VERSION = 1
META_HEADER = "lineguard-meta"
TYPE_HEADER = "lineguard-type"

# 3x3 grid position words, as in AnomalyGPT's answers; row-major from the top left.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
Position = Literal[
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"
]

# Ids and names travel in Kafka keys, SQL rows, artifact paths, InfluxDB tags and log lines: a camera
# gateway that sends a 20,000-character or multi-line id must fail validation (→ dead letter), not
# reach them. Letters, digits and . _ : @ + - only (no spaces, slashes or control characters).
ID_MAX_LENGTH = 128
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+\-]*$"
Id = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
DefectType = Annotated[str, StringConstraints(min_length=1, max_length=64,
                                              pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._:+\-]*$")]  # "hairline crack"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """Base of every contract: strict about unknown fields, versioned."""

    # bytes fields (PNG, JPEG) are raw bytes in Python and base64 strings in JSON
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")
    schema_version: int = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes):
        event = cls.model_validate_json(data)
        if event.schema_version != SCHEMA_VERSION:
            raise ValueError(f"{cls.__name__} schema_version {event.schema_version} is not supported "
                             f"(this build reads {SCHEMA_VERSION})")
        return event


class GroundTruth(Event):
    """What a simulator or a labelled dataset knows about a frame."""

    is_defect: bool
    defect_type: DefectType | None = None  # "scratch", "broken_large", ... None when good
    mask_png: bytes | None = None     # single-channel PNG, 255 = defect, at frame resolution


class FrameMeta(Event):
    """Metadata of one camera frame; the JPEG itself is the Kafka value."""

    frame_id: Id
    line_id: Id
    camera_id: Id
    product: Id
    captured_at: datetime = Field(default_factory=utcnow)
    seq: int = 0
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    encoding: Literal["jpeg"] = "jpeg"
    source: str = ""                 # file path, stream URL or "simulator"
    mm_per_px: float | None = None   # camera calibration, when known
    ground_truth: GroundTruth | None = None


class Region(Event):
    """One connected anomalous region of a verdict."""

    x: int
    y: int
    w: int
    h: int
    area_px: int
    area_mm2: float | None = None
    position: Position
    peak_score: float


class Latency(Event):
    queue_ms: float = 0.0
    decode_ms: float = 0.0
    model_ms: float = 0.0
    publish_ms: float = 0.0


class Verdict(Event):
    """The inspection result for one frame. Idempotent by frame_id."""

    frame_id: Id
    line_id: Id
    camera_id: Id
    product: Id
    captured_at: datetime
    score: float
    threshold: float
    is_anomalous: bool
    confidence: float = Field(ge=0.0, le=1.0)
    regions: list[Region] = Field(default_factory=list)
    positions: list[Position] = Field(default_factory=list, max_length=2)
    answer: str | None = None
    model_version: str
    latency: Latency = Field(default_factory=Latency)
    ground_truth_defect: bool | None = None
    produced_at: datetime = Field(default_factory=utcnow)
    # flagged frames: float16 little-endian vector (≤256 values) of the main defect, for the similar-parts
    # search (inference/model/descriptor.py); optional, so verdicts without it stay readable
    descriptor: bytes | None = Field(default=None, max_length=2 * 256)


class Heatmap(Event):
    frame_id: Id
    camera_id: Id
    product: Id
    width: int
    height: int
    map_png: bytes                      # 8-bit anomaly map, 0..255 = 0..2x threshold
    overlay_jpeg: bytes | None = None   # only for flagged frames


class Label(Event):
    """An operator's judgement of a frame."""

    frame_id: Id
    operator: Id
    is_defect: bool
    defect_type: DefectType | None = None
    mask_png: bytes | None = None
    note: str = Field(default="", max_length=2000)
    labeled_at: datetime = Field(default_factory=utcnow)


class DeadLetter(Event):
    """A message no service could handle, with the reason, so nothing is lost silently."""

    source_topic: str
    partition: int | None = None
    offset: int | None = None
    key: str | None = None
    reason: str
    error_type: str
    service: str
    payload: bytes = b""
    headers: dict[str, str] = Field(default_factory=dict)
    failed_at: datetime = Field(default_factory=utcnow)


class ModelUpdate(Event):
    """Workers reload references or weights when they see one of these."""

    kind: Literal["references_changed", "model_released"]
    product: Id | None = None
    model_version: str | None = None
    detail: dict[str, str] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)


CONTRACTS: dict[str, type[Event]] = {
    cls.__name__: cls for cls in (FrameMeta, GroundTruth, Region, Verdict, Heatmap, Label, DeadLetter, ModelUpdate)
}


class BadFrame(ValueError):
    """A frame message that cannot be read; the reason goes to the dead-letter topic."""


def encode_frame(meta: FrameMeta, jpeg: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A frame as a Kafka (value, headers) pair."""
    return jpeg, [(TYPE_HEADER, b"FrameMeta"), (META_HEADER, meta.to_bytes())]


def decode_frame(value: bytes | None, headers) -> tuple[FrameMeta, bytes]:
    """Inverse of `encode_frame`; raises BadFrame with a readable reason."""
    found = dict(headers or ())
    raw = found.get(META_HEADER)
    if raw is None:
        raise BadFrame(f"missing {META_HEADER} header")
    try:
        meta = FrameMeta.from_bytes(raw)
    except (ValidationError, ValueError) as exc:
        raise BadFrame(f"invalid FrameMeta: {_short(exc)}") from exc
    if not value:
        raise BadFrame("empty frame payload")
    return meta, value


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
    return str(exc).splitlines()[0]


def json_schemas() -> dict[str, dict]:
    """JSON Schema of every contract, keyed by model name."""
    return {name: cls.model_json_schema(mode="serialization") for name, cls in CONTRACTS.items()}


def dumps_schema(name: str) -> str:
    return json.dumps(json_schemas()[name], indent=2, sort_keys=True) + "\n"
