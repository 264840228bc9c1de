"""How long one request takes when the machine is idle between requests, against back to back:
`python -m loadtests.idle_latency --url http://127.0.0.1:3000` (docs/performance.md, "Cache hits
at light load").

One client, one keep-alive connection, requests one at a time; between them it sleeps each
`--gaps` in turn (0: back to back). In the cache load test 50 users send about 50 requests a
second, so the cores sleep between requests: each hop of a request (client to worker, worker to
Redis and back, worker to client) then wakes a sleeping core first, which back-to-back requests
never pay. The service's own time per request (`latency_ms` of a cached /predict: the cache
lookup and the rate limit) is printed beside the client's. `--floor` measures the same way a
minimal ASGI app (`floor_app`: one JSON answer, no framework) under uvicorn with uvloop and
httptools, as BentoML runs the service: what this machine's HTTP round trip costs by itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from loadtests.chaos.tally import percentile
from tests.support.serving import free_port, wait_ready


async def floor_app(scope: dict, receive: Any, send: Any) -> None:
    """The least an HTTP answer can cost here: read the body, answer a fixed JSON object."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = b'{"status":"ok","latency_ms":0.0}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve_floor() -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = ["--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "loadtests.idle_latency:floor_app", *args])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, "the floor app", timeout=30, proc=proc)
    except RuntimeError:
        proc.kill()
        raise
    return proc, url


def run(url: str, gaps_ms: list[float], requests: int, text: str) -> list[dict[str, float | str]]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=10)
    client = 0

    def send(method: str, path: str, body: dict | None) -> tuple[float, int, bytes]:
        nonlocal client
        client += 1  # a client address of its own per request: the rate limit never trips
        headers = {"Content-Type": "application/json", "X-Forwarded-For": f"198.18.{client >> 8 & 255}.{client & 255}"}
        started = time.perf_counter()
        conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return (time.perf_counter() - started) * 1000, response.status, data

    rows: list[dict[str, float | str]] = []
    cases = [("GET /health", "GET", "/health", None), ("POST /predict, cached", "POST", "/predict", {"text": text})]
    for gap in gaps_ms:
        for name, method, path, body in cases:
            send(method, path, body)  # the text is cached from here on
            client_ms, server_ms = [], []
            for _ in range(requests):
                time.sleep(gap / 1000)
                ms, status, data = send(method, path, body)
                if status != 200:
                    raise SystemExit(f"{name}: HTTP {status}: {data[:200]!r}")
                client_ms.append(ms)
                if path == "/predict":
                    server_ms.append(json.loads(data)["latency_ms"])
            row: dict[str, float | str] = {
                "request": name,
                "gap_ms": gap,
                "p50_ms": round(statistics.median(client_ms), 2),
                "p90_ms": round(percentile(client_ms, 0.9) or 0.0, 2),
            }
            if server_ms:
                row["service_p50_ms"] = round(statistics.median(server_ms), 2)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--gaps", default="0,5,20", help="milliseconds of idle time between requests")
    parser.add_argument("--requests", type=int, default=400, help="per request kind and gap")
    parser.add_argument("--text", default="A fine film, truly, from its first scene to its last.")
    parser.add_argument("--floor", action="store_true", help="also a minimal ASGI app under uvicorn, the same way")
    args = parser.parse_args(argv)
    gaps = [float(g) for g in args.gaps.split(",")]
    servers = [("service", args.url)]
    floor = None
    if args.floor:
        floor, floor_url = serve_floor()
        servers.append(("floor", floor_url))
    try:
        print(f"{'server':<8} {'request':<24} {'gap ms':>6} {'p50 ms':>7} {'p90 ms':>7} {'service p50 ms':>15}")
        for name, url in servers:
            for r in run(url, gaps, args.requests, args.text):
                service = r.get("service_p50_ms", "-") if name == "service" else "-"
                print(f"{name:<8} {r['request']:<24} {r['gap_ms']:>6} {r['p50_ms']:>7} {r['p90_ms']:>7} {service:>15}")
    finally:
        if floor is not None:
            floor.terminate()
            floor.wait(timeout=10)


if __name__ == "__main__":
    main()
