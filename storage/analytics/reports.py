"""The analytics reports: /analytics/summary and /analytics/ab.

The window's whole hours and minutes come from `prediction_counts` and only its first, partial
minute from `predictions`, so the counts cost about the same for 1,000 or 1,000,000 rows in the
window. Percentiles need the latencies themselves: see Reports._percentiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, Engine, FromClause, bindparam, case, func, literal, select, text, union_all

from storage.analytics.records import utcnow
from storage.analytics.stats import percentile, rounded, two_proportion_p_value, wilson_interval
from storage.tables import feedback, prediction_counts, predictions, request_errors

# Up to this many rows in a window, latency percentiles are exact; beyond, they may come from
# a page sample of about this many rows (Reports._percentiles).
EXACT_PERCENTILE_ROWS = 20_000
# The same on SQLite, where the rows are sorted in Python (docs/decisions.md, "SQLite percentiles
# from a rowid sample").
SQLITE_PERCENTILE_ROWS = 5_000


class Reports:
    """The reports, read from the analytics database at `engine`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _read(self):
        """A connection for the reports; on PostgreSQL with room to sort a sampled window in memory."""
        conn = self.engine.connect()
        if self.engine.dialect.name == "postgresql":
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
        if self.engine.dialect.name == "postgresql" and rows > EXACT_PERCENTILE_ROWS:
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
        if self.engine.dialect.name == "postgresql":
            cols = [func.percentile_cont(q).within_group(t.latency_ms) for q in quantiles]
            result = conn.execute(select(*keys, func.count(), *cols).where(*where).group_by(*keys)).all()
            return {
                (r[0] if by_variant else None): ([rounded(v) for v in r[len(keys) + 1 :]], int(r[len(keys)]))
                for r in result
            }
        # SQLite has no percentile_cont: the window's latencies (or a sample of them) are sorted
        # here instead.
        if rows > SQLITE_PERCENTILE_ROWS:
            rows_read: Any = self._sqlite_sample(conn, since, rows, by_variant)
        else:
            rows_read = conn.execute(select(*keys, t.latency_ms).where(*where))
        grouped: dict[Any, list[float]] = {}
        if by_variant:
            for variant, latency in rows_read:
                grouped.setdefault(variant, []).append(latency)
        elif latencies := [row[0] for row in rows_read]:
            grouped[None] = latencies
        return {k: ([rounded(percentile(sorted(v), q)) for q in quantiles], len(v)) for k, v in grouped.items()}

    @staticmethod
    def _sqlite_sample(conn, since: datetime, rows: int, by_variant: bool) -> list[Any]:
        """About SQLITE_PERCENTILE_ROWS of the window's `rows` rows on SQLite, as (variant,) latency.

        The window's rowids are read from an index on `created_at` (all rows, or the A/B rows'
        partial index) and a row is picked when a multiplicative hash of its rowid falls in the
        first 1/`step` of its range: the same rows on every call while the table is unchanged,
        whatever order they were written in (a spill log's replay writes old rows late), and no
        period in the traffic lines up with the picks. Only the picked rows are read.
        """
        step = -(-rows // SQLITE_PERCENTILE_ROWS)  # rounded up: about SQLITE_PERCENTILE_ROWS picks
        index, variant, ab_only = (
            ("ix_predictions_ab_created_at", "p.variant, ", "variant IS NOT NULL AND ")
            if by_variant
            else ("ix_predictions_created_at", "", "")
        )
        sql = f"""
            SELECT {variant}p.latency_ms FROM predictions AS p WHERE p.rowid IN (
                SELECT rowid FROM predictions INDEXED BY {index}
                WHERE {ab_only}created_at >= :since AND (rowid * 2654435761) % (4294967296 * :step) < 4294967296
            )
        """
        bound = text(sql).bindparams(bindparam("since", type_=DateTime(timezone=True)))
        return conn.execute(bound, {"since": since, "step": step}).all()

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
