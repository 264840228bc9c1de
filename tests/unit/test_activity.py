"""The instance's shared "last interactive prediction" time (service/activity.py)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from service.activity import Activity


def _mark(folder: str) -> None:
    Activity(Path(folder)).mark()


def test_a_mark_in_one_process_is_seen_by_another(tmp_path: Path) -> None:
    watcher = Activity(tmp_path)
    time.sleep(0.2)
    assert watcher.quiet_for() > 0.2  # nothing marked yet: quiet since the clock's start
    process = multiprocessing.get_context("spawn").Process(target=_mark, args=(str(tmp_path),))
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 0
    quiet = watcher.quiet_for()
    assert 0 <= quiet < 30  # the other process's mark, moments ago
    time.sleep(0.1)
    assert watcher.quiet_for() >= quiet + 0.1
    watcher.mark()
    assert watcher.quiet_for() < 0.1
    watcher.close()


def test_without_a_folder_a_worker_sees_its_own_marks(tmp_path: Path) -> None:
    alone, other = Activity(None), Activity(tmp_path)
    other.mark()
    assert alone.quiet_for() > 1  # not shared
    alone.mark()
    assert alone.quiet_for() < 0.1
