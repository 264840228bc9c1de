"""A submitted job's body, parsed as its bytes arrive (JSON or NDJSON) into texts spooled to a
temporary file, and the bearer token that owns the job."""

from __future__ import annotations

import asyncio
import hashlib
import io
import secrets
import struct
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any

import ijson
from starlette.requests import ClientDisconnect, Request

from service.errors import ApiError
from service.schemas import check_text

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
