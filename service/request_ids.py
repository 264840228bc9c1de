"""Request ids the service can recognise as its own: /feedback takes only those.

An id is a version-4 UUID whose first 8 bytes are random and whose last 8 bytes are an HMAC of
them under the service's key (62 bits of it; the UUID's version and variant bits take the
rest), so any worker of any replica holding the key tells an issued id from an invented one
without a database lookup: feedback can arrive before its prediction's row is written, and
while the database is down.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


class RandomBytes:
    """The kernel's random bytes (os.urandom), drawn 4 KiB at a time and handed out in slices.

    os.urandom releases the GIL around its getrandom(2) call. On a busy worker another thread
    (the inference thread between forward calls, the analytics writer) takes the GIL then, and
    the event loop waits for it to come back, up to the interpreter's switch interval (5 ms) per
    call (docs/decisions.md, "The GIL on the request path"). Two such calls per prediction (its request id and
    the response's X-Request-ID) become one per 128 predictions.
    """

    def __init__(self, chunk: int = 4096) -> None:
        self.chunk = chunk
        self._lock = threading.Lock()
        self._buffer = b""
        self._pos = 0
        os.register_at_fork(after_in_child=self._forget)  # a forked child must not repeat the parent's bytes

    def _forget(self) -> None:
        self._buffer, self._pos = b"", 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._pos + n > len(self._buffer):
                self._buffer, self._pos = os.urandom(max(self.chunk, n)), 0
            start, self._pos = self._pos, self._pos + n
            return self._buffer[start : self._pos]


RANDOM = RandomBytes()


def random_uuid() -> str:
    """A random (version 4) UUID, as uuid.uuid4() makes, from RANDOM."""
    return str(uuid.UUID(bytes=RANDOM.take(16), version=4))


class RequestIds:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _tag(self, head: bytes) -> bytes:
        return hmac.digest(self._key, head, "sha256")[:8]

    def new(self) -> str:
        head = bytearray(RANDOM.take(8))
        head[6] = (head[6] & 0x0F) | 0x40  # version 4
        tag = bytearray(self._tag(bytes(head)))
        tag[0] = (tag[0] & 0x3F) | 0x80  # RFC 4122 variant
        return str(uuid.UUID(bytes=bytes(head + tag)))

    def issued(self, request_id: uuid.UUID) -> bool:
        raw = request_id.bytes
        tag = bytearray(self._tag(raw[:8]))
        tag[0] = (tag[0] & 0x3F) | 0x80
        return hmac.compare_digest(bytes(tag), raw[8:])


def load_key(secret: str | None, admin_key: str | None, key_file: Path) -> bytes:
    """REQUEST_ID_KEY when set; else derived from ADMIN_API_KEY (replicas share it); else a
    random key kept in `key_file`, created once and shared by the instance's workers."""
    if secret:
        return secret.encode()
    if admin_key:
        return hmac.digest(admin_key.encode(), b"sentiment request ids", "sha256")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(200):  # another worker is writing it: wait for its 32 bytes
            key = key_file.read_bytes()
            if len(key) == 32:
                return key
            time.sleep(0.01)
        raise RuntimeError(f"{key_file} is not a 32-byte key; remove it to make a new one") from None
    key = os.urandom(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    log.info("request id key created in %s (set REQUEST_ID_KEY to share one between replicas)", key_file)
    return key
