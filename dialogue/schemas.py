"""Request and response bodies of the dialogue API (they make its OpenAPI document); see CONTRACT.md."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, Base64Bytes, BaseModel, Field

from lineguard.events import DefectType, Region, Verdict
from storage.records import InspectionRecord

Intent = Literal["position", "size", "confidence", "count", "history", "similarity", "defect_type", "refusal",
                 "free_form"]


def _in_range(value: datetime) -> datetime:
    """A date the records can be filtered by: representable in UTC (0001-01-01T00:00+01:00 is not)."""
    try:
        utc = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except (OverflowError, ValueError):
        raise ValueError("the date is out of range once converted to UTC") from None
    if not 1 < utc.year < 9999:
        raise ValueError("the date must lie between the years 2 and 9998")
    return value


QueryTime = Annotated[datetime, AfterValidator(_in_range)]   # `since` / `until` of a query: 422 when out of range


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    records: int
    llm: Literal["off", "loading", "ready", "failed"] = "off"   # the free-form answerer (fact answers never wait)


class Me(BaseModel):
    name: str
    role: Literal["viewer", "operator", "admin"]


class RecordSummary(BaseModel):
    frame_id: str
    line_id: str
    camera_id: str
    product: str
    captured_at: datetime
    is_anomalous: bool
    score: float
    threshold: float
    confidence: float
    positions: list[str]
    answer: str | None
    label_status: Literal["unlabeled", "defect", "good"]
    model_version: str
    has_image: bool
    has_heatmap: bool
    has_overlay: bool
    missing: list[str]

    @classmethod
    def of(cls, record: InspectionRecord) -> RecordSummary:
        return cls(**record.model_dump(include=set(cls.model_fields) - {"has_image", "has_heatmap", "has_overlay"}),
                   has_image=record.image_uri is not None, has_heatmap=record.heatmap_uri is not None,
                   has_overlay=record.overlay_uri is not None)


class RecordPage(BaseModel):
    items: list[RecordSummary]
    limit: int
    offset: int
    next_offset: int | None


class StoredLabel(BaseModel):
    operator: str
    is_defect: bool
    defect_type: str | None
    note: str
    labeled_at: datetime


class RecordDetail(RecordSummary):
    regions: list[Region]
    n_anomalies: int
    labels: list[StoredLabel]
    has_descriptor: bool


class QuestionRequest(BaseModel):
    # the configured limit (LINEGUARD_DIALOGUE_MAX_QUESTION_CHARS) is checked in the route; this is the hard cap
    question: str = Field(min_length=1, max_length=10_000)


class SourceOut(BaseModel):
    kind: Literal["record", "query"]
    ref: str
    detail: str = ""


class Answer(BaseModel):
    frame_id: str
    question: str
    answer: str
    intent: Intent
    sources: list[SourceOut]
    turn: int
    operator: str
    asked_at: datetime
    latency_ms: float


class Conversation(BaseModel):
    frame_id: str
    turns: list[Answer]


class LabelRequest(BaseModel):
    is_defect: bool
    defect_type: DefectType | None = None
    note: str = Field(default="", max_length=2000)
    mask_png: Base64Bytes | None = Field(default=None, description="single-channel PNG, base64; 255 = defect")


class LabelAccepted(BaseModel):
    frame_id: str
    operator: str
    is_defect: bool
    defect_type: str | None
    note: str
    labeled_at: datetime
    topic: str


class SimilarPart(BaseModel):
    record: RecordSummary
    similarity: float
    defect_type: str | None


class SimilarParts(BaseModel):
    frame_id: str
    k: int
    items: list[SimilarPart]


class StreamedVerdict(BaseModel):
    """What `/api/stream` sends per newly flagged verdict (`event: verdict`)."""

    frame_id: str
    line_id: str
    camera_id: str
    product: str
    captured_at: datetime
    score: float
    threshold: float
    confidence: float
    positions: list[str]
    regions: list[Region]
    answer: str | None
    model_version: str

    @classmethod
    def of(cls, verdict: Verdict) -> StreamedVerdict:
        return cls(**verdict.model_dump(include=set(cls.model_fields)))
