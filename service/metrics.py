"""Prometheus metrics of the service, beside BentoML's own; summed over workers on /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

INFERRED_TEXTS = Counter(
    "sentiment_inferred_texts_total",
    "Texts run through a model (cache misses), by model.",
    ["model"],
)
INFERENCE_BATCH_TEXTS = Histogram(
    "sentiment_inference_batch_texts",
    "Texts per model forward call of the batched infer API.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
INFERENCE_SECONDS = Histogram(
    "sentiment_inference_seconds",
    "Time of one model forward call of the batched infer API.",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
