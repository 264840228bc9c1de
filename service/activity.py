"""When this instance last served an interactive prediction, as every worker of it sees it.

Bulk jobs run on idle capacity. A job's forward calls slow interactive requests even from a
thread at the lowest CPU priority: the two cores share caches and memory bandwidth, and the
event loops share the GIL with it (docs/performance.md, Bulk jobs beside interactive traffic).
So a worker starts a job's sub-batch only once the whole instance has been quiet for a moment,
which its workers can tell only together: each marks the start and end of every interactive
prediction in one shared 8-byte slot (CLOCK_MONOTONIC, the same clock in every process of the
machine), a single aligned store in a file mapped by all of them (SPILL_DIR/activity). A store
that races another keeps one of two times a few microseconds apart. No library offers a
cross-process "last seen" this cheap (a lock or a Redis round trip per request would cost more than
the store).
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

SLOT = struct.Struct("d")


class Activity:
    """The time of the instance's last interactive mark, shared by its workers (a file in
    `folder`), or this process's own when the file cannot be mapped."""

    def __init__(self, folder: Path | None) -> None:
        self._map: mmap.mmap | None = None
        self._local = 0.0
        if folder is None:
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / "activity", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < SLOT.size:
                    os.ftruncate(fd, SLOT.size)
                self._map = mmap.mmap(fd, SLOT.size)
            finally:
                os.close(fd)
        except OSError:  # a read-only folder: each worker watches its own requests only
            self._map = None

    def mark(self) -> None:
        now = time.monotonic()
        self._local = now
        if self._map is not None:
            SLOT.pack_into(self._map, 0, now)

    def quiet_for(self) -> float:
        """Seconds since the last interactive mark of any worker of the instance."""
        last = self._local
        if self._map is not None:
            last = max(last, SLOT.unpack_from(self._map, 0)[0])
        return time.monotonic() - last

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
