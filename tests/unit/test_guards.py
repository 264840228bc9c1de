"""The ASGI guards in front of the endpoints (overload, intake, clients, workarounds), on a small
app of their own."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from service import overload
from service.clients import client_address, trusted_networks
from service.intake import BodySizeLimit
from service.overload import AdaptiveLimit, InFlightLimit, Occupancy


async def _slow(request: Request) -> JSONResponse:
    await request.body()
    await asyncio.sleep(0.3)
    return JSONResponse({"ok": True})


def _app() -> Router:
    return Router(routes=[Route("/predict", _slow, methods=["POST"]), Route("/other", _slow, methods=["POST"])])


@pytest.mark.anyio
async def test_in_flight_limit_answers_503_with_retry_after() -> None:
    guard = InFlightLimit(_app(), limit=2, paths=["/predict"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as client:
        replies = await asyncio.gather(*(client.post("/predict", json={}) for _ in range(3)))
        unguarded = await asyncio.gather(*(client.post("/other", json={}) for _ in range(3)))
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200, 200, 503]
    rejected = next(r for r in replies if r.status_code == 503)
    assert rejected.headers["Retry-After"] == "1"
    assert "overloaded" in rejected.json()["error"]
    assert [r.status_code for r in unguarded] == [200, 200, 200]
    assert guard.in_flight == 0 and guard.rejected == 1


def test_adaptive_limit_backs_off_on_slow_answers_and_creeps_back_on_fast_ones() -> None:
    limit = AdaptiveLimit(0.2, initial=64, minimum=8, maximum=128, recovery_s=5.0)
    limit.sample(0.5, in_flight=40, now=0.0)
    assert limit.limit == pytest.approx(64 * 0.9)
    limit.sample(0.01, in_flight=1, overloaded=True, now=0.1)  # shed inside the worker: overloaded too
    assert limit.limit == pytest.approx(64 * 0.81)
    for i in range(100):
        limit.sample(0.5, in_flight=40, now=1.0 + i / 100)
    assert limit.limit == 8  # never below the minimum
    for _ in range(100):
        limit.sample(0.01, in_flight=2, now=3.0)  # fast, but not in use, and the overload is recent
    assert limit.limit == 8
    for _ in range(8 + 9 + 10):  # fast while in use: about one more per limit's worth
        limit.sample(0.01, in_flight=8, now=3.0)
    assert 10.5 < limit.limit < 11.5
    limit.sample(0.01, in_flight=2, now=7.5)  # no slow request for 5 s: the overload is over
    assert limit.limit == 64
    for _ in range(100):
        limit.sample(0.01, in_flight=2, now=8.0)
    assert limit.limit == 64  # and not past where it started without evidence that it is used
    for _ in range(10_000):
        limit.sample(0.01, in_flight=128, now=8.0)
    assert limit.limit == 128  # never above the maximum


@pytest.mark.anyio
async def test_in_flight_limit_adapts_to_slow_predictions_and_refuses_the_rest_at_once() -> None:
    adaptive = AdaptiveLimit(0.1, initial=16, minimum=2, maximum=16)
    guard = InFlightLimit(_app(), limit=512, paths=["/predict", "/other"], adaptive=adaptive, sampled=["/predict"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as client:
        await asyncio.gather(*(client.post("/other", json={}) for _ in range(4)))
        assert adaptive.limit == 16  # slow, but not a prediction: says nothing about the model's queue
        first = await asyncio.gather(*(client.post("/predict", json={}) for _ in range(4)))
        assert [r.status_code for r in first] == [200] * 4  # each took 0.3 s against a 0.1 s target
        assert adaptive.limit == pytest.approx(16 * 0.9**4)
        second = await asyncio.gather(*(client.post("/predict", json={}) for _ in range(14)))
    statuses = [r.status_code for r in second]
    assert statuses.count(200) == 11 and statuses.count(503) == 3  # under a limit of 10.5: 11 at once
    assert all(r.headers["Retry-After"] == "1" for r in second if r.status_code == 503)
    assert guard.in_flight == 0 and guard.rejected == 3


def test_occupancy_is_the_time_weighted_mean_in_flight_between_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(overload.time, "monotonic", lambda: clock[0])
    occupancy = Occupancy()
    occupancy.change(1)  # one request for the whole 4 s
    clock[0] += 1
    occupancy.change(2)  # two more from 1 s to 3 s
    clock[0] += 2
    occupancy.change(-2)
    clock[0] += 1
    assert occupancy.mean() == pytest.approx((1 * 1 + 3 * 2 + 1 * 1) / 4)
    clock[0] += 2
    assert occupancy.mean() == pytest.approx(1.0)  # only the time since the last read: one in flight
    occupancy.change(-1)
    assert occupancy.mean() == 0.0  # no time passed: the count itself


@pytest.mark.anyio
async def test_in_flight_limit_follows_its_requests_in_the_occupancy() -> None:
    occupancy = Occupancy()
    guard = InFlightLimit(_app(), limit=512, paths=["/predict"], occupancy=occupancy)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as client:
        occupancy.mean()
        held = [asyncio.ensure_future(client.post("/predict", json={})) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert occupancy.count == 3
        await asyncio.gather(*held)
        await client.get("/elsewhere")  # not a guarded path: not counted
    assert occupancy.count == 0
    assert 0 < occupancy.mean() <= 3


@pytest.mark.anyio
async def test_a_connection_back_before_retry_after_is_refused_after_a_pause() -> None:
    """Clients that retry at once, ignoring Retry-After, must not turn the refusals into the
    overload: a connection refused again within Retry-After gets its 503 after `pace_s`."""
    guard = InFlightLimit(_app(), limit=1, paths=["/predict"], pace_s=0.2)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as client:
        held = asyncio.ensure_future(client.post("/predict", json={}))  # takes the one slot for 0.3 s
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        first = await client.post("/predict", json={})
        started = loop.time()
        again = await client.post("/predict", json={})  # the same connection, at once
        again_s = loop.time() - started
        assert (await held).status_code == 200
    assert first.status_code == again.status_code == 503
    assert again.headers["Retry-After"] == "1"
    assert guard.paced == 1 and guard.rejected == 2  # the first refusal was not paced
    assert again_s >= 0.2


@pytest.mark.anyio
async def test_body_limit_checks_streamed_bodies_too() -> None:
    guard = BodySizeLimit(_app(), max_bytes=100)

    async def chunks():
        for _ in range(5):
            yield b"x" * 40

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as client:
        small = await client.post("/predict", content=b"x" * 100)
        declared = await client.post("/predict", content=b"x" * 101)
        streamed = await client.post("/predict", content=chunks())
    assert small.status_code == 200
    assert declared.status_code == 413 and "100 bytes" in declared.json()["error"]
    assert streamed.status_code == 413


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_request_context_tags_answers_counts_and_records_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from service import metrics
    from service.intake import RequestContext

    monkeypatch.setattr(metrics, "ENDPOINTS", ("/predict",))  # service.py registers the app's routes

    async def fail(request: Request) -> JSONResponse:
        return JSONResponse({"error": "nope"}, status_code=404 if request.url.path == "/other" else 200)

    errors: list[tuple[str, int]] = []
    app = RequestContext(
        Router(routes=[Route("/predict", fail, methods=["POST"]), Route("/other", fail, methods=["POST"])]),
        public=["/predict"],
        on_error=lambda path, status: errors.append((path, status)),
    )
    counted = metrics.HTTP_REQUESTS.labels("/predict", "200")
    before = counted._value.get()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        ok = await client.post("/predict")
        missing = await client.post("/other")
    assert ok.status_code == 200 and missing.status_code == 404
    assert ok.headers["x-request-id"] != missing.headers["x-request-id"]
    assert counted._value.get() == before + 1
    assert errors == [("/other", 404)]


@pytest.mark.anyio
async def test_unknown_paths_and_methods_get_json_errors_and_other_answers_pass_untouched() -> None:
    from service.workarounds import JsonErrors

    async def found(request: Request) -> JSONResponse:
        return JSONResponse({"error": "no such request id"}, status_code=404)

    app = JsonErrors(Router(routes=[Route("/feedback", found, methods=["POST"])]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        unknown = await client.post("/internal/infer")
        own = await client.post("/feedback")
        wrong_method = await client.get("/feedback")
    assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/json"
    assert unknown.json() == {"error": "not found: POST /internal/infer", "request_id": unknown.headers["x-request-id"]}
    assert own.status_code == 404 and own.json() == {"error": "no such request id"}
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"] == "method not allowed: GET /feedback"


@pytest.mark.anyio
async def test_a_lagging_event_loop_sheds_new_requests_at_the_door() -> None:
    import asyncio
    import time

    from service.overload import InFlightLimit, LoopLag

    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    lag = LoopLag(interval=0.01)
    lag.start()
    app = InFlightLimit(
        Router(routes=[Route("/predict", ok, methods=["POST"])]), 512, ["/predict"], lag=lag, max_lag_s=0.05
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.post("/predict")).status_code == 200
            await asyncio.sleep(0.03)  # the lag task ticks on time
            assert lag.seconds < 0.05
            time.sleep(0.2)  # one stall: not an overloaded loop
            await asyncio.sleep(0.001)
            assert lag.seconds < 0.05
            for _ in range(3):  # late on every tick: overloaded
                time.sleep(0.2)
                for _ in range(3):  # the due timer, then the lag task's turn
                    await asyncio.sleep(0)
            assert lag.seconds > 0.1
            shed = await client.post("/predict")
            assert shed.status_code == 503 and shed.headers["Retry-After"] == "1"
            await asyncio.sleep(0.15)  # the loop keeps time again
            assert lag.seconds < 0.05
            assert (await client.post("/predict")).status_code == 200
    finally:
        lag.stop()


PROXIES = trusted_networks(["10.0.0.0/8", "2001:db8:ffff::/48"])


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        # a direct client: whatever it writes in the header is ignored
        ("203.0.113.5", "198.51.100.1", "203.0.113.5"),
        # through one trusted proxy that appends the address it saw
        ("10.1.2.3", "203.0.113.5", "203.0.113.5"),
        # a client writing its own entries in front of the proxy's: never believed
        ("10.1.2.3", "198.51.100.1, 1.2.3.4, 203.0.113.5", "203.0.113.5"),
        # two trusted proxies in a row: the rightmost untrusted entry is the client
        ("10.1.2.3", "198.51.100.1, 203.0.113.5, 10.9.9.9", "203.0.113.5"),
        # garbage where an address should be: nothing left of it is believed
        ("10.1.2.3", "198.51.100.1, not-an-address", "10.1.2.3"),
        # IPv6 clients count by /64, whatever address they take inside it
        ("2001:db8:1:2:aaaa::1", None, "2001:db8:1:2::/64"),
        ("10.1.2.3", "2001:db8:1:2:bbbb::7", "2001:db8:1:2::/64"),
        ("2001:db8:ffff::1", "::ffff:203.0.113.5", "203.0.113.5"),
        (None, "203.0.113.5", "unknown"),
    ],
)
def test_client_identity_is_the_rightmost_untrusted_forwarded_address(
    peer: str | None, forwarded_for: str | None, client: str
) -> None:
    assert client_address(peer, forwarded_for, PROXIES) == client


def test_a_client_behind_a_proxy_cannot_pick_its_identity() -> None:
    """Whatever a client prepends, the limit identity through an appending proxy is the same."""
    seen = {client_address("10.0.0.2", f"{spoof}, 203.0.113.5", PROXIES) for spoof in ("1.1.1.1", "10.0.0.3", "::1")}
    assert seen == {"203.0.113.5"}


@pytest.mark.anyio
async def test_a_connection_back_before_its_429s_retry_after_is_refused_after_a_pause() -> None:
    """A client polling back to back at its rate limit: its second refusal on the same
    connection waits `pace_s`, so refusals cannot take the event loop (the first is at once)."""
    from fastapi import FastAPI

    from service import errors
    from service.clients import ClientLimits
    from storage.ratelimit import make_limiter, parse_limit

    limits = ClientLimits(make_limiter(None), {"reads": parse_limit("1/minute")}, [], pace_s=0.2)
    app = FastAPI()
    errors.install(app)

    @app.get("/poll")
    async def poll(request: Request, response: Response) -> dict:
        await limits.check(request, response, "reads")
        return {}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        loop = asyncio.get_running_loop()
        times = []
        for _ in range(3):
            started = loop.time()
            times.append(((await client.get("/poll")).status_code, loop.time() - started))
    assert [status for status, _ in times] == [200, 429, 429]
    assert times[1][1] < 0.2 <= times[2][1]  # the first refusal at once, the second paced


def test_send_buffers_capped_on_listening_sockets_and_inherited() -> None:
    """The listening socket's SO_SNDBUF is set (Linux doubles it) and the connections it
    accepts inherit it: an unread response fills a small buffer, not the kernel's 4 MiB."""
    import socket

    from service.workarounds import cap_send_buffers

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    try:
        assert cap_send_buffers(65_536) >= 1
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 65_536
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 65_536
            accepted.setblocking(False)
            sent = 0
            with pytest.raises(BlockingIOError):
                while True:
                    sent += accepted.send(b"x" * 65_536)
            assert sent < 1_048_576  # left to the kernel, an unread loopback stream took ~2.8 MB here
        assert cap_send_buffers(0) == 0
    finally:
        client.close()
        listener.close()
