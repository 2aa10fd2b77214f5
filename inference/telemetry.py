"""Prometheus metrics of one inference worker (own registry, so several workers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.frames = Counter("lineguard_frames", "Frames scored and published", ["verdict"],
                              registry=self.registry)
        self.dead_letters = Counter("lineguard_dead_letters", "Frames sent to the dead-letter topic", ["reason"],
                                    registry=self.registry)
        self.batch_size = Histogram("lineguard_batch_size", "Frames per fetched batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.model_batch_size = Histogram("lineguard_model_batch_size", "Frames per model call (fetched batches "
                                          "that waited for the model are merged)",
                                          buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.model_seconds = Histogram("lineguard_model_seconds", "Model time per batch", buckets=LATENCY_BUCKETS,
                                       registry=self.registry)
        self.text_seconds = Histogram("lineguard_text_seconds", "LVLM time per text batch", buckets=LATENCY_BUCKETS,
                                      registry=self.registry)
        self.latency = Histogram("lineguard_latency_seconds", "Per-frame latency by stage", ["stage"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.frame_memory = Gauge("lineguard_frame_memory_bytes", "Memory reserved by the frames in flight "
                                  "(LINEGUARD_WORKER_MEMORY_MB caps it)", registry=self.registry)
        self.consumer_lag = Gauge("lineguard_consumer_lag", "Frames on assigned partitions not yet committed",
                                  registry=self.registry)

    def mean_model_batch(self) -> float:
        samples = {s.name: s.value for metric in self.model_batch_size.collect() for s in metric.samples}
        count = samples.get("lineguard_model_batch_size_count", 0.0)
        return samples.get("lineguard_model_batch_size_sum", 0.0) / count if count else 0.0

    def dead_letters_total(self) -> float:
        return sum(sample.value for metric in self.dead_letters.collect() for sample in metric.samples
                   if sample.name.endswith("_total"))

    def frames_total(self) -> float:
        return sum(sample.value for metric in self.frames.collect() for sample in metric.samples
                   if sample.name.endswith("_total"))
