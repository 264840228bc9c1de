"""The local analytics log: every prediction row passes through it on its way to the database.

Before a prediction is answered, its row is appended to this process's log with one write(2),
made with the GIL held (`_libc_write`); the writer thread ships rows from the log to the database
and deletes what is in. No fsync per request: a SIGKILLed process's writes survive in the page
cache, and the writer fsyncs once per flush. Knows nothing of SQL.

On disk, in one folder shared by the instance's workers (SPILL_DIR):
- `<owner>.lock`: held with flock(LOCK_EX) by its process for as long as it lives, so a lock
  anyone can take belongs to a dead process;
- `<owner>.<seq>.jsonl`: the owner's segments, JSON lines, a new one every `segment_bytes`.
A dead owner's segments are adopted by whichever process takes its lock first: a survivor
worker, or any worker of the next start. They are streamed, a batch at a time, never loaded
whole. The folder is capped at `max_bytes`: beyond it, rows are refused (the caller counts them
as dropped) rather than filling the disk.

Written here rather than taken from a library: the hand-off needs one unbuffered append per
request, crash ownership by flock and idempotent re-sending; the queue libraries on PyPI
(persist-queue, diskcache's Deque) commit through SQLite or fsync per item, or cannot be
streamed by another process after a SIGKILL.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Row = dict[str, Any]
# One segment file: big enough that rotation is rare, small enough that a dead worker's
# already-shipped rows, sent again on adoption, are few (about 3,000 rows).
SEGMENT_BYTES = 1 << 20


def _libc_write() -> Callable[[int, bytes], int] | None:
    """write(2) called with the GIL held (ctypes.PyDLL keeps it; os.write releases it).

    The append runs on a worker's event loop for every prediction. os.write releases the GIL for
    the call, and when another thread of the worker wants it meanwhile (the analytics writer, the
    inference thread between forward calls) the event loop gets it back only after that thread's
    switch interval (up to 5 ms). A page-cache append is a few
    microseconds: holding the GIL for it costs the other threads less than the hand-over costs the
    loop. None where the process's own symbols hold no write(2) (os.write then).

    PyDLL(None) is the symbols already loaded into the process, libc's among them: nothing is
    searched for at import (ctypes.util.find_library runs ldconfig in a subprocess)."""
    try:
        write = ctypes.PyDLL(None, use_errno=True).write
    except (OSError, AttributeError):
        return None
    write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    write.restype = ctypes.c_ssize_t

    def write_holding_gil(fd: int, data: bytes) -> int:
        while (n := write(fd, data, len(data))) < 0:
            code = ctypes.get_errno()
            if code != errno.EINTR:
                raise OSError(code, os.strerror(code))
        return n

    return write_holding_gil


_write = _libc_write() or os.write


def encode(rows: list[Row]) -> bytes:
    """Rows as JSON lines, `created_at` (a datetime) in ISO format."""
    return "".join(
        json.dumps({**row, "created_at": row["created_at"].isoformat()}, separators=(",", ":")) + "\n" for row in rows
    ).encode()


def decode(line: bytes) -> Row:
    row: Row = json.loads(line)
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row


def _segment_owner(path: Path) -> str:
    # "<owner>.<seq>.jsonl", or "<owner>.jsonl" as spill files of earlier versions were named.
    return path.name.split(".", 1)[0]


class SpillLog:
    """This process's log in `folder`, and adoption of dead processes' logs there."""

    def __init__(self, folder: Path | str, max_bytes: int = 1 << 30, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.owner = f"analytics-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._owner_fd: int | None = None
        self._fd: int | None = None
        self._seq = 0
        self._size = 0  # of the segment being appended to
        self._own_bytes = 0  # this process's segments on disk
        self._others_bytes = 0  # everyone else's, as last counted by `refresh_others`
        self._dirty = False
        self._torn = False  # a failed write may have left a partial line: end it first
        # The reader: the segment being shipped and the offset shipped up to in it.
        self._read_seq = 0
        self._read_offset = 0

    @property
    def path(self) -> Path:
        """The segment being appended to."""
        return self._segment(self._seq)

    def _segment(self, seq: int) -> Path:
        return self.folder / f"{self.owner}.{seq:06d}.jsonl"

    # --- the request path ----------------------------------------------------------------

    def append(self, data: bytes) -> bool:
        """Append encoded rows with one write(2); False, writing nothing, when the folder is at
        its cap. OSError (disk full, read-only) propagates for the caller to handle."""
        with self._lock:
            if self._own_bytes + self._others_bytes + len(data) > self.max_bytes:
                return False
            if self._fd is None or self._size >= self.segment_bytes:
                self._rotate()
            assert self._fd is not None
            if self._torn:
                data = b"\n" + data  # a blank line is skipped on reading; a torn one is ended
            written = 0
            try:
                written = _write(self._fd, data)
                while written < len(data):  # a short write (signal, nearly full disk): finish the lines
                    written += _write(self._fd, data[written:])
            finally:
                self._torn = written < len(data)
                self._size += written
                self._own_bytes += written
                self._dirty = True
            return True

    def _rotate(self) -> None:
        if self._owner_fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._owner_fd = os.open(self.folder / f"{self.owner}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._owner_fd, fcntl.LOCK_EX)
        if self._fd is not None:
            # forgotten before it is closed: if the next open fails, the next rotation must not
            # close this descriptor a second time (by then another file may have its number)
            fd, self._fd = self._fd, None
            os.close(fd)
            self._seq += 1
        self._fd = os.open(self._segment(self._seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0

    # --- the writer thread ---------------------------------------------------------------

    def sync(self) -> None:
        """fsync what was appended since the last call (once per flush, not per request)."""
        with self._lock:
            fd, dirty, self._dirty = self._fd, self._dirty, False
        if fd is not None and dirty:
            try:
                os.fsync(fd)
            except OSError as exc:  # rotated and closed meanwhile, or an I/O error: the next flush retries
                log.debug("fsync of the analytics log skipped: %s", exc)

    def read(self, max_rows: int) -> tuple[list[Row], Callable[[], None]]:
        """Up to `max_rows` complete rows not yet shipped, and the call that marks them shipped
        (deleting segments read to their end). Only the writer thread calls this."""
        rows: list[Row] = []
        seq, offset = self._read_seq, self._read_offset
        while len(rows) < max_rows:
            with self._lock:
                current = self._seq if self._fd is not None else -1
            if seq > current:
                break
            path = self._segment(seq)
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    for line in f:
                        if not line.endswith(b"\n"):
                            break  # an append still in progress: read it next time
                        offset += len(line)
                        if line.strip():
                            self._decode_into(rows, line, path)
                        if len(rows) >= max_rows:
                            break
            except FileNotFoundError:
                pass
            if len(rows) >= max_rows or seq == current:
                break
            seq, offset = seq + 1, 0  # a finished segment: go on to the next
        return rows, lambda: self._shipped(seq, offset)

    def _shipped(self, seq: int, offset: int) -> None:
        for done in range(self._read_seq, seq):
            self._remove(self._segment(done))
        self._read_seq, self._read_offset = seq, offset

    def _remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self._own_bytes -= size

    @staticmethod
    def _decode_into(rows: list[Row], line: bytes, path: Path) -> None:
        try:
            rows.append(decode(line))
        except (ValueError, KeyError, TypeError) as exc:
            # a line torn by a crash mid-write: skip it, keep the rest
            log.error("skipping an unreadable line of %s: %s", path.name, exc)

    def pending_bytes(self) -> int:
        """Bytes of this process's rows not yet shipped."""
        with self._lock:
            return self._own_bytes - self._read_offset

    def refresh_others(self) -> int:
        """Count the other processes' segments on disk (for the cap); returns the folder's total."""
        others = 0
        for path in self.files():
            if _segment_owner(path) != self.owner:
                try:
                    others += path.stat().st_size
                except FileNotFoundError:  # adopted and removed meanwhile
                    continue
        with self._lock:
            self._others_bytes = others
            return others + self._own_bytes

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("analytics-*.jsonl")) if self.folder.exists() else []

    def bytes(self) -> int:
        return self.refresh_others()

    # --- dead processes' logs ------------------------------------------------------------

    def adopt(self, write: Callable[[list[Row]], None], batch_size: int, done: Callable[[int], None]) -> None:
        """Ship every dead owner's segments through `write`, a batch at a time, removing each
        segment once all its rows are in (then `done(rows)`). A live owner's segments are left
        alone. An error from `write` propagates, leaving the rest for the next attempt; rows
        already sent are sent again then, which the idempotent insert absorbs."""
        owners = sorted({_segment_owner(p) for p in self.files()} - {self.owner})
        for owner in owners:
            fd = self._take(owner)
            if fd is None:
                continue
            try:
                for path in sorted(self.folder.glob(f"{owner}.*jsonl")):
                    rows = 0
                    for batch in self._stream(path, batch_size):
                        write(batch)
                        rows += len(batch)
                    path.unlink(missing_ok=True)
                    done(rows)
                    log.warning("replayed %s analytics rows from %s", rows, path.name)
                (self.folder / f"{owner}.lock").unlink(missing_ok=True)
            finally:
                os.close(fd)

    def _take(self, owner: str) -> int | None:
        """The dead owner's lock, held; None while it lives or another process adopts it."""
        lock = self.folder / f"{owner}.lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if os.fstat(fd).st_nlink == 0:  # adopted and removed meanwhile
            os.close(fd)
            return None
        return fd

    def _stream(self, path: Path, batch_size: int) -> Iterator[list[Row]]:
        batch: list[Row] = []
        try:
            with path.open("rb") as f:
                for line in f:
                    if line.strip():
                        self._decode_into(batch, line, path)
                    if len(batch) >= batch_size:
                        yield batch
                        batch = []
        except FileNotFoundError:
            return
        if batch:
            yield batch

    def close(self) -> None:
        """Close this process's files, removing what is shipped; unshipped segments stay for the
        next start (closing releases the lock, so they are anyone's to adopt)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        last = self._segment(self._read_seq)
        if self._read_offset and last.exists() and last.stat().st_size <= self._read_offset:
            self._remove(last)
        if not list(self.folder.glob(f"{self.owner}.*jsonl")):
            (self.folder / f"{self.owner}.lock").unlink(missing_ok=True)
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None
