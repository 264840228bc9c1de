"""`python -m loadtests.jobs.throughput [--texts 100000]`: a bulk job's throughput beside the raw model's.

In one run on this machine:
1. the raw model (`make bench`'s `raw_throughput`: batch forward passes in a loop, no HTTP, no
   queue, unique texts), in two layouts: one process on every core (the bench's figure),
   and the service's own layout, one process per inference thread of its workers, each with the
   service's intra-op threads, all at once (summed);
2. a job of `--texts` unique texts on an idle instance: a throwaway PostgreSQL (and, with
   `--redis`, a throwaway Redis), a 2-worker `bentoml serve`, nothing else sent to it; from the
   POST to the poll that sees it done, in texts per second;
3. the raw model again, so that a machine whose load changed during the run shows.

The ratio printed and written is the job's texts/s over the better raw layout's (the mean of its
two measurements): the share of the model's throughput a job keeps. The goal is 80% or more.
Also: the inference threads' busy share during the job (`sentiment_inference_seconds`), the
mean batch, the CPU per text of the instance (and of its database) against the raw model's, the
chunks each worker scored, and the job in 30 s windows. Every phase and window says how many
cores others' work took meanwhile: on a shared machine, a run where that is over QUIET_CORES
is marked busy, its ratio not the service's own.

Models: the store's (`$BENTOML_HOME` or ~/bentoml) when it holds both, otherwise the quick ones
in var/bentoml-quick (built there when missing, about a minute). The report (report.json,
report.md) goes to var/jobs-bench/<time>/ unless `--out`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import sqlalchemy as sa

from loadtests.bench.peers import raw_throughput
from loadtests.harness import (
    MODEL,
    OUT_OF_SOURCE,
    REFERENCE,
    MachineLoad,
    busy_seconds,
    cpu_seconds,
    load_texts,
    log,
    metric_totals,
    model_store,
    stopped,
)
from loadtests.report.markdown import table
from service.config import Settings
from tests.support.servers import PostgresServer, RedisServer
from tests.support.serving import ROOT, Served

WORKERS = 2
# Others' work on a shared machine: above this many cores in any phase or window, the run's ratio
# says more about the neighbours than about the service (the scheduler shares the cores out by
# thread, and the instance has more threads than the raw processes), and the report says so.
QUIET_CORES = 0.2
# The service's settings for a 2-worker instance on this machine (the environment's overrides
# apply to the instance too): its threads, and the job runner's sub-batch (BATCH_MAX_TEXTS).
SETTINGS = Settings(service_workers=WORKERS)
BATCH = SETTINGS.batch_max_texts
SERIES = (
    "sentiment_inferred_texts_total",
    "sentiment_inference_seconds_sum",
    "sentiment_inference_cpu_seconds_total",
    "sentiment_inference_batch_texts_sum",
    "sentiment_inference_batch_texts_count",
    "sentiment_job_texts_total",
)


def _raw_one(job: tuple[str, list[str], float, int]) -> dict[str, float]:
    """The bench's raw measurement in this process, with the cores it and the whole machine used."""
    machine, own, wall = psutil.cpu_times(), time.process_time(), time.perf_counter()
    result = raw_throughput(*job, batch=BATCH)
    machine1, wall = psutil.cpu_times(), time.perf_counter() - wall
    idle = (machine1.idle + machine1.iowait) - (machine.idle + machine.iowait)
    busy = (sum(machine1) - sum(machine) - idle) / wall  # in cores: /proc/stat counts every core
    return {**result, "own_cores": (time.process_time() - own) / wall, "machine_cores": busy}


def raw_layouts(texts: list[str], seconds: float) -> dict[str, dict[str, Any]]:
    """Texts/s of the raw model: one process on every core, and one process per inference thread
    of the service at once; with the cores the rest of the machine took meanwhile."""
    cores = os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")  # no torch or ONNX Runtime state forked
    loops = WORKERS * SETTINGS.inference_threads_per_worker
    layouts = {"one_process": (1, cores), "service_layout": (loops, SETTINGS.threads_per_worker)}
    out: dict[str, dict[str, Any]] = {}
    for name, (processes, threads) in layouts.items():
        with ctx.Pool(processes) as pool:
            each = pool.map(_raw_one, [(MODEL, texts, seconds, threads)] * processes)
        machine = statistics.mean(r["machine_cores"] for r in each)
        out[name] = {
            "texts_per_s": round(sum(r["texts_per_s"] for r in each), 1),
            "each_texts_per_s": [r["texts_per_s"] for r in each],
            "batch_ms_median": round(statistics.median(r["batch_ms_median"] for r in each), 2),
            "cpu_ms_per_text": round(statistics.mean(r["cpu_ms_per_text"] for r in each), 3),
            "others_cores": round(max(0.0, machine - sum(r["own_cores"] for r in each)), 2),
            "processes": processes,
            "threads": threads,
        }
    return out


