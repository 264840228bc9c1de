"""Analytics: every answered prediction, feedback and error, and the reports built from them.

records.py (the record and the AnalyticsStore protocol the service types against), writer.py
(buffer, writer thread, upserts), spill.py (rows on local disk while the database is down; no
SQL), reports.py (the two reports), stats.py (their statistics), store.py (SqlAnalyticsStore,
the one sink). Imports storage.db and storage.tables only; the service imports this package.
"""

from storage.analytics.records import AnalyticsStore, PredictionRecord, utcnow
from storage.analytics.store import SqlAnalyticsStore

__all__ = ["AnalyticsStore", "PredictionRecord", "SqlAnalyticsStore", "utcnow"]
