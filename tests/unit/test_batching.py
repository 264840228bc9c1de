"""The in-process batcher: grouping, order, limits, shedding, cancellation and failures.

The model is a function that records each call and, where a test needs a queue to build up,
blocks on a threading.Event until the test lets it go, so batches form deterministically.
"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from service.batching import Batcher, BatchStats, Overloaded


class Model:
    """Upper-cases texts; records (model, texts) per call; can hold a call until released."""

    def __init__(self, hold: bool = False) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, model: str, texts: list[str]) -> list[str]:
        self.calls.append((model, list(texts)))
        self.entered.set()
        self.release.wait(10)
        return [f"{model}:{t.upper()}" for t in texts]


async def _until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


async def _in_forward_call(batcher: Batcher, model: Model, tag: str, text: str) -> asyncio.Future:
    """A request whose forward call has started (and holds the model until it is released)."""
    running = asyncio.ensure_future(batcher.predict(tag, [text]))
    await _until(model.entered.is_set)
    return running


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_requests_queued_behind_a_forward_call_share_the_next_one() -> None:
    model = Model(hold=True)
    stats: list[BatchStats] = []
    batcher = Batcher(model, max_batch=32, on_batch=stats.append)
    first = await _in_forward_call(batcher, model, "m", "a")  # the first call runs alone on an idle batcher
    rest = [asyncio.ensure_future(batcher.predict("m", [f"t{i}", f"u{i}"])) for i in range(5)]
    await asyncio.sleep(0.01)
    model.release.set()
    assert await first == ["m:A"]
    assert await asyncio.gather(*rest) == [[f"m:T{i}", f"m:U{i}"] for i in range(5)]
    assert [len(texts) for _, texts in model.calls] == [1, 10]
    assert [s.texts for s in stats] == [1, 10]
    batcher.close()


@pytest.mark.anyio
async def test_mean_wait_is_the_queue_wait_of_the_jobs_started_since_the_last_read() -> None:
    model = Model(hold=True)
    waits: list[float] = []
    batcher = Batcher(model, max_batch=32, on_start=waits.extend)
    first = await _in_forward_call(batcher, model, "m", "a")
    rest = [asyncio.ensure_future(batcher.predict("m", [f"t{i}"])) for i in range(3)]
    await asyncio.sleep(0.05)  # they wait behind the held call
    model.release.set()
    await asyncio.gather(first, *rest)
    assert len(waits) == 4 and batcher.mean_wait() == pytest.approx(sum(waits) / 4)
    assert max(waits) >= 0.05  # the queued ones waited for the held call
    assert batcher.mean_wait() == batcher.expected_delay() == 0.0  # none since: an idle queue's delay
    batcher.close()


@pytest.mark.anyio
async def test_a_batch_never_exceeds_max_batch_and_models_run_apart() -> None:
    model = Model(hold=True)
    batcher = Batcher(model, max_batch=4)
    blocker = await _in_forward_call(batcher, model, "a", "x")
    jobs = [asyncio.ensure_future(batcher.predict("a" if i % 3 else "b", [f"t{i}"])) for i in range(9)]
    await asyncio.sleep(0.01)
    model.release.set()
    results = await asyncio.gather(blocker, *jobs)
    assert results[1:] == [[f"{'a' if i % 3 else 'b'}:T{i}"] for i in range(9)]
    sizes = [len(texts) for _, texts in model.calls[1:]]
    assert sum(sizes) == 9 and max(sizes) <= 4
    assert all(len({t for t in texts}) == len(texts) for _, texts in model.calls)
    # one forward call per model per batch: each call holds texts of one model only
    for name, texts in model.calls[1:]:
        assert all((int(t[1:]) % 3 != 0) == (name == "a") for t in texts)
    batcher.close()


@pytest.mark.anyio
async def test_a_request_over_the_delay_budget_is_refused_at_once() -> None:
    model = Model(hold=True)
    batcher = Batcher(model, max_batch=2, max_delay_s=0.05)
    batcher._cost["m"] = 0.02  # as measured: 20 ms per text
    running = await _in_forward_call(batcher, model, "m", "a")
    queued = [asyncio.ensure_future(batcher.predict("m", [f"q{i}"])) for i in range(2)]
    await asyncio.sleep(0)
    # two texts queued at 20 ms each, plus the running call's rest: over 50 ms
    with pytest.raises(Overloaded) as refused:
        await batcher.predict("m", ["late"])
    assert refused.value.retry_after_s >= 1
    assert batcher.shed == 1
    model.release.set()
    assert await running == ["m:A"]
    assert await asyncio.gather(*queued) == [["m:Q0"], ["m:Q1"]]
    assert all("late" not in texts for _, texts in model.calls)
    batcher.close()


@pytest.mark.anyio
async def test_a_job_that_waited_past_the_budget_is_refused_when_its_turn_comes() -> None:
    model = Model(hold=True)
    batcher = Batcher(model, max_batch=8, max_delay_s=0.05)
    running = await _in_forward_call(batcher, model, "m", "a")
    stale = asyncio.ensure_future(batcher.predict("m", ["stale"]))  # no cost known yet: admitted
    await asyncio.sleep(0.1)  # the running call outlasts the budget
    model.release.set()
    assert await running == ["m:A"]
    with pytest.raises(Overloaded):
        await stale
    assert [texts for _, texts in model.calls] == [["a"]]
    batcher.close()


@pytest.mark.anyio
async def test_a_cancelled_request_is_not_inferred() -> None:
    model = Model(hold=True)
    batcher = Batcher(model, max_batch=8)
    running = await _in_forward_call(batcher, model, "m", "a")
    gone = asyncio.ensure_future(batcher.predict("m", ["gone"]))
    kept = asyncio.ensure_future(batcher.predict("m", ["kept"]))
    await asyncio.sleep(0)
    gone.cancel()
    model.release.set()
    await running
    assert await kept == ["m:KEPT"]
    assert [texts for _, texts in model.calls] == [["a"], ["kept"]]
    batcher.close()


@pytest.mark.anyio
async def test_a_failing_forward_call_fails_its_requests_only() -> None:
    calls = []

    def flaky(model: str, texts: list[str]) -> list[str]:
        calls.append(texts)
        if "boom" in texts:
            raise RuntimeError("model failed")
        return [t.upper() for t in texts]

    batcher = Batcher(flaky, max_batch=8)
    with pytest.raises(RuntimeError, match="model failed"):
        await batcher.predict("m", ["boom"])
    assert await batcher.predict("m", ["fine"]) == ["FINE"]
    batcher.close()


@pytest.mark.anyio
async def test_max_wait_holds_a_partial_batch_for_late_arrivals() -> None:
    model = Model()
    waits: list[list[float]] = []
    batcher = Batcher(model, max_batch=8, max_wait_s=0.2, on_start=waits.append)
    first = asyncio.ensure_future(batcher.predict("m", ["a"]))
    await asyncio.sleep(0.02)
    second = asyncio.ensure_future(batcher.predict("m", ["b"]))
    assert await asyncio.gather(first, second) == [["m:A"], ["m:B"]]
    assert [texts for _, texts in model.calls] == [["a", "b"]]
    assert len(waits) == 1 and len(waits[0]) == 2
    batcher.close()


@pytest.mark.anyio
async def test_a_full_batch_goes_without_waiting_out_max_wait() -> None:
    model = Model()
    batcher = Batcher(model, max_batch=8, max_wait_s=60)
    full = [asyncio.ensure_future(batcher.predict("m", [f"t{i}"])) for i in range(8)]
    async with asyncio.timeout(10):  # a batch held for max_wait would take a minute
        await asyncio.gather(*full)
    assert [len(texts) for _, texts in model.calls] == [8]
    batcher.close()


class HeldJobs(Model):
    """Holds only the calls whose first text starts with "job" (the background lane's)."""

    def __call__(self, model: str, texts: list[str]) -> list[str]:
        self.calls.append((model, list(texts)))
        if texts[0].startswith("job"):
            self.entered.set()
            self.release.wait(10)
        return [f"{model}:{t.upper()}" for t in texts]


@pytest.mark.anyio
async def test_background_texts_run_beside_interactive_ones_at_the_lowest_priority() -> None:
    model = HeldJobs(hold=True)
    waits: list[list[float]] = []
    batcher = Batcher(model, max_batch=4, max_delay_s=0.05, on_start=waits.append)
    running = asyncio.ensure_future(batcher.predict("m", ["job 1", "job 2"], background=True))
    await _until(model.entered.is_set)
    queued = [asyncio.ensure_future(batcher.predict("m", [f"job {i}"], background=True)) for i in range(3, 9)]
    await asyncio.sleep(0.01)
    # queued background texts are neither interactive queue nor delay: nothing is shed for them
    assert batcher.queued_texts() == 0 and batcher.expected_delay() == 0.0
    async with asyncio.timeout(5):  # answered while the background forward call is still held
        assert await batcher.predict("m", ["now"]) == ["m:NOW"]
    assert not running.done() and len(waits) == 1  # the queue-wait metric counts interactive batches only
    [lane] = [t for t in batcher._threads if t.name == "inference-background"]
    assert lane.native_id is not None and os.getpriority(os.PRIO_PROCESS, lane.native_id) == 19
    model.release.set()
    assert await running == ["m:JOB 1", "m:JOB 2"]
    assert [r for q in await asyncio.gather(*queued) for r in q] == [f"m:JOB {i}" for i in range(3, 9)]
    # each background job is a forward call of its own (its caller sizes it), in arrival order
    assert [texts for _, texts in model.calls if texts[0].startswith("job")][1:] == [[f"job {i}"] for i in range(3, 9)]
    assert batcher.shed == 0
    batcher.close()


def test_a_worker_warms_its_models_at_the_batch_sizes_it_meets() -> None:
    from models import runtime

    class Counting:
        runtime = "test"

        def __init__(self) -> None:
            self.sizes: list[int] = []

        def predict(self, texts: list[str]) -> list:
            self.sizes.append(len(texts))
            return []

    predictor = Counting()
    runtime.warm_up(predictor, 32)  # type: ignore[arg-type]  # a Predictor by its one method
    assert predictor.sizes == [1, 8, 32]
    small = Counting()
    runtime.warm_up(small, 4)  # type: ignore[arg-type]
    assert small.sizes == [1, 4]
