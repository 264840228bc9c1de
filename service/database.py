"""The endpoints' blocking database calls (feedback, the analytics reports, the health probe),
on a few threads of their own: a database that hangs holds those threads only, never the
event loop's default pool, nor the cache and limiter calls. A call that fails, or does not
answer in time, is a 503 with Retry-After, never a 500."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from service.errors import ApiError

log = logging.getLogger(__name__)
T = TypeVar("T")


class DatabaseCalls:
    """At most `threads` blocking calls at once; more waiting than that are refused at once."""

    def __init__(self, threads: int = 4, timeout_s: float = 10.0) -> None:
        self.threads = threads
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="database")
        # Calls submitted and not finished, those given up on by a timeout included: their
        # threads are still held, so this is what says the database is stuck.
        self._unfinished = 0
        self._lock = threading.Lock()

    def _finished(self, _: object) -> None:
        with self._lock:
            self._unfinished -= 1

    async def run(self, call: Callable[..., T], *args: object, timeout_s: float | None = None) -> T:
        """`call(*args)` on the pool; ApiError 503 when the database fails, is slow or is stuck."""
        with self._lock:
            if self._unfinished >= 2 * self.threads:  # the threads are stuck: do not queue behind them
                raise ApiError(503, "analytics database not answering, retry later", {"Retry-After": "5"})
            self._unfinished += 1
        try:
            # counted out when the call ends, or when a timeout cancels it before it started
            try:
                submitted = self._pool.submit(call, *args)
            except RuntimeError:  # the pool is shut down: the service is stopping
                self._finished(None)
                raise ApiError(503, "service stopping, retry later", {"Retry-After": "5"}) from None
            submitted.add_done_callback(self._finished)
            return await asyncio.wait_for(asyncio.wrap_future(submitted), timeout_s or self.timeout_s)
        except TimeoutError as exc:
            raise ApiError(503, "analytics database not answering, retry later", {"Retry-After": "5"}) from exc
        except SQLAlchemyError as exc:
            log.warning("analytics database call failed: %s", exc)
            raise ApiError(503, "analytics database unavailable, retry later", {"Retry-After": "5"}) from exc

    @property
    def unfinished(self) -> int:
        """Calls submitted and neither finished nor cancelled before they started."""
        return self._unfinished

    @property
    def stuck(self) -> bool:
        """Every thread busy and as many calls waiting: the database is not answering."""
        return self._unfinished >= 2 * self.threads

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
