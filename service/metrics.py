"""Prometheus metrics of the service, beside BentoML's own `bentoml_*` series.

Under `bentoml serve` every worker writes its values to BentoML's multiprocess directory and
`/metrics` shows them summed over workers (gauges as their `multiprocess_mode` says). The
docs/monitoring.md lists every series; the dashboards and alert rules use only these and `up`.
Storage metrics (cache and limiter errors, analytics rows) are defined in their modules; the
gauges of dependencies and memory are set by service/health.py's watcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from service.batching import BatchStats

# Endpoints as labels: the app's routes (register_endpoints), "other" for anything else.
ENDPOINTS: tuple[str, ...] = ()

HTTP_REQUESTS = Counter(
    "sentiment_http_requests_total",
    "Public HTTP requests answered, by endpoint and status code.",
    ["endpoint", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "sentiment_http_request_duration_seconds",
    "Time to answer a public HTTP request, by endpoint.",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0),
)
PREDICTIONS = Counter(
    "sentiment_predictions_total",
    "Predictions answered, by endpoint, model, A/B variant (none outside the test), label and cached.",
    ["endpoint", "model", "variant", "label", "cached"],
)
PREDICTION_SECONDS = Histogram(
    "sentiment_prediction_duration_seconds",
    "Time from cache lookup to answer for one request's predictions, by endpoint and A/B variant.",
    ["endpoint", "variant"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
CACHE_LOOKUPS = Counter(
    "sentiment_cache_lookups_total",
    "Prediction cache lookups, one per text, by result (hit or miss; a failed lookup is a miss).",
    ["result"],
)
INFERRED_TEXTS = Counter(
    "sentiment_inferred_texts_total",
    "Texts run through a model (cache misses), by model.",
    ["model"],
)
INFERENCE_BATCH_TEXTS = Histogram(
    "sentiment_inference_batch_texts",
    "Texts per model forward call of the in-process batcher.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
INFERENCE_SECONDS = Histogram(
    "sentiment_inference_seconds",
    "Time of one model forward call of the in-process batcher.",
    ["model"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
INFERENCE_CPU_SECONDS = Counter(
    "sentiment_inference_cpu_seconds_total",
    "CPU time of the forward calls (tokenizer, model, probabilities) in the inference threads, by model.",
    ["model"],
)
QUEUE_WAIT_SECONDS = Histogram(
    "sentiment_inference_queue_wait_seconds",
    "Time a request's texts waited in the batcher's queue before their forward call started.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0),
)
RATE_LIMITED = Counter(
    "sentiment_rate_limited_requests_total",
    "Requests refused with 429 by the per-client rate limit, by endpoint.",
    ["endpoint"],
)
OVERLOAD_REJECTIONS = Counter(
    "sentiment_overload_rejections_total",
    "Requests refused with 503 for overload, by endpoint and reason (queue_delay, loop_lag or in_flight).",
    ["endpoint", "reason"],
)
DEPENDENCY_UP = Gauge(
    "sentiment_dependency_up",
    "1 when a dependency answers (embedded ones always do), 0 when it is down; the lowest over workers.",
    ["dependency", "backend"],
    multiprocess_mode="livemin",
)
RESIDENT_MEMORY = Gauge(
    "sentiment_process_resident_memory_bytes",
    "Resident memory of the service's worker processes, summed over live workers.",
    multiprocess_mode="livesum",
)
MEMORY_LIMIT = Gauge(
    "sentiment_memory_limit_bytes",
    "Memory the service may use: the cgroup limit, or the machine's memory when there is none.",
    multiprocess_mode="livemax",
)
CPUS = Gauge(
    "sentiment_cpus",
    "CPUs the instance sizes its workers and threads by, and what decided it (affinity, or a cgroup quota).",
    ["source"],
    multiprocess_mode="livemax",
)
CONCURRENCY_LIMIT = Gauge(
    "sentiment_concurrency_limit",
    "Requests the service's workers take at once: each worker's adaptive limit, summed over live workers.",
    multiprocess_mode="livesum",
)
SATURATION = Gauge(
    "sentiment_saturation",
    "How close a worker is to shedding, 0 to 1, averaged over the last few seconds, the busiest worker's: "
    "signal=in_flight, requests in flight as a share of its adaptive limit; signal=queue_delay, the batcher's "
    "queue wait as a share of MAX_QUEUE_DELAY_MS. At 1 it refuses requests with 503 (docs/scaling.md).",
    ["signal"],
    multiprocess_mode="livemax",
)
JOB_TEXTS = Counter(
    "sentiment_job_texts_total",
    "Texts of bulk jobs scored (by this instance's workers).",
)
JOB_CHUNK_FAILURES = Counter(
    "sentiment_job_chunk_failures_total",
    "Attempts at a bulk job's chunk that failed, by outcome: retried, or the job failed (JOB_MAX_ATTEMPTS).",
    ["outcome"],
)
for _outcome in ("retried", "job_failed"):
    JOB_CHUNK_FAILURES.labels(_outcome)
JOB_READERS_CUT = Counter(
    "sentiment_job_readers_cut_total",
    "Job results readers cut off for taking no bytes for JOB_SEND_TIMEOUT_SECONDS.",
)
JOBS = Gauge(
    "sentiment_jobs",
    "Bulk jobs in the database by status (every replica reads the same table: take the max).",
    ["status"],
    multiprocess_mode="livemax",
)
JOB_OLDEST_QUEUED = Gauge(
    "sentiment_job_oldest_queued_seconds",
    "Age of the oldest job no worker has started.",
    multiprocess_mode="livemax",
)
JOB_STALLED = Gauge(
    "sentiment_job_stalled_seconds",
    "Seconds since the least recently progressed queued or running job last advanced.",
    multiprocess_mode="livemax",
)
for _status in ("queued", "running", "done", "failed", "cancelled"):
    JOBS.labels(_status)

# Series that exist from the start, at zero: a rate of "none yet" is 0, not "no data".
for _result in ("hit", "miss"):
    CACHE_LOOKUPS.labels(_result)


def register_endpoints(routes: Sequence[str], guarded: Sequence[str]) -> None:
    """The endpoint labels: the app's `routes`; the `guarded` ones' refusal series start at zero."""
    global ENDPOINTS
    ENDPOINTS = tuple(routes)
    for endpoint in guarded:
        RATE_LIMITED.labels(endpoint)
        for reason in ("in_flight", "queue_delay", "loop_lag"):
            OVERLOAD_REJECTIONS.labels(endpoint, reason)


def endpoint_label(path: str) -> str:
    """A bounded label for `path`: itself when it is a route, its template for a job's paths
    (`/jobs/{job_id}`, `/jobs/{job_id}/results`), else "other"."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/jobs/"):
        template = "/jobs/{job_id}/results" if path.endswith("/results") else "/jobs/{job_id}"
        if template in ENDPOINTS:
            return template
    return "other"


def observe_jobs(stats: dict) -> None:
    """The job queue's state, as JobQueue.stats gives it."""
    for status in ("queued", "running", "done", "failed", "cancelled"):
        JOBS.labels(status).set(stats["by_status"].get(status, 0))
    JOB_OLDEST_QUEUED.set(stats["oldest_queued_seconds"])
    JOB_STALLED.set(stats["least_recent_progress_seconds"])


def observe_batch(stats: BatchStats) -> None:
    """One forward call of the batcher."""
    INFERENCE_SECONDS.labels(stats.model).observe(stats.seconds)
    INFERENCE_BATCH_TEXTS.labels(stats.model).observe(stats.texts)
    INFERRED_TEXTS.labels(stats.model).inc(stats.texts)
    INFERENCE_CPU_SECONDS.labels(stats.model).inc(stats.cpu_seconds)


def observe_waits(waits: list[float]) -> None:
    """The queue waits of the requests a forward call starts on."""
    for wait in waits:
        QUEUE_WAIT_SECONDS.observe(wait)
