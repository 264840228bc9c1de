"""The spill files: rows that could not reach the database wait here on local disk, as JSON
lines, one file per process, until they are replayed. Knows nothing of SQL: replay hands the
rows to a write callable and removes a file once all its rows are in."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Row = dict[str, Any]


class SpillLog:
    """This process's spill file in `folder`, and replay of every process's files there."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / f"analytics-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"

    def append(self, rows: list[Row]) -> None:
        """Append `rows` (their `created_at` a datetime) durably: flushed and fsynced."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            with self.path.open("a", encoding="utf-8") as f:
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
                return

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("analytics-*.jsonl")) if self.folder.exists() else []

    def bytes(self) -> int:
        total = 0
        for path in self.files():
            try:
                total += path.stat().st_size
            except FileNotFoundError:  # replayed meanwhile
                continue
        return total

    def replay(self, write: Callable[[list[Row]], None], batch_size: int, done: Callable[[int], None]) -> None:
        """Hand every file's rows to `write` in batches, file by file; a file is removed once all
        its rows are in (then `done(rows)`), and skipped while another process replays it. An
        error from `write` propagates, leaving that file for the next attempt."""
        for path in self.files():
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
                    for i in range(0, len(rows), batch_size):
                        write(rows[i : i + batch_size])
                    path.unlink()
                done(len(rows))
                log.warning("replayed %s analytics rows from %s", len(rows), path.name)
            except FileNotFoundError:
                continue
