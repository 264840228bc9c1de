"""In-process adaptive batching: texts from concurrent requests of one worker meet in one
queue, and the worker's inference thread runs them as one forward call, off the event loop.

BentoML batches only what reaches a `batchable` API over HTTP: from inside the service that is
its self-proxy, a full request into the service's own ASGI app (JSON both ways, every
middleware twice), and BentoML offers no in-process route to its dispatcher (its class is
private API). So the grouping lives here (docs/decisions.md, "One batcher per worker, not
BentoML's `batchable`").

How a batch forms: while the model runs one batch, new texts queue; when it is done, the
inference thread takes everything queued, up to `max_batch` texts. The batch therefore grows
with the queue, and a lone request on an idle worker runs at once. `max_wait_s` optionally holds
a batch that is not yet full for a few milliseconds after its first text arrived. The inference
thread forms the batches itself: a busy event loop never leaves the model waiting for its next
batch (when the loop formed them, the model sat idle while the loop answered other requests).

Background work (bulk jobs): `predict(..., background=True)` queues texts in a lane of their own,
run by one more thread per worker at the lowest CPU priority (nice 19). It takes whatever CPU the
interactive requests leave: the kernel runs an interactive batch, an event loop or anything else
of normal priority ahead of it, so an interactive text never waits behind a job's forward call
(with one shared queue it waited for the rest of a job's sub-batch, up to a full batch's
call). Its texts are never shed and never counted in the interactive queue or its delay.

Overload: a request whose expected queue delay (the running batch's rest plus the queued
texts, at each model's measured cost per text) is over `max_delay_s` is refused at once with
`Overloaded`, and a job that has nonetheless waited longer than that when its turn comes is
refused then (so no request waits much beyond the budget). A job whose caller has gone away
is dropped without running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

R = TypeVar("R")
log = logging.getLogger(__name__)
# Weight of the newest batch in a model's cost per text (an exponentially weighted mean).
COST_SMOOTHING = 0.2
# The background lane's thread: the lowest priority an unprivileged thread can take and give up
# again (SCHED_IDLE would be lower still, but a thread holding the GIL could then be starved by
# any busy process while the event loop waits for the GIL).
BACKGROUND_NICE = 19


class Overloaded(Exception):
    """The queue cannot start this request's texts within the delay budget."""

    def __init__(self, expected_delay_s: float) -> None:
        super().__init__(f"expected queue delay {expected_delay_s * 1000:.0f} ms is over the budget")
        self.expected_delay_s = expected_delay_s
        self.retry_after_s = max(1, math.ceil(expected_delay_s))


@dataclass(eq=False)
class _Job:
    model: str
    texts: Sequence[str]
    future: asyncio.Future[list[Any]]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """What one forward call did, for the caller's metrics."""

    model: str
    texts: int
    seconds: float
    cpu_seconds: float  # of the inference thread: tokenizer, forward pass, probabilities


