"""The Python API of the sentiment service: one prediction, a batch, and bulk scoring jobs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from sentiment_client._version import __version__

BATCH_SIZE = 64  # the contract's MAX_BATCH_SIZE default: most texts in one POST /batch
NDJSON_FROM = 1000  # from this many texts, submit streams NDJSON instead of building one JSON document
NDJSON_CHUNK_BYTES = 64 * 1024
FINISHED = frozenset({"done", "failed", "cancelled"})
# The service stores a job's texts in one database call it gives up to 120 s.
SUBMIT_READ_TIMEOUT = 150.0


class SentimentError(Exception):
    """The service answered with an error, or did not answer.

    `status` is the HTTP status, None when no answer came (unreachable, timed out, cut off);
    `retry_after` the seconds the service asked to wait (429, 503); `body` the error's JSON
    (`error`, `request_id`, and e.g. `progress` on a 409 from a job's results).
    """

    def __init__(
        self,
        status: int | None,
        message: str,
        retry_after: float | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.body: dict[str, Any] = dict(body or {})

    @property
    def request_id(self) -> str | None:
        return self.body.get("request_id")

    def __str__(self) -> str:
        text = self.message if self.status is None else f"HTTP {self.status}: {self.message}"
        if self.retry_after is not None:
            text += f" (retry after {self.retry_after:g} s)"
        return text


@dataclass(frozen=True)
class Prediction:
    """One answer of /predict or /batch; `score` is the probability of `label`."""

    label: str
    score: float
    probabilities: dict[str, float]
    model: str
    cached: bool
    latency_ms: float
    request_id: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Prediction:
        return cls(
            label=data["label"],
            score=float(data["score"]),
            probabilities={k: float(v) for k, v in data["probabilities"].items()},
            model=data["model"],
            cached=bool(data["cached"]),
            latency_ms=float(data["latency_ms"]),
            request_id=data["request_id"],
        )


@dataclass(frozen=True)
class Job:
    """A job the service accepted (202). `token` is the job's bearer token, given once: status,
    results and cancel need it (this client remembers the tokens of the jobs it submitted; keep
    it, as a password, to follow the job from elsewhere)."""

    job_id: str
    status: str
    total: int
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class JobStatus:
    """A job's progress: `status` is queued, running, done, failed or cancelled; `eta_seconds`
    the service's estimate of the time left (None while it has none)."""

    job_id: str
    status: str
    total: int
    done: int
    created_at: datetime
    finished_at: datetime | None
    eta_seconds: float | None
    model: str
    error: str | None = None  # why a failed job failed

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobStatus:
        finished_at = data.get("finished_at")
        eta = data.get("eta_seconds")
        return cls(
            job_id=data["job_id"],
            status=data["status"],
            total=int(data["total"]),
            done=int(data["done"]),
            created_at=_timestamp(data["created_at"]),
            finished_at=None if finished_at is None else _timestamp(finished_at),
            eta_seconds=None if eta is None else float(eta),
            model=data["model"],
            error=data.get("error"),
        )


@dataclass(frozen=True)
class Result:
    """The score of a job's text number `index` (0-based, in the order submitted)."""

    index: int
    label: str
    score: float
    probabilities: dict[str, float]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Result:
        return cls(
            index=int(data["index"]),
            label=data["label"],
            score=float(data["score"]),
            probabilities={k: float(v) for k, v in data["probabilities"].items()},
        )


def _timestamp(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds, from either of its forms (seconds or an HTTP date)."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error(response: httpx.Response) -> SentimentError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message = body["error"]
    else:
        body = {}
        message = response.text.strip()[:200] or response.reason_phrase
    return SentimentError(response.status_code, message, _retry_after(response), body)


def _refused_at_door(response: httpx.Response) -> bool:
    """Whether a refused POST /jobs stored nothing, so sending it again cannot make a second job.

    A 429 (the service's rate limit, or nginx's) is decided before the body is read. Of the
    503s, only the overload guard's is: the analytics database's 503 ("not answering") can
    come after the job was stored, when the call outlived its time budget.
    """
    if response.status_code == 429:
        return True
    if response.status_code != 503:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and str(body.get("error", "")).startswith("service overloaded")


def _ndjson_chunks(texts: Sequence[str]) -> Iterator[bytes]:
    """The texts as NDJSON lines, a chunk of about NDJSON_CHUNK_BYTES at a time."""
    buffer: list[bytes] = []
    size = 0
    for text in texts:
        line = json.dumps({"text": text}, ensure_ascii=False).encode() + b"\n"
        buffer.append(line)
        size += len(line)
        if size >= NDJSON_CHUNK_BYTES:
            yield b"".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield b"".join(buffer)


class SentimentClient:
    """A client of one service, e.g. `SentimentClient("http://127.0.0.1:3000")`, used as a
    context manager (it holds an `httpx.Client` and its connections).

    A 429 or 503 with Retry-After is waited out and sent again, at most `retries` times and for
    at most `max_retry_after` seconds a wait, by every call whose repetition is harmless (all but
    `submit`); `submit` is sent again only when the service refused it before storing anything.
    A connection that could not be opened is tried again the same number of times.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        retries: int = 4,
        max_retry_after: float = 60.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.max_retry_after = max_retry_after
        self._tokens: dict[str, str] = {}  # job id -> token, for the jobs submitted here
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            headers={"User-Agent": f"sentiment-client/{__version__}", **(headers or {})},
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- interactive ------------------------------------------------------------------------

    def predict(self, text: str) -> Prediction:
        """The prediction of model A for one text."""
        return Prediction.from_json(self._call("POST", "/predict", json_body={"text": text}).json())

    def batch(self, texts: Sequence[str], batch_size: int = BATCH_SIZE) -> list[Prediction]:
        """Predictions for `texts`, in order, in calls of `batch_size` texts."""
        out: list[Prediction] = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            body = self._call("POST", "/batch", json_body={"texts": chunk}).json()
            out.extend(Prediction.from_json(p) for p in body["predictions"])
        return out

    # --- bulk jobs --------------------------------------------------------------------------

    def submit(self, texts: Sequence[str]) -> Job:
        """A bulk job for `texts`: one JSON document, or streamed NDJSON from NDJSON_FROM texts."""
        if not texts:
            raise ValueError("a job needs at least one text")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, SUBMIT_READ_TIMEOUT))
        if len(texts) < NDJSON_FROM:
            response = self._call("POST", "/jobs", idempotent=False, json_body={"texts": list(texts)}, timeout=timeout)
        else:
            response = self._call(
                "POST",
                "/jobs",
                idempotent=False,
                content=lambda: _ndjson_chunks(texts),
                headers={"Content-Type": "application/x-ndjson"},
                timeout=timeout,
            )
        body = response.json()
        self._tokens[body["job_id"]] = body["token"]
        return Job(job_id=body["job_id"], status=body["status"], total=int(body["total"]), token=body["token"])

    def status(self, job_id: str, token: str | None = None) -> JobStatus:
        """A job's progress; SentimentError 404 for a job the service does not know, or whose
        token is not `token` (by default the one this client got when it submitted the job)."""
        return JobStatus.from_json(self._call("GET", self._job_path(job_id), headers=self._auth(job_id, token)).json())

    def wait(
        self,
        job_id: str,
        progress: Callable[[JobStatus], object] | None = None,
        poll: float = 1.0,
        timeout: float | None = None,
        token: str | None = None,
    ) -> JobStatus:
        """Poll a job every `poll` seconds until it is done, failed or cancelled, and return that
        status; `progress(status)` is called with each status fetched. TimeoutError after
        `timeout` seconds (the job keeps running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(job_id, token)
            if progress is not None:
                progress(status)
            if status.finished:
                return status
            if deadline is not None and time.monotonic() + poll > deadline:
                raise TimeoutError(f"job {job_id} is still {status.status} after {timeout:g} s")
            time.sleep(poll)

    def results(self, job_id: str, token: str | None = None) -> Iterator[Result]:
        """A done job's results in input order, read from the stream as they are iterated.
        SentimentError 409 (with `body["progress"]`) while the job is not done; the request is
        made by this call, not at the first iteration."""
        headers = self._auth(job_id, token)
        response = self._call("GET", self._job_path(job_id) + "/results", stream=True, headers=headers)
        return self._lines(job_id, response)

    def cancel(self, job_id: str, token: str | None = None) -> str:
        """Cancel a queued or running job and return its status ("cancelled"); SentimentError 409
        when it has already finished, 404 when unknown."""
        return str(self._call("DELETE", self._job_path(job_id), headers=self._auth(job_id, token)).json()["status"])

    @staticmethod
    def _job_path(job_id: str) -> str:
        return f"/jobs/{quote(job_id, safe='')}"

    def _auth(self, job_id: str, token: str | None) -> dict[str, str]:
        token = token or self._tokens.get(job_id)
        return {"Authorization": f"Bearer {token}"} if token else {}

    # --- transport --------------------------------------------------------------------------

    def _lines(self, job_id: str, response: httpx.Response) -> Iterator[Result]:
        try:
            for line in response.iter_lines():
                if line.strip():
                    yield Result.from_json(json.loads(line))
        except httpx.HTTPError as exc:
            raise SentimentError(None, f"the results of job {job_id} broke off: {exc}") from exc
        finally:
            response.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool = True,
        stream: bool = False,
        json_body: object = None,
        content: Callable[[], Iterable[bytes]] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """One request, sent again as the class docstring says; SentimentError for anything but
        a 2xx. `content` makes a fresh body for each attempt."""
        attempt = 0
        while True:
            request = self._http.build_request(
                method,
                path,
                json=json_body,
                content=None if content is None else content(),
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
            try:
                response = self._http.send(request, stream=stream)
            except httpx.ConnectError as exc:  # nothing was sent: safe to try again
                if attempt < self.retries:
                    attempt += 1
                    time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
                    continue
                raise SentimentError(None, f"cannot reach {self.url} ({attempt + 1} attempts): {exc}") from exc
            except httpx.TimeoutException as exc:
                raise SentimentError(None, f"{method} {path}: no answer from {self.url} in time ({exc})") from exc
            except httpx.HTTPError as exc:
                raise SentimentError(None, f"{method} {path} to {self.url} failed: {exc}") from exc
            if response.is_success:
                return response
            if stream:
                response.read()
                response.close()
            error = _error(response)
            if (
                error.status in (429, 503)
                and (idempotent or _refused_at_door(response))
                and error.retry_after is not None
                and error.retry_after <= self.max_retry_after
                and attempt < self.retries
            ):
                attempt += 1
                time.sleep(error.retry_after)
                continue
            raise error
