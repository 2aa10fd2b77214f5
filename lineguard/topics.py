"""Topics: names, partition counts, keys and configs, in one table.

| name | key | partitions | value |
|---|---|---|---|
| frames | camera_id | 6 | JPEG bytes, FrameMeta in the `lineguard-meta` header |
| verdicts | camera_id | 6 | Verdict JSON |
| heatmaps | camera_id | 6 | Heatmap JSON |
| labels | frame_id | 3 | Label JSON |
| model-updates | product | 1 | ModelUpdate JSON |
| deadletter | original key | 1 | DeadLetter JSON |

Keying frames, verdicts and heatmaps by camera keeps order per camera.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str          # without the configurable prefix
    partitions: int
    key: str
    description: str
    configs: dict[str, str] = field(default_factory=dict)


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("frames", 6, "camera_id", "camera frames (JPEG) with FrameMeta header",
              {"retention.ms": str(1 * DAY_MS)}),
    TopicSpec("verdicts", 6, "camera_id", "one Verdict per frame", {"retention.ms": str(7 * DAY_MS)}),
    TopicSpec("heatmaps", 6, "camera_id", "one Heatmap per frame", {"retention.ms": str(1 * DAY_MS)}),
    TopicSpec("labels", 3, "frame_id", "operator labels", {"retention.ms": str(30 * DAY_MS)}),
    TopicSpec("model-updates", 1, "product", "references changed / model released",
              {"retention.ms": str(30 * DAY_MS)}),
    TopicSpec("deadletter", 1, "original key", "messages no service could handle, with the reason",
              {"retention.ms": str(30 * DAY_MS)}),
)

FRAMES, VERDICTS, HEATMAPS, LABELS, MODEL_UPDATES, DEADLETTER = (t.name for t in TOPICS)


def spec(name: str) -> TopicSpec:
    for topic in TOPICS:
        if topic.name == name:
            return topic
    raise KeyError(name)
