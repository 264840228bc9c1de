"""One-off probe load: C concurrent clients posting /batch with K unique texts each, for S seconds."""

import asyncio
import itertools
import json
import sys
import time

import httpx

sys.path.insert(0, "/work/main")
from loadtests.texts import OUT_OF_SOURCE, load_texts


async def main(url, clients, per, seconds, tag):
    from pathlib import Path

    texts = load_texts(Path("/work/main") / OUT_OF_SOURCE, 400)
    counter = itertools.count()
    lat, done, errors = [], 0, 0
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as c:

        async def user(u):
            nonlocal done, errors
            while time.monotonic() < stop:
                n = next(counter)
                batch = [f"{texts[(n * per + i) % len(texts)]} [{tag}-{n}-{i}]" for i in range(per)]
                t = time.perf_counter()
                r = await c.post(
                    url + "/batch", json={"texts": batch}, headers={"X-Forwarded-For": f"10.9.{u // 250}.{u % 250}"}
                )
                lat.append(time.perf_counter() - t)
                if r.status_code == 200:
                    done += per
                else:
                    errors += 1

        t0 = time.monotonic()
        await asyncio.gather(*(user(u) for u in range(clients)))
        el = time.monotonic() - t0
    lat.sort()
    print(
        json.dumps(
            {
                "tag": tag,
                "texts_per_s": round(done / el, 1),
                "p50_ms": round(1000 * lat[len(lat) // 2], 1),
                "p95_ms": round(1000 * lat[int(len(lat) * 0.95)], 1),
                "errors": errors,
            }
        )
    )


asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]))
