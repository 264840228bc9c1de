"""Bulk jobs in a worker: the runner that scores leased chunks on idle capacity, and the
parsing of a submitted job's body.

Interactive traffic first: the runner hands the batcher one sub-batch (at most the batcher's
batch size) at a time, and only while the batcher's queue is empty, so an interactive request
never waits behind more than one sub-batch. Cached texts are not inferred again; every text
scored is an analytics row under the endpoint `/jobs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import struct
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import timedelta
from typing import IO, Any

import ijson
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from service import metrics
from service.errors import ApiError
from service.predictions import Predictions
from service.schemas import check_text
from storage.jobs import Chunk, JobQueue, Result

log = logging.getLogger(__name__)
# Sub-batches of a chunk in the batcher at once: one running, the next queued behind it.
IN_FLIGHT = 2
# A job's sub-batch starts only once the instance has served no interactive prediction for
# JOB_QUIET_MS (service/activity.py): a forward call of a job slows one of an interactive request
# on the other core. Right after traffic, sub-batches are small (SMALL_SUB_BATCH texts, a short
# forward call that a request arriving meanwhile waits out quickly); after LONG_QUIET_S without
# traffic, the batcher's full size, the most texts per CPU second.
LONG_QUIET_S = 1.0
SMALL_SUB_BATCH = 8
# The lease of the chunk being scored is renewed every LEASE_RENEWALS-th of JOB_LEASE_SECONDS by
# a task of its own, whatever the scoring waits for. Renewed only before each sub-batch, it could
# run out under a healthy worker that was waiting: for a quiet instance (for as long as
# interactive traffic lasts), or for a forward call in the background lane (at nice 19, beside
# two busy processes of normal priority a thread got 0.8% of the CPU it gets alone, so one
# 32-text call can outlast a 10 s lease). Another worker then took the chunk and waited alike,
# and each such claim counted an attempt: after JOB_MAX_ATTEMPTS of them a healthy job failed
# ("its lease ran out"). Now a lease runs out when its worker's process or event loop is gone,
# or when one sub-batch has been in the background lane for HUNG_LEASES leases (a forward call
# taken for hung: the chunk is left to another worker, as before).
LEASE_RENEWALS = 3
HUNG_LEASES = 10

DbCall = Callable[..., Awaitable[Any]]


NDJSON_TYPES = ("application/x-ndjson", "application/jsonl")
# Bytes handed to the parser at once, on a worker thread: a hop per quarter MiB of body.
FEED_BYTES = 256 * 1024
# The parser takes a body a step at a time and lets the GIL go between steps, for as long as the
# step held it (at least YIELD_S): the event loop, waiting for it, runs then instead of after the
# interpreter's 5 ms switch interval, and a body's parse takes at most half the GIL (make abuse:
# interactive p95 with eight 64 MiB bodies parsing, x2.04-2.19 of quiet with 50 us yields after
# each step). A step of tiny texts is about 0.8 ms of CPU, of long texts 0.01 ms: the yields add
# about a second to the largest body, 64 MiB, of long texts, and double a tiny-texts body's time.
# A value may run for at most a text's most bytes (MAX_TEXT_CHARS characters of \\uXXXX escapes,
# surrogate pairs at 12 bytes) plus a step: past that the body holds an oversized text or
# padding, and is refused before the parser buffers more of it.
STEP_BYTES = 4 * 1024
YIELD_S = 0.00005
# A results page (RESULTS_PAGE lines) takes a few milliseconds to read and encode: the pause
# after it, as long as it took, is capped here.
PAGE_PAUSE_S = 0.05


class SpooledTexts:
    """A job's texts as they are parsed, in a temporary file past their first MiB (length-prefixed
    UTF-8), so a legitimate 64 MiB body costs a worker a MiB of memory, not 64: the texts are read
    back a batch at a time as they are stored."""

    def __init__(self, memory_bytes: int = 1 << 20) -> None:
        self.memory_bytes = memory_bytes
        self._buffer = bytearray()
        self._file: IO[bytes] | None = None
        self._count = 0

    def append(self, text: str) -> None:
        data = text.encode()
        self._buffer += LENGTH.pack(len(data))
        self._buffer += data
        self._count += 1
        if len(self._buffer) > self.memory_bytes:
            if self._file is None:
                # held across the request and closed by the endpoint (close), not a with block
                self._file = tempfile.TemporaryFile()  # noqa: SIM115
            self._file.write(self._buffer)
            self._buffer.clear()

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        parts: list[IO[bytes]] = [io.BytesIO(self._buffer)]
        if self._file is not None:
            self._file.seek(0)
            parts.insert(0, self._file)
        for part in parts:
            while header := part.read(LENGTH.size):
                (size,) = LENGTH.unpack(header)
                yield part.read(size).decode()
        if self._file is not None:
            self._file.seek(0, io.SEEK_END)

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


LENGTH = struct.Struct("<I")


class JobBody:
    """A job's texts, parsed as its body arrives by ijson's C event parser (yajl, without the
    event prefixes, whose length grows with the nesting: a body of `[[[[...` built gigabytes of
    them): `{"texts": [str, ...]}`, or NDJSON, a `{"text": str}` value a line. Each text is checked
    as it comes, and the body is refused (ApiError 400/413, naming the limit) at the first text
    past `max_texts`, at a value that runs longer than a text may be, at a value the schema does
    not allow (nesting included: the schema's depth is two), or past `max_bytes`. Its texts go to
    a file past their first MiB (SpooledTexts), so a request's memory stays small whatever it
    sends. Not thread-safe: `feed` and `close` are called one at a time (on a worker thread)."""

    def __init__(self, content_type: str, max_texts: int, max_text_chars: int, max_bytes: int) -> None:
        self.ndjson = content_type.split(";")[0].strip().lower() in NDJSON_TYPES
        self.max_texts = max_texts
        self.max_bytes = max_bytes
        self.max_value_bytes = 12 * max_text_chars + 1024
        self.texts = SpooledTexts()
        self.size = 0
        self._events = ijson.sendable_list()
        self._parser = ijson.basic_parse_coro(self._events, multiple_values=self.ndjson)
        # JSON: start -> object -> key -> array -> end_object -> end.
        # NDJSON, per line: start -> object -> key -> value -> start.
        self._state = "start"
        self._quiet = 0  # bytes fed since the parser last completed a value
        self._lines = 0  # NDJSON values complete (blank lines are not counted)
        self._last_step = b""

    @property
    def _where(self) -> str:
        return f"line {self._lines + 1}" if self.ndjson else f"texts: item {len(self.texts)}"

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise ApiError(413, f"request body exceeds {self.max_bytes} bytes (MAX_JOB_BODY_BYTES)")
        held = 0.0
        for at in range(0, len(data), STEP_BYTES):
            step = data[at : at + STEP_BYTES]
            if at:
                time.sleep(max(YIELD_S, held))
            began = time.thread_time()  # this thread's CPU: not the time it waited for the GIL
            self._send(step)
            self._last_step = step
            if self._events:
                self._quiet = 0
                self._take_events()
            else:
                self._quiet += len(step)
                if self._quiet > self.max_value_bytes:
                    raise _invalid(f"{self._where}: a value runs past {self.max_value_bytes} bytes (MAX_TEXT_CHARS)")
            held = time.thread_time() - began

    def close(self) -> SpooledTexts:
        """The texts, once the whole body is in."""
        try:
            self._parser.close()
        except ijson.JSONError:
            self._take_events()  # the values before the error first: their error, or its place
            # yajl's end of a stream of values with nothing after the last one but whitespace
            # (or nothing at all): NDJSON that ended where it should
            tail = self._last_step.rstrip()
            if not (self.ndjson and self._state == "start" and (not tail or tail.endswith(b"}"))):
                raise self._not_json() from None
        self._take_events()
        if self._state != ("start" if self.ndjson else "end"):
            raise _invalid(_LINE if self.ndjson else _SHAPE)
        if not self.texts:
            raise _invalid(f"texts: must hold 1 to {self.max_texts} texts (MAX_JOB_TEXTS), got 0")
        return self.texts

    def _send(self, data: bytes) -> None:
        try:
            self._parser.send(data)
        except ijson.JSONError:
            self._take_events()
            raise self._not_json() from None

    def _not_json(self) -> ApiError:
        return _invalid(f"{self._where}: not valid JSON" if self.ndjson else "body: request body is not valid JSON")

    def _take_events(self) -> None:
        """The parser's events so far: the common ones (a text of the array, a whole
        `{"text": str}` line) in a tight loop, the rest one at a time through the state machine
        (a 64 MiB body of tiny texts costs about half the CPU this way)."""
        events, i, n = self._events, 0, len(self._events)
        step = self._line_event if self.ndjson else self._json_event
        add = self._add
        while i < n:
            if self.ndjson and self._state == "start" and i + 3 < n:
                a, b, c, d = events[i], events[i + 1], events[i + 2], events[i + 3]
                if a == _START_MAP and b == _TEXT_KEY and c[0] == "string" and d == _END_MAP:
                    add(c[1])
                    self._lines += 1
                    i += 4
                    continue
            elif not self.ndjson and self._state == "array" and events[i][0] == "string":
                add(events[i][1])
                i += 1
                continue
            step(*events[i])
            i += 1
        del events[:]

    def _json_event(self, event: str, value: Any) -> None:
        state = self._state
        if state == "array" and event == "string":
            self._add(value)
        elif state == "array" and event == "end_array":
            self._state = "end_object"
        elif state == "array":
            raise _invalid(f"{self._where}: must be a string")
        elif (state, event) == ("start", "start_map"):
            self._state = "object"
        elif (state, event, value) == ("object", "map_key", "texts"):
            self._state = "key"
        elif (state, event) == ("key", "start_array"):
            self._state = "array"
        elif (state, event) == ("end_object", "end_map"):
            self._state = "end"
        else:
            raise _invalid(_SHAPE)

    def _line_event(self, event: str, value: Any) -> None:
        state = self._state
        if (state, event) == ("key", "string"):
            self._add(value)
            self._state = "value"
        elif (state, event) == ("start", "start_map"):
            self._state = "object"
        elif (state, event, value) == ("object", "map_key", "text"):
            self._state = "key"
        elif (state, event) == ("value", "end_map"):
            self._state = "start"
            self._lines += 1
        else:
            raise _invalid(f"{self._where}: {_LINE}")

    def _add(self, text: str) -> None:
        if len(self.texts) >= self.max_texts:
            raise _invalid(f"texts: must hold 1 to {self.max_texts} texts (MAX_JOB_TEXTS), got more")
        try:
            self.texts.append(check_text(text))
        except ValueError as exc:
            raise _invalid(f"{self._where}: {exc}") from None


_LINE = 'expected {"text": str}'
_START_MAP, _END_MAP, _TEXT_KEY = ("start_map", None), ("end_map", None), ("map_key", "text")
_SHAPE = 'texts: expected {"texts": [str, ...]}'


def _invalid(message: str) -> ApiError:
    return ApiError(400, f"invalid request: {message}")


# One body parsed at a time per worker: its thread holds the GIL while it parses, and more than
# one such thread per worker kept the event loop from interactive requests (make abuse: eight
# 64 MiB bodies at once). A body waiting here is not read meanwhile, so it costs no memory.
_PARSING: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
# Likewise one page of job results read and encoded at a time per worker (ResultsStream).
_READING: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


async def _feed(body: JobBody, data: bytes) -> None:
    parsing = _PARSING.setdefault(asyncio.get_running_loop(), asyncio.Semaphore(1))
    async with parsing:
        fed = asyncio.ensure_future(asyncio.to_thread(body.feed, data))
        try:
            await asyncio.shield(fed)
        except asyncio.CancelledError:
            # a thread cannot be stopped: the next body waits until this one's step is done,
            # and the endpoint closes the texts' file only after it
            await asyncio.wait({fed})
            raise


async def read_job_body(request: Request, body: JobBody, timeout_s: float) -> SpooledTexts:
    """Feed `body` the request's bytes as they arrive, a quarter MiB at a time on a worker
    thread, one body's at a time; 408 if the bytes have not all arrived within `timeout_s`
    (counted while waiting for them, not for the parser), 400 if the client went away."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    stream = request.stream().__aiter__()
    pending = bytearray()
    while True:
        try:
            data = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - loop.time()))
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ApiError(
                408,
                f"request body not received within {timeout_s:g} s (JOB_UPLOAD_TIMEOUT_SECONDS)",
                {"Connection": "close"},
            ) from None
        except ClientDisconnect:
            raise ApiError(400, "invalid request: body: the client went away before sending all of it") from None
        pending += data
        if len(pending) >= FEED_BYTES or body.size + len(pending) > body.max_bytes:
            chunk, pending = bytes(pending), bytearray()
            await _feed(body, chunk)
    await _feed(body, bytes(pending))
    return body.close()


