"""`make bench` (`python -m loadtests.bench`): this service against what users would run instead,
side by side in one run on this machine.

Servers, all started here and left idle while another is measured:
- `service`: `bentoml serve` of this service with its defaults (the int8 model, embedded cache
  and SQLite analytics), rate limits off;
- `litserve`: a lean batching server of the same ONNX int8 model;
- `naive`: one PyTorch fp32 forward per request.

Each case is closed-loop Locust users (loadtests/locustfile.py's PredictUser) sending `POST /predict`
with a text never sent before, drawn from the model build's out-of-source reviews (a source
never used in training). Cases run in rounds, the servers' order rotating each round, and the
figures are medians over the rounds. Per case: requests/s, latency percentiles, errors, CPU
milliseconds per request of the server's processes, and for the service its mean batch. Then
one more case of the service at `--profile-clients`, sampled with py-spy, splits its CPU into
the model (tokenizer and forward pass) and everything else. Memory is the PSS of each server's
processes at the end.

The result goes to --json (var/bench.json), and a chart of it, each server's requests/s and p95
by client count, to --chart (docs/img/bench.png, the results page's); `--chart-only` redraws the
chart from an existing --json without running anything. The servers, the peers and the py-spy
split are in loadtests/bench/peers.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import tempfile
from pathlib import Path

import httpx

from loadtests.bench.peers import SERVERS, Server, focus, profile_service, raw_throughput, start_peer
from loadtests.harness import OUT_OF_SOURCE, MachineLoad, load_texts, log, metric_totals, start_locust, stopped
from loadtests.report.plots import bench_chart
from tests.support.serving import ROOT, Served, wait_ready

BATCH_SERIES = (
    "sentiment_inference_batch_texts_sum",
    "sentiment_inference_batch_texts_count",
    "sentiment_inference_cpu_seconds_total",
)


def run_locust(url: str, mode: str, users: int, seconds: int, prefix: Path, texts: str) -> dict:
    options = ["--headless", "--only-summary", "-u", str(users), "-r", str(users), "-t", f"{seconds}s"]
    options += ["--csv", str(prefix), "--loglevel", "WARNING"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start_locust("PredictUser", url, options, None, {"BENCH_MODE": mode, "BENCH_TEXTS": texts}).wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    locust_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    with open(f"{prefix}_stats.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    return {
        "requests": int(row["Request Count"]),
        "failures": int(row["Failure Count"]),
        "req_per_s": round(float(row["Requests/s"]), 1),
        "p50_ms": float(row["50%"]),
        "p95_ms": float(row["95%"]),
        "p99_ms": float(row["99%"]),
        "locust_cores": round(locust_cpu / seconds, 2),
    }


def measure(server: Server, mode: str, users: int, seconds: int, workdir: Path, texts: str, tag: str) -> dict:
    focus(server)
    batches = metric_totals(server.url, BATCH_SERIES) if server.served is not None else None
    cpu0, machine = server.cpu_seconds(), MachineLoad().start()
    stats = run_locust(server.url, mode, users, seconds, workdir / f"{server.name}-{mode}-{users}-{tag}", texts)
    cpu = server.cpu_seconds() - cpu0
    stats["machine_busy"] = machine.stop()
    stats["cpu_ms_per_request"] = round(cpu * 1000 / stats["requests"], 2) if stats["requests"] else None
    stats["cores_busy"] = round(cpu / seconds, 2)
    if batches is not None:
        after = metric_totals(server.url, BATCH_SERIES)
        n = after[BATCH_SERIES[1]] - batches[BATCH_SERIES[1]]
        stats["mean_batch"] = round((after[BATCH_SERIES[0]] - batches[BATCH_SERIES[0]]) / n, 1) if n else None
        model_cpu = after[BATCH_SERIES[2]] - batches[BATCH_SERIES[2]]
        # None where the service does not export it (an earlier version, with --before)
        stats["model_cpu_ms_per_request"] = (
            round(model_cpu * 1000 / stats["requests"], 2) if stats["requests"] and model_cpu > 0 else None
        )
    stats.update(server=server.name, mode=mode, users=users)
    return stats


def describe(stats: dict) -> str:
    """One case on one line."""
    line = (
        f"{stats['req_per_s']:>7} req/s  p50 {stats['p50_ms']:>5.0f}  p95 {stats['p95_ms']:>5.0f}  "
        f"p99 {stats['p99_ms']:>5.0f} ms  errors {stats['failures']}  CPU {stats['cpu_ms_per_request']} ms/req"
    )
    if stats.get("model_cpu_ms_per_request") is not None:
        line += f" (model {stats['model_cpu_ms_per_request']})"
    line += f"  machine {stats['machine_busy']:.0%} busy, Locust {stats['locust_cores']} cores"
    if stats.get("mean_batch") is not None:
        line += f"  batch {stats['mean_batch']}"
    return line


def median_case(runs: list[dict]) -> dict:
    """The median of each figure over the rounds of one case."""
    out = dict(runs[0])
    for key in (
        "req_per_s",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "cpu_ms_per_request",
        "model_cpu_ms_per_request",
        "locust_cores",
        "cores_busy",
        "mean_batch",
        "machine_busy",
    ):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = round(statistics.median(values), 2) if values else None
    out["failures"] = sum(r["failures"] for r in runs)
    out["requests"] = sum(r["requests"] for r in runs)
    out["rounds"] = len(runs)
    return out


# --- the run ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentiment-minilm-int8:latest", help="the service's model A, and LitServe's")
    parser.add_argument("--reference", default="sentiment-minilm:latest", help="variant B, and the naive peer's")
    parser.add_argument("--clients", default="8,32,64", help="closed-loop users per case")
    parser.add_argument("--seconds", type=int, default=30, help="duration of each case")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all cases; figures are medians")
    parser.add_argument("--peers", default="litserve,naive", help="comma-separated; empty for the service alone")
    parser.add_argument("--profile-clients", type=int, default=32)
    parser.add_argument("--profile-seconds", type=int, default=25, help="0: no py-spy profile")
    parser.add_argument("--raw-seconds", type=float, default=15, help="0: no raw model measurement")
    parser.add_argument("--texts", default=OUT_OF_SOURCE, help="JSON lines with a text field")
    parser.add_argument("--json", type=Path, default=Path("var/bench.json"))
    parser.add_argument("--chart", type=Path, default=Path("docs/img/bench.png"), help="the chart of --json's cases")
    parser.add_argument("--chart-only", action="store_true", help="draw --chart from an existing --json, run nothing")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the service (repeatable)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:K=V[,K=V...]: one more instance of the service with these settings, measured beside it",
    )
    parser.add_argument(
        "--before",
        action="append",
        default=[],
        help="[NAME=]DIR: a checkout of another version (git worktree add DIR REF), its service measured beside"
        " this one as NAME ('before' unless given); repeatable",
    )
    args = parser.parse_args()
    if args.chart_only:
        log(f"wrote {bench_chart(json.loads(args.json.read_text()), args.chart)}")
        return 0
    clients = [int(c) for c in args.clients.split(",") if c]
    peers = [p for p in args.peers.split(",") if p]

    texts = load_texts(ROOT / args.texts, 400)
    if args.raw_seconds < 0 or args.profile_seconds < 0 or args.seconds <= 0:
        parser.error("--seconds must be positive, --raw-seconds and --profile-seconds 0 or more")
    raw: dict[int, dict[str, float]] = {}
    if args.raw_seconds:
        log(f"raw model: {args.model}, batch 32, no HTTP, {args.raw_seconds:.0f} s per thread count ...")
        raw = {n: raw_throughput(args.model, texts, args.raw_seconds, n) for n in (1, 2)}
    for n, r in raw.items():
        log(
            f"  {n} thread(s): {r['texts_per_s']} texts/s, batch in {r['batch_ms_median']} ms, "
            f"{r['cpu_ms_per_text']} CPU ms per text",
        )

    workdir = Path(tempfile.mkdtemp(prefix="sentiment-bench-"))
    env = {
        "SENTIMENT_MODEL": args.model,
        "AB_MODEL_B": args.reference,
        "RATE_LIMIT_PREDICT": "0",
        "RATE_LIMIT_BATCH": "0",
        **dict(e.split("=", 1) for e in args.env),
    }
    servers = SERVERS
    with stopped() as started:
        variants = [("service", {})] + [
            (spec.split(":", 1)[0], dict(kv.split("=", 1) for kv in spec.split(":", 1)[1].split(",") if kv))
            for spec in args.variant
        ]
        sources = [(name, extra, ROOT) for name, extra in variants]
        for spec in args.before:
            name, _, folder = spec.rpartition("=")
            sources.append((name or "before", {}, Path(folder).resolve()))
        for name, extra, source in sources:
            instance = Server(name, "")
            folder = workdir / name
            folder.mkdir()
            own = {"DATABASE_URL": f"sqlite:///{folder / 'analytics.db'}", "SPILL_DIR": str(folder / "spill")}
            instance.served = Served({**env, **own, **extra}, folder / "serve.log", workers=None, source=source)
            servers.append(instance)
            started.append(instance)
            instance.served.start(timeout=240)
            instance.url = instance.served.url
            wait_ready(f"{instance.url}/health", name, 60)
            httpx.post(f"{instance.url}/predict", json={"text": "warm up"}, timeout=30)
        service = servers[0]
        for peer in (p for p in ("litserve", "naive") if p in peers):
            servers.append(start_peer(peer, args.model if peer == "litserve" else args.reference, workdir))
            started.append(servers[-1])
        health = httpx.get(f"{service.url}/health", timeout=10).json()
        log(
            f"service: {health['model']['A']} ({health['model']['runtimes'][health['model']['A']]}), "
            f"{health['model']['threads']} thread(s) per worker; peers: {', '.join(peers) or 'none'}",
        )
        runs: dict[tuple[str, str, int], list[dict]] = {}
        for rnd in range(args.rounds):
            order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
            for users in clients:
                for server in order:
                    stats = measure(server, "unique", users, args.seconds, workdir, args.texts, f"r{rnd}")
                    runs.setdefault((server.name, "unique", users), []).append(stats)
                    log(f"  round {rnd + 1} {server.name:>8} x{users:<3} {describe(stats)}")
            for server in (s for s in order if s.name in {name for name, _, _ in sources}):  # the versions served
                stats = measure(server, "repeated", max(clients), args.seconds, workdir, args.texts, f"r{rnd}")
                runs.setdefault((server.name, "repeated", max(clients)), []).append(stats)
                log(
                    f"  round {rnd + 1} {server.name:>8} x{max(clients)} cached {stats['req_per_s']} req/s  "
                    f"p50 {stats['p50_ms']:.0f}  p95 {stats['p95_ms']:.0f} ms"
                )
        profile = None
        if args.profile_seconds:
            log(f"profiling the service at {args.profile_clients} clients with py-spy ...")

            def profiled_case(seconds: int) -> dict:
                return measure(service, "unique", args.profile_clients, seconds, workdir, args.texts, "profiled")

            profile = profile_service(service.pid, args.profile_seconds, workdir, profiled_case)
        memory = {s.name: s.pss_mb() for s in servers}
        inference = metric_totals(service.url, ("sentiment_inference_seconds_sum", "sentiment_inferred_texts_total"))

    cases = {key: median_case(v) for key, v in runs.items()}
    log("")
    log(f"medians of {args.rounds} round(s) of {args.seconds} s, Locust on the same {os.cpu_count()} cores")
    log(
        f"{'server':<9} {'texts':<9} {'clients':>7} {'req/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'CPU ms/req':>10} {'batch':>6}"
    )
    for (name, mode, users), c in sorted(cases.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        log(
            f"{name:<9} {mode:<9} {users:>7} {c['req_per_s']:>8.1f} {c['p50_ms']:>7.0f} {c['p95_ms']:>7.0f} "
            f"{c['p99_ms']:>7.0f} {c['failures']:>6} {c['cpu_ms_per_request'] or 0:>10.2f} "
            f"{c.get('mean_batch') or '-':>6}"
        )
    ratios = {}
    for users in clients:
        ours = cases.get(("service", "unique", users))
        for peer in peers:
            theirs = cases.get((peer, "unique", users))
            if ours and theirs and theirs["req_per_s"]:
                ratios[f"{peer}_x{users}"] = round(ours["req_per_s"] / theirs["req_per_s"], 2)
    log("throughput ratios, service / peer: " + ", ".join(f"{k} {v}x" for k, v in ratios.items()))
    split = None
    if profile is not None:
        per_req = profile["case"]["cpu_ms_per_request"] or 0.0
        model_ms = per_req * profile["model_share"]
        split = {
            "cpu_ms_per_request": per_req,
            "model_ms": round(model_ms, 2),
            "outside_model_ms": round(per_req - model_ms, 2),
            "shares": profile["split"],
        }
        log(
            f"CPU per uncached request (py-spy, {args.profile_clients} clients): {per_req:.2f} ms, "
            f"model {model_ms:.2f} ms, everything else {per_req - model_ms:.2f} ms"
        )
        for bucket, share in profile["split"].items():
            log(f"  {share * 100:5.1f}%  {bucket}")
    log("memory (PSS): " + ", ".join(f"{k} {v:.0f} MB" for k, v in memory.items()))
    if raw:
        one, two = raw[1]["texts_per_s"], raw[2]["texts_per_s"]
        log(f"raw model: {one} texts/s on 1 thread, {two} on 2 (batch 32, same run)")
    result = {
        "model": args.model,
        "reference": args.reference,
        "raw": raw,
        "cases": list(cases.values()),
        "ratios": ratios,
        "cpu_split": split,
        "memory_pss_mb": memory,
        "service_inference": inference,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "chart", "chart_only")},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    log(f"wrote {args.json} and {bench_chart(result, args.chart)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
