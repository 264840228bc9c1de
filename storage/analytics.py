"""The analytics store: every prediction, feedback and error, and the reports built from them.

Writes never happen on the request path: records go to an in-memory buffer that a background
thread flushes in batches with `INSERT ... ON CONFLICT DO NOTHING` on the request id, so a
record written twice is stored once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter, Gauge
from sqlalchemy import Engine, FromClause, case, func, literal, select, union_all
from sqlalchemy.dialects import postgresql, sqlite

from storage.db import make_engine
from storage.tables import feedback, prediction_counts, predictions, request_errors

log = logging.getLogger(__name__)

ANALYTICS_ROWS = Counter(
    "sentiment_analytics_rows_total",
    "Prediction rows by outcome: written to the database, spilled to disk, replayed from disk.",
    ["outcome"],
)
for _outcome in ("written", "spilled", "replayed"):
    ANALYTICS_ROWS.labels(_outcome)
ANALYTICS_BUFFERED = Gauge(
    "sentiment_analytics_buffered_rows",
    "Prediction rows waiting in memory for the database, summed over live workers.",
    multiprocess_mode="livesum",
)
ANALYTICS_SPILL_BYTES = Gauge(
    "sentiment_analytics_spill_bytes",
    "Bytes in the analytics spill files waiting to be replayed (one directory for all workers).",
    multiprocess_mode="livemax",
)


# Up to this many rows in a window, latency percentiles are exact; beyond, they may come from
# a page sample of about this many rows (SqlAnalyticsStore._percentiles).
EXACT_PERCENTILE_ROWS = 20_000


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class PredictionRecord:
    """One answered prediction, as stored (the text itself only when configured)."""

    request_id: str
    endpoint: str
    model: str
    label: str
    score: float
    cached: bool
    latency_ms: float
    text_sha256: str
    text_length: int
    variant: str | None = None
    text: str | None = None
    created_at: datetime = field(default_factory=utcnow)


class AnalyticsStore(Protocol):
    """What the service asks of its analytics sink (SqlAnalyticsStore is the one there is)."""

    @property
    def dialect(self) -> str:
        """ "sqlite" or "postgresql"."""
        ...

    @property
    def healthy(self) -> bool:
        """False from a failed write until the next successful one."""
        ...

    def start(self) -> None: ...

    def record(self, records: Iterable[PredictionRecord]) -> None: ...

    def record_error(self, endpoint: str, status: int) -> None: ...

    def record_feedback(self, request_id: str, label: str) -> None: ...

    def summary(self, window: timedelta) -> dict[str, Any]: ...

    def ab_report(self, window: timedelta) -> dict[str, Any]: ...

    def status(self) -> str: ...

    def update_gauges(self) -> None: ...

    def flush(self) -> int: ...

    def close(self) -> None: ...


# --- statistics for the A/B report -------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a proportion; None without observations."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def two_proportion_p_value(s1: int, n1: int, s2: int, n2: int) -> float | None:
    """Two-sided p-value of the pooled two-proportion z-test; None when it is undefined."""
    if n1 == 0 or n2 == 0:
        return None
    pooled = (s1 + s2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0 if s1 / n1 == s2 / n2 else 0.0
    z = (s1 / n1 - s2 / n2) / se
    return math.erfc(abs(z) / math.sqrt(2))


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile, as PostgreSQL's percentile_cont computes it."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(float(value), digits)


# --- the SQL store ------------------------------------------------------------------------


class SqlAnalyticsStore:
    """Analytics on SQLAlchemy: SQLite by default, PostgreSQL in production.

    Prediction rows wait in a bounded in-memory buffer for the writer thread. While the
    database is down, rows beyond `buffer_limit` are appended to a spill file on local disk
    (JSON lines, one file per process); on recovery, and at the next start, spill files are
    replayed. Every insert is `ON CONFLICT (request_id) DO NOTHING`, so a row replayed twice
    is stored once, and no answered prediction is lost while the disk holds.
    """

    def __init__(
        self,
        url: str,
        store_text: bool = False,
        flush_interval: float = 0.5,
        batch_size: int = 500,
        buffer_limit: int = 10_000,
        spill_dir: Path | str = Path("var/spill"),
    ) -> None:
        self.url = url
        self.engine: Engine = make_engine(url)
        self.store_text = store_text
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.spill_dir = Path(spill_dir)
        self._spill_file = self.spill_dir / f"analytics-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._buffer: deque[dict[str, Any]] = deque()
        self._errors: deque[dict[str, Any]] = deque()
        self._buffer_limit = buffer_limit
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._healthy = True
        self._thread: threading.Thread | None = None
        self.spilled = 0
        self.replayed = 0
        self.written = 0

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    # writes

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="analytics-writer", daemon=True)
            self._thread.start()

    def record(self, records: Iterable[PredictionRecord]) -> None:
        rows = []
        for rec in records:
            row = asdict(rec)
            if not self.store_text:
                row["text"] = None
            rows.append(row)
        with self._lock:
            self._buffer.extend(rows)
            size = len(self._buffer)
        # Never blocks or raises on the request path: overflow is spilled by the writer thread.
        if size >= self.batch_size or size > self._buffer_limit:
            self._wake.set()

    def record_error(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._errors.append({"created_at": utcnow(), "endpoint": endpoint, "status": status})
            if len(self._errors) > self._buffer_limit:
                self._errors.popleft()  # error counts are statistics: the oldest may go

    def record_feedback(self, request_id: str, label: str) -> None:
        ins = self._insert(feedback).values(request_id=request_id, label=label, created_at=utcnow())
        stmt = ins.on_conflict_do_update(
            index_elements=[feedback.c.request_id],
            set_={"label": ins.excluded.label, "created_at": ins.excluded.created_at},
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def _insert(self, table):
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        """Insert the rows not yet stored, and count exactly those in `prediction_counts`."""
        unique = list({row["request_id"]: row for row in rows}.values())
        stmt = (
            self._insert(predictions)
            .on_conflict_do_nothing(index_elements=[predictions.c.request_id])
            .returning(predictions.c.request_id)
        )
        with self.engine.begin() as conn:
            inserted = set(conn.execute(stmt, unique).scalars())
            counts: dict[tuple, list] = {}
            for row in unique:
                if row["request_id"] in inserted:
                    rest = (row["endpoint"], row["model"], row["variant"] or "", row["label"], bool(row["cached"]))
                    minute = row["created_at"].replace(second=0, microsecond=0)
                    for period, start in ((60, minute), (3600, minute.replace(minute=0))):
                        c = counts.setdefault((period, start, *rest), [0, 0.0])
                        c[0] += 1
                        c[1] += row["score"]
            if counts:
                # Sorted keys: concurrent writers lock the count rows in one order, never deadlock.
                names = ("period_s", "period_start", "endpoint", "model", "variant", "label", "cached")
                values = [
                    {**dict(zip(names, key, strict=True)), "n": n, "score_sum": score}
                    for key, (n, score) in sorted(counts.items())
                ]
                ins = self._insert(prediction_counts)
                upsert = ins.on_conflict_do_update(
                    index_elements=[prediction_counts.c[name] for name in names],
                    set_={
                        "n": prediction_counts.c.n + ins.excluded.n,
                        "score_sum": prediction_counts.c.score_sum + ins.excluded.score_sum,
                    },
                )
                conn.execute(upsert, values)

    # spill file

    def _spill(self, rows: list[dict[str, Any]]) -> None:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        while True:
            with self._spill_file.open("a", encoding="utf-8") as f:
                # The same lock a replaying process holds while it reads and unlinks a file;
                # a file unlinked meanwhile is reopened, so no row lands in a deleted file.
                fcntl.flock(f, fcntl.LOCK_EX)
                if os.fstat(f.fileno()).st_nlink == 0:
                    continue
                # A leading newline ends any line a failed earlier write left torn (blank lines
                # are skipped on replay), so a torn line never swallows the next row.
                f.write("\n")
                for row in rows:
                    f.write(json.dumps({**row, "created_at": row["created_at"].isoformat()}) + "\n")
                f.flush()
                os.fsync(f.fileno())
                break
        self.spilled += len(rows)
        ANALYTICS_ROWS.labels("spilled").inc(len(rows))

    def _spill_overflow(self) -> None:
        """Move the oldest rows beyond half the buffer limit to the spill file."""
        with self._lock:
            if len(self._buffer) <= self._buffer_limit:
                return
            excess = len(self._buffer) - self._buffer_limit // 2
            rows = [self._buffer.popleft() for _ in range(excess)]
        try:
            self._spill(rows)
        except OSError as exc:  # disk full or not writable: keep them in memory rather than lose them
            with self._lock:
                self._buffer.extendleft(reversed(rows))
            log.error("cannot write the analytics spill file %s: %s", self._spill_file, exc)

    def spill_files(self) -> list[Path]:
        return sorted(self.spill_dir.glob("analytics-*.jsonl")) if self.spill_dir.exists() else []

    def _replay(self) -> None:
        """Write spilled rows back, file by file; a file is removed once all its rows are in."""
        for path in self.spill_files():
            try:
                with path.open("r+", encoding="utf-8") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # another worker is replaying it
                    if os.fstat(f.fileno()).st_nlink == 0:
                        continue  # replayed and removed by another worker meanwhile
                    rows = []
                    for n, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            row = json.loads(line)
                            row["created_at"] = datetime.fromisoformat(row["created_at"])
                        except (ValueError, KeyError) as exc:
                            # a line torn by a crash mid-write: skip it, keep the rest
                            log.error("skipping unreadable line %s of %s: %s", n, path.name, exc)
                            continue
                        rows.append(row)
                    for i in range(0, len(rows), self.batch_size):
                        self._write(rows[i : i + self.batch_size])
                    path.unlink()
                self.replayed += len(rows)
                ANALYTICS_ROWS.labels("replayed").inc(len(rows))
                log.warning("replayed %s analytics rows from %s", len(rows), path.name)
            except FileNotFoundError:
                continue

    # flushing

    def _flush_errors(self) -> None:
        with self._lock:
            rows = list(self._errors)
            self._errors.clear()
        if not rows:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(request_errors.insert(), rows)
        except Exception:
            with self._lock:
                self._errors.extendleft(reversed(rows))

    def flush(self) -> int:
        """Write everything buffered, then any spill files; returns the prediction rows written."""
        written = 0
        with self._flush_lock:
            while True:
                with self._lock:
                    batch = [self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer)))]
                if not batch:
                    break
                try:
                    self._write(batch)
                except Exception as exc:
                    with self._lock:
                        self._buffer.extendleft(reversed(batch))
                    if self._healthy:
                        log.warning("analytics database unavailable, buffering: %s", exc)
                    self._healthy = False
                    self._spill_overflow()
                    return written
                written += len(batch)
            if not self._healthy:
                log.warning("analytics database back; writing buffered rows")
            self._healthy = True
            self.written += written
            ANALYTICS_ROWS.labels("written").inc(written)
            try:
                self._flush_errors()
                self._replay()
            except Exception as exc:
                self._healthy = False
                log.warning("analytics replay interrupted: %s", exc)
        return written

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                log.exception("analytics writer failed; retrying")

    def close(self) -> None:
        """Stop the writer; flush what is buffered, or spill it if the database is down."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
        with self._lock:
            rows = list(self._buffer)
            self._buffer.clear()
        if rows:
            self._spill(rows)
        self.engine.dispose()

    @property
    def healthy(self) -> bool:
        """False from a failed write until the next successful one."""
        return self._healthy

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def spill_bytes(self) -> int:
        total = 0
        for path in self.spill_files():
            try:
                total += path.stat().st_size
            except FileNotFoundError:  # replayed meanwhile
                continue
        return total

    def update_gauges(self) -> None:
        ANALYTICS_BUFFERED.set(self.buffered)
        ANALYTICS_SPILL_BYTES.set(self.spill_bytes())

    def status(self) -> str:
        if self.dialect == "sqlite":
            return "sqlite"
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return "ok"
        except Exception:
            return "down"

    # reads: the window's whole hours and minutes come from `prediction_counts` and only its
    # first, partial minute from `predictions`, so the counts cost about the same for 1,000 or
    # 1,000,000 rows in the window. Percentiles need the latencies themselves: see _percentiles.

    def _read(self):
        """A connection for the reports; on PostgreSQL with room to sort a sampled window in memory."""
        conn = self.engine.connect()
        if self.dialect == "postgresql":
            conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
        return conn

    def _counts(self, conn, since: datetime, keys: Sequence[str], ab_only: bool = False) -> list[Any]:
        """Exact (key values..., n, score sum) per group of `keys` over the rows since `since`:
        hours from `since` rounded up to the hour, minutes before that, rows before the first
        whole minute."""
        first_minute = since.replace(second=0, microsecond=0)
        if first_minute < since:
            first_minute += timedelta(minutes=1)
        first_hour = first_minute.replace(minute=0)
        if first_hour < first_minute:
            first_hour += timedelta(hours=1)
        c, p = prediction_counts.c, predictions.c

        def periods(period: int, start: datetime, end: datetime | None):
            q = select(*[c[k] for k in keys], c.n.label("n"), c.score_sum.label("score")).where(
                c.period_s == period, c.period_start >= start
            )
            q = q if end is None else q.where(c.period_start < end)
            return q.where(c.variant != "") if ab_only else q

        raw_keys = [(func.coalesce(p.variant, "") if k == "variant" else p[k]).label(k) for k in keys]
        partial = select(*raw_keys, literal(1).label("n"), p.score.label("score")).where(
            p.created_at >= since, p.created_at < first_minute
        )
        if ab_only:
            partial = partial.where(p.variant.is_not(None))
        u = union_all(periods(3600, first_hour, None), periods(60, first_minute, first_hour), partial).subquery()
        group = [u.c[k] for k in keys]
        return conn.execute(select(*group, func.sum(u.c.n), func.sum(u.c.score)).group_by(*group)).all()

    def _percentiles(
        self, conn, since: datetime, quantiles: Sequence[float], rows: int, by_variant: bool = False
    ) -> dict[Any, tuple[list[float | None], int]]:
        """Latency percentiles since `since` (per variant, or under None for all rows), each with
        the number of rows it was computed from.

        On PostgreSQL, `percentile_cont` sorts the window's latencies: exact for up to
        EXACT_PERCENTILE_ROWS rows. A larger window is sampled page-wise (TABLESAMPLE SYSTEM,
        about EXACT_PERCENTILE_ROWS of its rows, the same pages on each call while the table is
        unchanged) when the sample reads fewer than 4x the window's rows; otherwise it is exact.
        """
        table: FromClause = predictions
        if self.dialect == "postgresql" and rows > EXACT_PERCENTILE_ROWS:
            percent = 100.0 * EXACT_PERCENTILE_ROWS / rows
            table_rows = conn.exec_driver_sql(
                "SELECT reltuples FROM pg_class WHERE oid = 'predictions'::regclass"
            ).scalar_one()
            # A page sample reads `percent` of the whole table but sorts only its sample: worth it
            # unless the table is much larger than the window (a short window on a long history).
            if table_rows * percent / 100 < 4 * rows:
                table = predictions.tablesample(func.system(percent), name="sampled", seed=literal(13))
        t = table.c
        where = [t.created_at >= since] + ([t.variant.is_not(None)] if by_variant else [])
        keys = [t.variant] if by_variant else []
        if self.dialect == "postgresql":
            cols = [func.percentile_cont(q).within_group(t.latency_ms) for q in quantiles]
            result = conn.execute(select(*keys, func.count(), *cols).where(*where).group_by(*keys)).all()
            return {
                (r[0] if by_variant else None): ([_round(v) for v in r[len(keys) + 1 :]], int(r[len(keys)]))
                for r in result
            }
        # SQLite has no percentile_cont: the window's latencies are sorted here instead.
        grouped: dict[Any, list[float]] = {}
        for row in conn.execute(select(*keys, t.latency_ms).where(*where).order_by(t.latency_ms)):
            grouped.setdefault(row[0] if by_variant else None, []).append(row[-1])
        return {k: ([_round(percentile(v, q)) for q in quantiles], len(v)) for k, v in grouped.items()}

    def summary(self, window: timedelta) -> dict[str, Any]:
        since = utcnow() - window
        total = hits = 0
        by_endpoint: dict[str, int] = {}
        by_model: dict[str, int] = {}
        by_label: dict[str, int] = {}
        with self._read() as conn:
            for endpoint, model, label, cached, n, _ in self._counts(
                conn, since, ("endpoint", "model", "label", "cached")
            ):
                n = int(n)
                total += n
                hits += n if cached else 0
                by_endpoint[endpoint] = by_endpoint.get(endpoint, 0) + n
                by_model[model] = by_model.get(model, 0) + n
                by_label[label] = by_label.get(label, 0) + n
            (p50, p95, p99), latency_rows = self._percentiles(conn, since, (0.5, 0.95, 0.99), total).get(
                None, ([None, None, None], 0)
            )
            errors = conn.execute(
                select(request_errors.c.status, func.count())
                .where(request_errors.c.created_at >= since)
                .group_by(request_errors.c.status)
            )
            by_status = {int(s): int(n) for s, n in errors}
        return {
            "window_seconds": int(window.total_seconds()),
            "total": total,
            "by_endpoint": by_endpoint,
            "by_model": by_model,
            "by_label": by_label,
            "cache_hit_rate": round(hits / total, 4) if total else None,
            "latency_ms": {"p50": p50, "p95": p95, "p99": p99},
            "latency_rows": latency_rows,
            "errors": sum(n for s, n in by_status.items() if s != 429),
            "rate_limited": by_status.get(429, 0),
            "errors_by_status": {str(s): n for s, n in sorted(by_status.items())},
        }

    def ab_report(self, window: timedelta) -> dict[str, Any]:
        since = utcnow() - window
        p = predictions.c
        variants: dict[str, dict[str, Any]] = {}
        with self._read() as conn:
            for variant, model, label, n, score_sum in self._counts(
                conn, since, ("variant", "model", "label"), ab_only=True
            ):
                n = int(n)
                v = variants.setdefault(variant, {"requests": 0, "models": {}, "labels": {}, "_score": 0.0})
                v["requests"] += n
                v["models"][model] = v["models"].get(model, 0) + n
                v["labels"][label] = v["labels"].get(label, 0) + n
                v["_score"] += float(score_sum)
            latencies = self._percentiles(
                conn, since, (0.5, 0.95), sum(v["requests"] for v in variants.values()), by_variant=True
            )
            # Feedback comes after its prediction, so the window bounds both sides of the join;
            # the A/B rows come from their covering index (request id and label included).
            judged = conn.execute(
                select(
                    p.variant,
                    func.count(),
                    func.coalesce(func.sum(case((feedback.c.label == p.label, 1), else_=0)), 0),
                )
                .select_from(feedback.join(predictions, feedback.c.request_id == p.request_id))
                .where(feedback.c.created_at >= since, p.created_at >= since, p.variant.is_not(None))
                .group_by(p.variant)
            )
            feedback_by_variant = {variant: (int(n), int(ok)) for variant, n, ok in judged}
        correct: dict[str, tuple[int, int]] = {}
        for name, v in variants.items():
            v["mean_score"] = round(v.pop("_score") / v["requests"], 4)
            (p50, p95), latency_rows = latencies.get(name, ([None, None], 0))
            v["latency_ms"] = {"p50": p50, "p95": p95}
            v["latency_rows"] = latency_rows
            n, ok = feedback_by_variant.get(name, (0, 0))
            interval = wilson_interval(ok, n)
            v["feedback"] = n
            v["accuracy"] = round(ok / n, 4) if n else None
            v["accuracy_ci95"] = [round(x, 4) for x in interval] if interval else None
            correct[name] = (ok, n)
        p_value = None
        if "A" in correct and "B" in correct:
            p_value = two_proportion_p_value(*correct["A"], *correct["B"])
        return {
            "window_seconds": int(window.total_seconds()),
            "variants": dict(sorted(variants.items())),
            "accuracy_difference_p_value": None if p_value is None else round(p_value, 6),
        }