def run_job(served: Served, backends: list[int], texts: list[str], poll_s: float) -> dict[str, Any]:
    """Submit the job, poll it until done; the timeline of its progress and its figures.
    `backends`: the pids of the instance's PostgreSQL (and Redis), whose work is the job's too."""
    assert served.proc is not None
    body = json.dumps({"texts": texts}).encode()
    before = metric_totals(served.url, SERIES)
    cpu0, db0 = cpu_seconds(served.proc.pid), cpu_seconds(*backends)
    machine = MachineLoad().start()
    busy0 = busy_seconds()
    started = time.perf_counter()
    r = httpx.post(
        f"{served.url}/jobs", content=body, headers={"Content-Type": "application/json"}, timeout=600
    ).raise_for_status()
    submitted = time.perf_counter() - started
    job_id = r.json()["job_id"]
    auth = {"Authorization": f"Bearer {r.json()['token']}"}
    # (seconds, texts done, CPU seconds of the instance and its backends, busy CPU seconds of the machine)
    timeline: list[tuple[float, int, float, float]] = []
    while True:
        progress = httpx.get(f"{served.url}/jobs/{job_id}", headers=auth, timeout=60).raise_for_status().json()
        ours = cpu_seconds(served.proc.pid, *backends) - cpu0 - db0
        t = round(time.perf_counter() - started, 2)
        timeline.append((t, progress["done"], round(ours, 2), round(busy_seconds() - busy0, 2)))
        if progress["status"] not in ("queued", "running"):
            break
        time.sleep(poll_s)
    elapsed = time.perf_counter() - started
    busy = machine.stop()
    cpu, db = cpu_seconds(served.proc.pid) - cpu0, cpu_seconds(*backends) - db0
    after = metric_totals(served.url, SERIES)
    if progress["status"] != "done" or progress["done"] != len(texts):
        raise RuntimeError(f"the job ended {progress['status']} with {progress['done']} of {len(texts)} texts")
    delta = {k: after[k] - before[k] for k in SERIES}
    first, first_done = next(((t, done) for t, done, _, _ in timeline if done), (elapsed, 0))
    server_s = (
        datetime.fromisoformat(progress["finished_at"]) - datetime.fromisoformat(progress["created_at"])
    ).total_seconds()
    batches = delta["sentiment_inference_batch_texts_count"]
    return {
        "job_id": job_id,
        "texts": len(texts),
        "body_mb": round(len(body) / 2**20, 1),
        "seconds": round(elapsed, 2),
        "texts_per_s": round(len(texts) / elapsed, 1),
        "submit_seconds": round(submitted, 2),
        "first_progress_seconds": first,
        "steady_texts_per_s": round((len(texts) - first_done) / (elapsed - first), 1) if elapsed > first else None,
        "server_seconds": round(server_s, 2),  # created_at to finished_at, the service's clock
        "inferred_texts": int(delta["sentiment_inferred_texts_total"]),
        "inference_busy_share": round(
            delta["sentiment_inference_seconds_sum"] / (elapsed * WORKERS * SETTINGS.inference_threads_per_worker), 3
        ),
        "model_cpu_ms_per_text": round(delta["sentiment_inference_cpu_seconds_total"] * 1000 / len(texts), 3),
        "instance_cpu_ms_per_text": round(cpu * 1000 / len(texts), 3),
        "mean_batch": round(delta["sentiment_inference_batch_texts_sum"] / batches, 1) if batches else None,
        "machine_busy": busy,
        "backends_cpu_ms_per_text": round(db * 1000 / len(texts), 3),
        "instance_cores": round(cpu / elapsed, 2),
        "backends_cores": round(db / elapsed, 2),
        # the cores the rest of the machine took meanwhile (others' work on a shared machine)
        "others_cores": round(max(0.0, busy * (os.cpu_count() or 1) - (cpu + db) / elapsed), 2),
        "windows": windows(timeline, 30.0),
        "timeline": timeline,
    }


def windows(timeline: list[tuple[float, int, float, float]], seconds: float) -> list[dict[str, float]]:
    """The job's progress in windows of about `seconds`: texts/s, and the cores the instance (with
    its backends) and the rest of the machine took, so that a window others disturbed shows."""
    out, start = [], timeline[0]
    for point in timeline[1:]:
        if point[0] - start[0] >= seconds or point is timeline[-1]:
            span = point[0] - start[0]
            ours = (point[2] - start[2]) / span
            out.append(
                {
                    "from_s": start[0],
                    "to_s": point[0],
                    "texts_per_s": round((point[1] - start[1]) / span, 1),
                    "our_cores": round(ours, 2),
                    "others_cores": round(max(0.0, (point[3] - start[3]) / span - ours), 2),
                }
            )
            start = point
    return out


