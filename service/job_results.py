"""A job's results streamed as NDJSON, a page at a time, to readers that may stop reading."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response

from service import metrics
from service.errors import ApiError
from storage.jobs import JobQueue

log = logging.getLogger(__name__)

# A results page (RESULTS_PAGE lines) takes a few milliseconds to read and encode: the pause
# after it, as long as it took, is capped here.
PAGE_PAUSE_S = 0.05

# One page of job results read and encoded at a time per worker (ResultsStream).
_READING: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def results_ndjson(queue: JobQueue, job_id: str, after: int, size: int) -> tuple[bytes, int, int]:
    """Up to `size` of a job's results after index `after` as NDJSON lines: (the lines, the last
    index, how many). Run on a database thread, the encoding too: encoded on the event loop, the
    pages of 34 readers at once held it for seconds (make abuse, readers that stop reading)."""
    rows = queue.results_page(job_id, after, size)
    lines = "".join(
        f'{{"index":{r["index"]},"label":{json.dumps(r["label"])},"score":{r["score"]!r},"probabilities":'
        f'{{"negative":{r["probabilities"]["negative"]!r},"positive":{r["probabilities"]["positive"]!r}}}}}\n'
        for r in rows
    )
    return lines.encode(), (rows[-1]["index"] if rows else after), len(rows)


class ResultsStream(Response):
    """A job's results as NDJSON, read and encoded a page at a time through `page` (on the
    database threads), each page sent before the next is read. A reader that takes no bytes for
    `send_timeout_s` (the socket's buffers full) is cut off: the request ends, freeing its slot."""

    media_type = "application/x-ndjson"

    def __init__(
        self, page: Callable[[int], Awaitable[tuple[bytes, int, int]]], size: int, send_timeout_s: float
    ) -> None:
        super().__init__(media_type=self.media_type)
        del self.headers["content-length"]  # streamed; FastAPI adds the endpoint's headers (RateLimit)
        self.page = page
        self.size = size
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Pages until the last; the response ends early when the client goes away (no page is
        read for nobody), takes no bytes for the send timeout, or has taken ten send timeouts in
        all (a reader that takes a few bytes now and then would otherwise hold its slot for hours)."""
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await self._stream(send, gone, asyncio.get_running_loop().time() + 10 * self.send_timeout_s)
        finally:
            watcher.cancel()

    async def _stream(self, send: Any, gone: asyncio.Event, deadline: float) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        after = -1
        loop = asyncio.get_running_loop()
        while True:
            if gone.is_set():
                return
            if loop.time() > deadline:
                metrics.JOB_READERS_CUT.inc()
                log.warning("a results reader cut off after %g s in all", 10 * self.send_timeout_s)
                return
            page = await self._read(after)
            if page is None:
                log.warning("job results cut off: the database did not answer for %g s", self.send_timeout_s)
                return  # the server closes the unfinished response; the client reads again later
            body, after, count = page
            last = count < self.size
            try:
                await asyncio.wait_for(
                    send({"type": "http.response.body", "body": body, "more_body": not last}), self.send_timeout_s
                )
            except TimeoutError:
                metrics.JOB_READERS_CUT.inc()
                log.warning("a results reader took nothing for %g s: cut off", self.send_timeout_s)
                return  # the server closes the unfinished response
            if last:
                return

    async def _read(self, after: int) -> tuple[bytes, int, int] | None:
        """The next page, one stream's at a time per worker (its read and encoding hold the GIL,
        as a body's parsing does), and no stream's next page for as long again: results take at
        most half of a worker, the rest is left to interactive requests (make abuse, 50 readers
        that stop reading: p95 x2.11 of quiet without the pause). Tried again while the database
        threads refuse it (busy, 503) for up to the send timeout, since the answer has begun and
        cannot become a 503 now."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.send_timeout_s
        reading = _READING.setdefault(loop, asyncio.Semaphore(1))
        while True:
            try:
                async with reading:
                    began = loop.time()
                    page = await self.page(after)
                    # at most PAGE_PAUSE_S: a page slow for the database's sake (its threads
                    # busy, PostgreSQL slow) would otherwise pause every stream of the worker
                    await asyncio.sleep(min(loop.time() - began, PAGE_PAUSE_S))
                    return page
            except ApiError:
                if time.monotonic() >= deadline:
                    return None
                await asyncio.sleep(0.2)