def _settle(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """On the event loop: hand each waiting request its result or its error."""
    for future, result, error in outcomes:
        if future.done():  # cancelled meanwhile
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class Batcher(Generic[R]):
    """Groups (model, texts) jobs of concurrent requests into forward calls of `infer`.

    `infer(model, texts)` runs in the batcher's own threads (`threads` of them, each taking the
    next interactive batch when it is free, and the background lane's one) and returns one
    result per text. `on_batch(stats)` after each forward call and `on_start(waits)` as each
    interactive batch starts (with the queue wait of each job in it) are called in those
    threads too, for metrics.
    """

    def __init__(
        self,
        infer: Callable[[str, list[str]], list[R]],
        *,
        max_batch: int,
        max_wait_s: float = 0.0,
        max_delay_s: float = float("inf"),
        on_batch: Callable[[BatchStats], None] = lambda stats: None,
        on_start: Callable[[list[float]], None] = lambda waits: None,
        threads: int = 1,
    ) -> None:
        self.infer = infer
        self.threads = threads
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_delay_s = max_delay_s
        self.on_batch = on_batch
        self.on_start = on_start
        self._queue: deque[_Job] = deque()
        self._background: deque[_Job] = deque()
        self._queued: dict[str, int] = {}  # model -> texts waiting
        self._cost: dict[str, float] = {}  # model -> seconds per text (smoothed)
        self._running_until: dict[int, float] = {}  # inference thread -> expected end of its call
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # interactive work queued
        self._ready_background = threading.Condition(self._lock)  # background work queued
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.shed = 0
        self._waited = (0.0, 0)  # queue waits of the interactive jobs started since the last read: sum, count

    # --- callers, on the event loop -----------------------------------------------------

    def expected_delay(self) -> float:
        """Seconds before a text queued now would start running."""
        now = time.perf_counter()
        ahead = sum(n * self._cost.get(model, 0.0) for model, n in self._queued.items()) / self.threads
        busy = [end - now for end in list(self._running_until.values()) if end > now]
        soonest_free = min(busy) if len(busy) >= self.threads else 0.0
        return soonest_free + ahead

    def mean_wait(self) -> float:
        """The mean queue wait of the interactive jobs started since the last call; with none
        started, the wait a text queued now would have (expected_delay)."""
        with self._lock:
            (total, n), self._waited = self._waited, (0.0, 0)
        return total / n if n else self.expected_delay()

    def queued_texts(self) -> int:
        """Texts waiting for an inference thread (not those in a forward call now)."""
        return sum(self._queued.values())

    async def predict(self, model: str, texts: Sequence[str], background: bool = False) -> list[R]:
        """One result per text, in order, from a forward call shared with concurrent callers;
        `background`: in the background lane, on idle CPU, never shed."""
        if not background and (delay := self.expected_delay()) > self.max_delay_s:
            self.shed += 1
            raise Overloaded(delay)
        loop = asyncio.get_running_loop()
        job = _Job(model, texts, loop.create_future(), loop)
        with self._lock:
            if self._closed:
                raise Overloaded(0.0)
            if not self._threads:
                self._start_threads()
            if background:
                self._background.append(job)
                self._ready_background.notify()
            else:
                self._queue.append(job)
                self._queued[model] = self._queued.get(model, 0) + len(texts)
                self._ready.notify()
        return await job.future

    def _start_threads(self) -> None:
        lanes = [(f"inference-{n}", False) for n in range(self.threads)] + [("inference-background", True)]
        for name, background in lanes:
            thread = threading.Thread(target=self._serve, args=(background,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    # --- the inference thread -----------------------------------------------------------

    def _queued_total(self) -> int:
        return sum(self._queued.values())

    def _take(self, background: bool) -> tuple[list[_Job], list[_Job]]:
        """Under the lock: the next batch, queued interactive jobs in arrival order up to
        `max_batch` texts (at least one job) or the next background job, and the interactive jobs
        refused for having waited past the delay budget. Jobs nobody waits for any more are
        dropped."""
        now = time.perf_counter()
        queue = self._background if background else self._queue
        jobs: list[_Job] = []
        refused: list[_Job] = []
        size = 0
        while queue:
            job = queue[0]
            if jobs and (background or size + len(job.texts) > self.max_batch):
                break  # a background job is one forward call: its caller sized it (service/jobs.py)
            queue.popleft()
            if not background:
                self._queued[job.model] -= len(job.texts)
            if job.future.done():  # the request was cancelled: its client went away
                continue
            if not background and now - job.enqueued > self.max_delay_s:
                refused.append(job)
                continue
            jobs.append(job)
            size += len(job.texts)
        return jobs, refused

    def _next_batch(self, background: bool) -> tuple[list[_Job], list[_Job], dict[str, list[str]]] | None:
        """Wait for work of the lane (and, with `max_wait_s`, for a partial interactive batch to
        fill), then take the batch: its jobs, the jobs refused, and its texts grouped by model.
        None when closed."""
        queue, ready = (self._background, self._ready_background) if background else (self._queue, self._ready)
        with self._lock:
            while not queue and not self._closed:
                ready.wait()
            if self._closed:
                return None
            if self.max_wait_s > 0 and not background:
                deadline = self._queue[0].enqueued + self.max_wait_s
                while self._queued_total() < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                    self._ready.wait(left)
            jobs, refused = self._take(background)
            groups: dict[str, list[str]] = {}  # model -> its texts in this batch, in job order
            for job in jobs:
                groups.setdefault(job.model, []).extend(job.texts)
            if not background:  # only the interactive lane delays interactive texts
                expected = sum(len(texts) * self._cost.get(m, 0.0) for m, texts in groups.items())
                self._running_until[threading.get_ident()] = time.perf_counter() + expected
            return jobs, refused, groups

    def _post(self, outcomes: list[tuple[_Job, Any, BaseException | None]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for job, result, error in outcomes:
            by_loop.setdefault(job.loop, []).append((job.future, result, error))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, items)

    def _serve(self, background: bool) -> None:
        if background:
            try:  # on Linux the nice value is the calling thread's own (setpriority(2))
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
            except (AttributeError, OSError) as exc:
                log.warning("background inference thread at normal priority: %s", exc)
        while (batch := self._next_batch(background)) is not None:
            jobs, refused, groups = batch
            now = time.perf_counter()
            outcomes: list[tuple[_Job, Any, BaseException | None]] = []
            if refused:
                self.shed += len(refused)
                outcomes += [(job, None, Overloaded(now - job.enqueued)) for job in refused]
            if not jobs:
                self._post(outcomes)
                continue
            try:
                if not background:
                    waits = [now - job.enqueued for job in jobs]
                    with self._lock:
                        self._waited = (self._waited[0] + sum(waits), self._waited[1] + len(waits))
                    self.on_start(waits)
                results: dict[str, list[R]] = {}
                for model, texts in groups.items():
                    started, cpu = time.perf_counter(), time.thread_time()
                    results[model] = self.infer(model, texts)
                    seconds, cpu = time.perf_counter() - started, time.thread_time() - cpu
                    # The cheaper of wall and CPU time: wall time stretched by other threads
                    # competing for the cores (the event loop answering sheds, say) would raise
                    # the estimate, shed more, and feed on itself (seen at 64 closed-loop
                    # clients). An estimate too low is caught when the job is dequeued.
                    per_text = min(seconds, cpu) / max(1, len(texts))
                    if not background:
                        old = self._cost.get(model)
                        self._cost[model] = per_text if old is None else old + COST_SMOOTHING * (per_text - old)
                    self.on_batch(BatchStats(model, len(texts), seconds, cpu))
                offsets = dict.fromkeys(groups, 0)
                for job in jobs:
                    start = offsets[job.model]
                    offsets[job.model] = start + len(job.texts)
                    outcomes.append((job, results[job.model][start : start + len(job.texts)], None))
            except Exception as exc:  # a model failure fails this batch's requests, not the thread
                log.exception("forward call failed for %s texts", sum(len(j.texts) for j in jobs))
                done = {id(job) for job, _, _ in outcomes}
                outcomes += [(job, None, exc) for job in jobs if id(job) not in done]
            finally:
                self._running_until.pop(threading.get_ident(), None)
            self._post(outcomes)

    def close(self) -> None:
        """Stop the inference threads after their current batch; queued requests get Overloaded."""
        with self._lock:
            self._closed = True
            self._ready.notify_all()
            self._ready_background.notify_all()
            pending = [*self._queue, *self._background]
            self._queue.clear()
            self._background.clear()
            self._queued.clear()
        self._post([(job, None, Overloaded(0.0)) for job in pending])
        for thread in self._threads:
            thread.join(timeout=30)
