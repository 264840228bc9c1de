"""Upgrades while serving: a replica of the previous release keeps working on the schema every
migration since that release leaves, because migrations only expand what a release reads and
writes (docs/decisions.md, "Migrations expand, then contract"). The previous release's own
storage code (git archive of its commit, CHANGELOG.md) runs against a real PostgreSQL migrated,
one revision at a time, by this code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from storage import migrate
from tests.support import releases

pytestmark = pytest.mark.integration

# What a replica does with the database, in the previous release's storage API: record rows and
# read the reports, take feedback, and run a bulk job from submission to its results.
OLD_REPLICA = """
import json, sys, uuid
from datetime import timedelta
import storage
from storage.analytics import PredictionRecord, SqlAnalyticsStore
from storage.db import make_engine
from storage.job_leases import Result
from storage.jobs import JobQueue

url, spill, tag = sys.argv[1:4]
store = SqlAnalyticsStore(url, spill_dir=spill)
records = [
    PredictionRecord(str(uuid.uuid4()), "/predict/ab", tag, "positive", 0.9, False, 5.0, "0" * 64, 4, variant="A")
    for _ in range(10)
]
store.record(records)
stored = store.flush()
store.record_feedback(records[0].request_id, "positive")
summary = store.summary(timedelta(hours=1))
ab = store.ab_report(timedelta(hours=1))
store.close()
queue = JobQueue(make_engine(url))
job = queue.submit(["good", "bad"], tag, "old-replica", "a" * 64)
chunk = queue.claim("old-worker", timedelta(seconds=30), [tag], 3)
queue.complete(chunk, [Result("positive", 0.9, 0.1, 0.9), Result("negative", 0.8, 0.8, 0.2)])
print(json.dumps({
    "storage": storage.__file__,
    "stored": stored,
    "by_model": summary["by_model"].get(tag),
    "ab_feedback": ab["variants"]["A"]["feedback"],
    "job": queue.status(job, "a" * 64)["status"],
    "results": [r["label"] for r in queue.results(job)],
}))
"""


def _revisions_since(release_head: str) -> list[str]:
    """This code's revisions from the release's head (included) to the newest, oldest first."""
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    newer = [r.revision for r in script.walk_revisions(base=release_head, head="heads")]
    return list(reversed(newer))


def test_the_previous_release_keeps_working_at_every_migration_since(database_url: str, tmp_path: Path) -> None:
    release = releases.previous()
    old = releases.checkout(release, tmp_path / "release", "storage")
    release_head = str(ScriptDirectory(str(old / "storage" / "migrations")).get_current_head())
    revisions = _revisions_since(release_head)
    assert revisions[0] == release_head and revisions[-1] == migrate.head(), revisions
    migrate.downgrade(database_url, release_head)  # the database as the release left it
    for i, revision in enumerate(revisions):
        migrate.upgrade(database_url, revision)  # this release's pods migrate while the old serve
        tag = f"old:{release.version}-{i}"
        run = subprocess.run(
            [sys.executable, "-c", OLD_REPLICA, database_url, str(tmp_path / f"spill-{i}"), tag],
            cwd=old,
            env={**os.environ, "PYTHONPATH": str(old)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, f"{release.version} at revision {revision}:\n{run.stderr[-3000:]}"
        seen = json.loads(run.stdout.strip().splitlines()[-1])
        assert seen["storage"].startswith(str(old)), seen  # the release's code, not this one's
        assert seen == {
            "storage": seen["storage"],
            "stored": 10,
            "by_model": 10,
            "ab_feedback": 1 + i,  # each round's one feedback, on the A rows of the last hour
            "job": "done",
            "results": ["positive", "negative"],
        }, (revision, seen)


def test_a_pod_of_an_older_release_starts_on_a_newer_schema(database_url: str) -> None:
    """A rollback, or the autoscaler adding an old pod mid-rollout: its init container's upgrade
    finds a revision it has no migration for, leaves the schema alone and exits 0."""
    import sqlalchemy as sa

    assert migrate.current(database_url) == {migrate.head()}
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:  # as a release with one more migration leaves it
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    engine.dispose()
    assert migrate.upgrade(database_url) is False
    run = subprocess.run(
        [sys.executable, "-m", "storage.migrate", "upgrade", "--url", database_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "newer than this code's head" in run.stdout and migrate.current(database_url) == {"0099"}
    with pytest.raises(Exception, match="0099"):  # an explicit target is still checked
        migrate.upgrade(database_url, migrate.head())