def new_token() -> tuple[str, str]:
    """A job's bearer token (256 random bits) and the SHA-256 the database keeps of it."""
    token = secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


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


class JobRunner:
    """Leases chunks of any job, of any replica, and scores them while this worker is idle."""

    def __init__(
        self,
        queue: JobQueue,
        db: DbCall,
        predictions: Predictions,
        sub_batch: int,
        models: Sequence[str],
        lease: timedelta = timedelta(seconds=120),
        poll_s: float = 1.0,
        quiet_s: float = 0.05,
        max_attempts: int = 3,
        unserved: timedelta = timedelta(minutes=10),
    ) -> None:
        """`models`: the tags this worker serves; it takes only chunks of jobs queued under one."""
        self.queue = queue
        self.db = db
        self.predictions = predictions
        self.sub_batch = sub_batch
        self.models = tuple(models)
        self.max_attempts = max_attempts
        self.unserved = unserved
        self.lease = lease
        self.poll_s = poll_s
        self.quiet_s = quiet_s
        # The host name and process id alone can repeat: replicas on one host's network (the
        # air-gapped compose stack) share its name, and each container numbers its processes
        # alike. A random part keeps one worker from renewing or releasing another's leases.
        self.worker = f"{os.uname().nodename[:32]}-{os.getpid()}-{secrets.token_hex(4)}"
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # When the chunk being scored last showed it is not stuck: a sub-batch done, or a turn of
        # the wait for a quiet instance (_keep_lease)
        self._alive_at = 0.0
        self._stats_at = self._expired_at = 0.0
        self._claim_warned_at = -60.0
        self._claim_failures = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="job-runner")

    async def stop(self) -> None:
        """Stop scoring and give this worker's leased chunks back (a half-scored chunk is
        scored again by whoever takes it: its results and rows are kept once by (job, index))."""
        if self._task is None:
            return
        self._stopping = True
        # Cancelled again until it ends: on Python 3.11 asyncio.wait_for (in the database calls)
        # can swallow a cancellation that arrives as its call finishes, and the loop would go on.
        while not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)
        try:
            released = await self.db(self.queue.release, self.worker)
        except Exception as exc:  # the database is down: the leases run out instead
            log.warning("job leases of %s not released (%s); they run out in %s", self.worker, exc, self.lease)
        else:
            if released:
                log.info("released %d job chunk(s) leased by %s", released, self.worker)

    async def _upkeep(self) -> None:
        """The queue's gauges, and finished jobs past their time to live removed."""
        now = time.monotonic()
        if now - self._stats_at >= 5:
            self._stats_at = now
            metrics.observe_jobs(await self.db(self.queue.stats))
        if now - self._expired_at >= 60:
            self._expired_at = now
            await self.db(self.queue.expire)
            for job_id in await self.db(self.queue.fail_unserved, self.models, self.unserved):
                log.warning("job %s failed: its model is not served here and no worker advanced it", job_id)
                metrics.JOB_CHUNK_FAILURES.labels("job_failed").inc()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._upkeep()
                # a chunk is leased while no interactive text waits; each sub-batch of it waits for a quiet moment
                idle = self.predictions.batcher.queued_texts() == 0
                # sole: this worker holds no chunk now, so the claim first queues again one it
                # took in a call that timed out here after it committed (not counted an attempt)
                chunk = (
                    await self.db(self.queue.claim, self.worker, self.lease, self.models, self.max_attempts, True)
                    if idle
                    else None
                )
            except Exception as exc:  # the database is down or slow: try again later
                self._claim_failed(exc)
                chunk = None
            if chunk is None:
                await asyncio.sleep(self.poll_s)
                continue
            try:
                await self.score(chunk)
            except asyncio.CancelledError:
                raise
            except (ApiError, SQLAlchemyError) as exc:  # the database unavailable: not the chunk's fault
                log.warning("job %s chunk %s given back (%s)", chunk.job_id, chunk.chunk, exc)
                with contextlib.suppress(Exception):  # else its lease runs out
                    await self.db(self.queue.give_back, chunk, self.worker)
            except Exception as exc:
                await self._failed(chunk, exc)

    def _claim_failed(self, exc: Exception) -> None:
        """A warning a minute at most while claims fail (each poll tries again)."""
        self._claim_failures += 1
        now = time.monotonic()
        if now - self._claim_warned_at >= 60:
            self._claim_warned_at = now
            log.warning(
                "no job chunk claimed (%d failed claim(s) since the last warning): %s", self._claim_failures, exc
            )
            self._claim_failures = 0

    async def _failed(self, chunk: Chunk, exc: Exception) -> None:
        """A chunk's attempt failed: queued again, or its job failed after JOB_MAX_ATTEMPTS. One
        traceback per chunk (its first attempt here), then a line per attempt."""
        reason = f"{type(exc).__name__}: {exc}"
        try:
            job_failed = await self.db(self.queue.fail, chunk, self.worker, reason, self.max_attempts)
        except Exception as db_exc:  # the lease runs out and the attempt is counted at the next claim
            log.warning("job %s chunk %s failed (%s); not recorded: %s", chunk.job_id, chunk.chunk, reason, db_exc)
            return
        metrics.JOB_CHUNK_FAILURES.labels("job_failed" if job_failed else "retried").inc()
        attempts = f"attempt {chunk.attempt} of {self.max_attempts}"
        if job_failed:
            log.error("job %s failed: chunk %s failed on its last %s: %s", chunk.job_id, chunk.chunk, attempts, reason)
        elif chunk.attempt == 1:
            log.error("job %s chunk %s failed (%s); queued again", chunk.job_id, chunk.chunk, attempts, exc_info=exc)
        else:
            log.warning("job %s chunk %s failed (%s): %s; queued again", chunk.job_id, chunk.chunk, attempts, reason)

    def _wait_s(self) -> float:
        """0 when a job's sub-batch may start now, else how long at least until it may."""
        if self.predictions.batcher.queued_texts():
            return 0.005
        return max(0.0, self.quiet_s - self.predictions.activity.quiet_for())

    def _sub_batch(self) -> int:
        return self.sub_batch if self.predictions.activity.quiet_for() >= LONG_QUIET_S else SMALL_SUB_BATCH

    async def score(self, chunk: Chunk) -> bool:
        """Score a chunk a sub-batch at a time, interactive texts first; False if the job was
        cancelled meanwhile (checked before each sub-batch). The next sub-batch is queued while
        one runs (IN_FLIGHT), so the model does not wait for the event loop to cache and record
        one sub-batch before it gets the next; both are in the batcher's background lane, which
        interactive texts never queue behind."""
        results: list[Result] = []
        running: deque[asyncio.Task[list[Result]]] = deque()
        # The lease is kept by a task of its own while the chunk waits (LEASE_RENEWALS): a chunk
        # slowed by interactive traffic or a starved background lane is not taken from its
        # worker (nor counted an attempt). `lost`: the keeper found the job ended or the chunk
        # another worker's.
        lost = asyncio.Event()
        self._alive_at = time.monotonic()
        keeper = asyncio.ensure_future(self._keep_lease(chunk, lost))
        try:
            start = 0
            while start < len(chunk.texts):
                # renewed before each sub-batch too: a cancelled job stops at its next sub-batch
                if lost.is_set() or not await self.db(self.queue.renew, chunk, self.worker, self.lease):
                    return False
                while (wait := self._wait_s()) > 0:  # interactive requests go first
                    if lost.is_set():
                        return False
                    self._alive_at = time.monotonic()
                    await asyncio.sleep(max(wait, 0.002))
                texts = chunk.texts[start : start + min(self.sub_batch, self._sub_batch())]
                running.append(asyncio.ensure_future(self._predict(chunk, texts, chunk.first + start)))
                start += len(texts)
                if len(running) >= IN_FLIGHT:
                    results += await running.popleft()
                    self._alive_at = time.monotonic()
            while running:
                results += await running.popleft()
                self._alive_at = time.monotonic()
        finally:
            keeper.cancel()
            for task in running:  # cancelled, or a sub-batch failed: the others are not awaited
                task.cancel()
        done = bool(await self.db(self.queue.complete, chunk, results))
        if done:
            metrics.JOB_TEXTS.inc(len(results))
        return done

    async def _keep_lease(self, chunk: Chunk, lost: asyncio.Event) -> None:
        """Renew the lease of the chunk `score` works on every LEASE_RENEWALS-th of it, until
        cancelled; `lost` set, and done, once the job has ended or the chunk is another worker's.
        Not while one sub-batch has been in the background lane for HUNG_LEASES leases."""
        lease_s = self.lease.total_seconds()
        hung = False
        while True:
            await asyncio.sleep(lease_s / LEASE_RENEWALS)
            stuck_s = time.monotonic() - self._alive_at
            if stuck_s > HUNG_LEASES * lease_s:
                if not hung:
                    hung = True
                    log.warning(
                        "job %s chunk %s: no sub-batch done for %.0f s, its lease is left to run out",
                        chunk.job_id,
                        chunk.chunk,
                        stuck_s,
                    )
                continue
            hung = False
            try:
                kept = await self.db(self.queue.renew, chunk, self.worker, self.lease)
            except Exception as exc:  # the database unavailable: tried again at the next turn
                log.warning("job %s chunk %s: lease not renewed (%s)", chunk.job_id, chunk.chunk, exc)
                continue
            if not kept:
                lost.set()
                return

    async def _predict(self, chunk: Chunk, texts: list[str], first: int) -> list[Result]:
        answers = await self.predictions.answer(texts, chunk.model, background=True)
        # one row per (job, index): a chunk scored twice is recorded once
        ids = [f"{chunk.job_id[:24]}-{first + i:011d}" for i in range(len(texts))]
        self.predictions.analytics.record(answers.records(texts, chunk.model, "/jobs", ids))
        probabilities = [v["probabilities"] for v in answers.values]
        return [
            Result(v["label"], v["score"], p["negative"], p["positive"])
            for v, p in zip(answers.values, probabilities, strict=True)
        ]