def chunk_workers(database_url: str, job_id: str) -> dict[str, int]:
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT worker, count(*) FROM job_chunks WHERE job_id = :j GROUP BY worker"), {"j": job_id}
        ).all()
    engine.dispose()
    return {str(w): int(n) for w, n in rows}


LAYOUTS = {"one_process": "one process", "service_layout": "the service's layout"}


def markdown(report: dict[str, Any]) -> str:
    job, raw, ratio = report["job"], report["raw"], report["ratio"]
    layout = LAYOUTS[ratio["raw_layout"]]
    lines = [
        f"# Bulk job against the raw model, {report['started']}",
        "",
        f"`{report['command']}`: {report['profile']} models ({report['model']}), {WORKERS} workers x "
        f"{report['inference_threads_per_worker']} inference thread(s) x {report['threads_per_worker']} thread(s), "
        f"{report['backends']}, {os.cpu_count()} cores.",
        "",
    ]
    rows = [
        (
            f"raw model {when}, {r['processes']} process(es) x {r['threads']} thread(s)",
            r["texts_per_s"],
            f"batch {BATCH} in {r['batch_ms_median']} ms, {r['cpu_ms_per_text']} CPU ms per text; "
            f"others' work took {r['others_cores']} cores meanwhile",
        )
        for when in ("before", "after")
        for r in raw[when].values()
    ]
    details = f"{job['seconds']} s from the POST to done (submit {job['submit_seconds']} s, {job['body_mb']} MB), "
    details += (
        f"{job['instance_cpu_ms_per_text']} CPU ms per text; others' work took {job['others_cores']} cores meanwhile"
    )
    rows.append((f"**job of {job['texts']:,} texts**", f"**{job['texts_per_s']}**", details))
    lines += table(("what", "texts/s", "details"), rows)
    spans = [
        (f"{w['from_s']:.0f}-{w['to_s']:.0f}", w["texts_per_s"], w["our_cores"], w["others_cores"])
        for w in job["windows"]
    ]
    lines += [
        "",
        f"**Ratio: {ratio['job_over_raw']:.1%}** of the raw model ({layout}, {ratio['raw_texts_per_s']} "
        f"texts/s, the mean of before and after); the goal is 80% or more: **{'met' if ratio['met'] else 'not met'}**.",
        "",
        *(
            []
            if report["quiet"]
            else [
                f"**The machine was busy**: others' work took up to {report['others_cores_max']} cores in a phase "
                "or window, so this ratio is not the service's own (run again when the machine is quiet).",
                "",
            ]
        ),
        f"- Inference threads busy {job['inference_busy_share']:.0%} of the job's time; mean batch "
        f"{job['mean_batch']}; {job['inferred_texts']:,} texts inferred.",
        f"- CPU per text: the instance {job['instance_cpu_ms_per_text']} ms, of which the model "
        f"{job['model_cpu_ms_per_text']} ms, against {ratio['raw_cpu_ms_per_text']} ms of the raw model "
        f"({layout}): the job's work is {ratio['cpu_efficiency']:.1%} as efficient, whatever else "
        f"runs on the machine.",
        f"- The database{' and Redis' if 'Redis' in report['backends'] else ''} took "
        f"{job['backends_cpu_ms_per_text']} CPU ms per text more ({job['backends_cores']} cores); the job's work "
        f"all told is {ratio['cpu_efficiency_with_backends']:.1%} as efficient as the raw model.",
        f"- The instance used {job['instance_cores']} cores; from its first progress to done it scored "
        f"{job['steady_texts_per_s']} texts/s.",
        f"- First progress after {job['first_progress_seconds']} s; the service's own clock: "
        f"{job['server_seconds']} s from created to finished.",
        "- Chunks per worker: " + ", ".join(f"{w} {n}" for w, n in sorted(report["chunk_workers"].items())) + ".",
        f"- The machine before the run: {report['machine_before']['busy']:.0%} busy over 5 s, load average "
        f"{report['machine_before']['load_average']}.",
        "",
        f"The job in windows of about 30 s (our cores: the instance and its {report['backends'].split(',')[0]}):",
        "",
        *table(("seconds", "texts/s", "our cores", "others' cores"), spans),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=100_000, help="texts in the job")
    parser.add_argument("--raw-seconds", type=float, default=15, help="each raw model measurement")
    parser.add_argument("--redis", action="store_true", help="a throwaway Redis for the cache as well")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between progress polls")
    parser.add_argument("--corpus", default=OUT_OF_SOURCE, help="JSON lines with a text field")
    parser.add_argument("--out", type=Path, default=None, help="default var/jobs-bench/<time>")
    args = parser.parse_args()
    if args.texts <= 0 or args.raw_seconds <= 0 or args.poll <= 0:
        parser.error("--texts, --raw-seconds and --poll must be positive")

    started = datetime.now(UTC)
    out = args.out or ROOT / "var" / "jobs-bench" / started.strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    profile, home = model_store()
    os.environ["BENTOML_HOME"] = str(home)  # before anything imports bentoml (the raw processes)
    base = load_texts(ROOT / args.corpus, 400)
    # unique as bench.py's raw texts are: the corpus's reviews, each with a number of its own
    texts = [f"{base[k % len(base)]} [{k}]" for k in range(args.texts)]

    machine = MachineLoad().start()
    time.sleep(5)
    before_busy = machine.stop()
    load_average = [round(x, 2) for x in os.getloadavg()]
    log(f"{profile} models in {home}; machine {before_busy:.0%} busy, load average {load_average}")
    raw: dict[str, Any] = {}
    log(f"raw model before the job, {args.raw_seconds:.0f} s per layout ...")
    raw["before"] = raw_layouts(base, args.raw_seconds)
    log("  " + json.dumps(raw["before"]))

    with stopped() as servers:
        postgres = PostgresServer()
        servers.append(postgres)  # registered before its start: a failed start is stopped too
        postgres.start()
        env = {
            "DATABASE_URL": postgres.url,
            "SPILL_DIR": str(out / "spill"),
            "SENTIMENT_MODEL": MODEL,
            "AB_MODEL_B": REFERENCE,
            "RATE_LIMIT_JOBS": "0",
            "MAX_JOB_TEXTS": str(max(args.texts, 100_000)),
        }
        backends = [postgres.pid()]  # their work is the job's too
        if args.redis:
            redis_server = RedisServer()
            servers.append(redis_server)
            redis_server.start()
            assert redis_server.proc is not None
            backends.append(redis_server.proc.pid)
            env["REDIS_URL"] = redis_server.url
        served = Served(env, out / "serve.log", workers=WORKERS)
        servers.append(served)
        served.start(timeout=300)
        httpx.post(f"{served.url}/batch", json={"texts": ["warm up", "the first forward call"]}, timeout=60)
        log(f"job of {args.texts:,} unique texts ...")
        job = run_job(served, backends, texts, args.poll)
        log(
            f"  {job['texts_per_s']} texts/s, {job['seconds']} s; "
            f"inference threads busy {job['inference_busy_share']:.0%}"
        )
        workers = chunk_workers(postgres.url, job["job_id"])

    log("raw model after the job ...")
    raw["after"] = raw_layouts(base, args.raw_seconds)
    log("  " + json.dumps(raw["after"]))

    means = {
        name: round((raw["before"][name]["texts_per_s"] + raw["after"][name]["texts_per_s"]) / 2, 1)
        for name in raw["before"]
    }
    layout = max(means, key=lambda name: means[name])
    share = job["texts_per_s"] / means[layout]
    others = max(
        [r["others_cores"] for when in ("before", "after") for r in raw[when].values()]
        + [w["others_cores"] for w in job["windows"]]
    )
    raw_cpu = statistics.mean(raw[when][layout]["cpu_ms_per_text"] for when in ("before", "after"))
    report = {
        "started": started.isoformat(timespec="seconds"),
        "command": "python -m loadtests.jobs.throughput " + " ".join(sys.argv[1:]),
        "profile": profile,
        "model": MODEL,
        "threads_per_worker": SETTINGS.threads_per_worker,
        "inference_threads_per_worker": SETTINGS.inference_threads_per_worker,
        "backends": "PostgreSQL and Redis" if args.redis else "PostgreSQL, the embedded cache",
        "machine_before": {"busy": before_busy, "load_average": load_average},
        "raw": raw,
        "raw_means": means,
        "job": job,
        "chunk_workers": workers,
        "ratio": {
            "job_over_raw": round(share, 3),
            "raw_layout": layout,
            "raw_texts_per_s": means[layout],
            "raw_cpu_ms_per_text": round(raw_cpu, 3),
            "cpu_efficiency": round(raw_cpu / job["instance_cpu_ms_per_text"], 3),
            "cpu_efficiency_with_backends": round(
                raw_cpu / (job["instance_cpu_ms_per_text"] + job["backends_cpu_ms_per_text"]), 3
            ),
            "goal": 0.8,
            "met": share >= 0.8,
        },
        "others_cores_max": others,
        "quiet": others <= QUIET_CORES,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    log(f"job {job['texts_per_s']} texts/s = {share:.1%} of the raw model ({layout}, {means[layout]} texts/s)")
    if not report["quiet"]:
        log(f"the machine was busy: others took up to {others} cores in a phase; run again when it is quiet")
    log(f"wrote {out / 'report.md'} and report.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
