"""Accuracy, calibration and latency of stored models, through the service's own predictor.

python -m models.evaluate                       # both default models, corpus held-out sets
python -m models.evaluate --data other.jsonl    # any jsonl of {"text", "label"}
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from models.data import LABELS, Example, read_jsonl
from models.runtime import Predictor

DEFAULT_MODELS = ("sentiment-minilm:latest", "sentiment-minilm-int8:latest")
CALIBRATION_BINS = 10
# Text length buckets (words) for accuracy by length: upper bounds, inclusive.
LENGTH_BUCKETS = ((10, "1-10 words"), (20, "11-20 words"), (40, "21-40 words"), (None, "over 40 words"))


def length_bucket(text: str) -> str:
    words = len(text.split())
    return next(name for bound, name in LENGTH_BUCKETS if bound is None or words <= bound)


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool]) -> float:
    """ECE over equal-width confidence bins: the gap between confidence and accuracy, weighted."""
    conf = np.asarray(confidences, dtype=float)
    hit = np.asarray(correct, dtype=float)
    if conf.size == 0:
        return 0.0
    bins = np.minimum((conf * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    total = 0.0
    for b in range(CALIBRATION_BINS):
        mask = bins == b
        if mask.any():
            total += mask.sum() / conf.size * abs(conf[mask].mean() - hit[mask].mean())
    return float(total)


def fit_temperature(logits: np.ndarray, labels: Sequence[int]) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) on a
    held-out set (Guo et al., 2017). One number for all classes, so the ranking of the classes,
    and with it every label and the accuracy, is unchanged; only the scores stop being over- or
    under-confident. The loss is convex in log T, so a golden-section search over a bracket
    finds it (scipy's `minimize_scalar` does the same, and is not worth a dependency here)."""
    target = np.asarray(labels, dtype=int)
    z = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(target))

    def nll(log_t: float) -> float:
        scaled = z / math.exp(log_t)
        scaled -= scaled.max(axis=1, keepdims=True)
        log_p = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
        return float(-log_p[rows, target].mean())

    lo, hi = math.log(0.05), math.log(20.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > 1e-4:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))


def calibrate(model_dir: Path, examples: Sequence[Example]) -> float:
    """Fit the model folder's temperature on `examples` (held out from training and from every
    set it is judged on) and record it in its model.json; the temperature."""
    from models.runtime import load_dir, set_temperature

    predictor = load_dir(model_dir, Path(model_dir).name)
    logits = predictor.logits([ex.text for ex in examples])  # raw: the temperature is predict's
    temperature = fit_temperature(logits, [predictor.labels.index(ex.label) for ex in examples])
    set_temperature(model_dir, temperature)
    return temperature


def score(predictor: Predictor, examples: Sequence[Example]) -> dict:
    """Accuracy overall and per source, confusion matrix (true -> predicted) and ECE."""
    preds = predictor.predict([ex.text for ex in examples])
    correct = [p.label == ex.label for p, ex in zip(preds, examples, strict=True)]
    by_source: dict[str, list[bool]] = defaultdict(list)
    by_length: dict[str, list[bool]] = defaultdict(list)
    for ok, ex in zip(correct, examples, strict=True):
        by_source[ex.source].append(ok)
        by_length[length_bucket(ex.text)].append(ok)
    confusion = {t: {p: 0 for p in LABELS} for t in LABELS}
    for p, ex in zip(preds, examples, strict=True):
        confusion[ex.label][p.label] += 1
    return {
        "examples": len(examples),
        "accuracy": round(sum(correct) / max(1, len(correct)), 4),
        "by_source": {
            src: {"examples": len(oks), "accuracy": round(sum(oks) / len(oks), 4)}
            for src, oks in sorted(by_source.items())
        },
        "by_length": {
            name: {"examples": len(by_length[name]), "accuracy": round(sum(by_length[name]) / len(by_length[name]), 4)}
            for _, name in LENGTH_BUCKETS
            if by_length[name]
        },
        "confusion": confusion,
        "ece": round(expected_calibration_error([p.score for p in preds], correct), 4),
    }


def latency(
    predictors: Sequence[Predictor], texts: Sequence[str], single: int = 60, batches: int = 12
) -> dict[str, dict[str, float]]:
    """Median milliseconds per call at batch 1, 8 and 32, the models interleaved call by call
    so that both see the same machine load."""
    times: dict[str, dict[str, list[float]]] = {p.name: {"1": [], "8": [], "32": []} for p in predictors}
    for p in predictors:  # warm-up: first calls allocate and pick kernels
        p.predict(texts[:32])
    for i in range(single):
        for p in predictors:
            t = time.perf_counter()
            p.predict([texts[i % len(texts)]])
            times[p.name]["1"].append(time.perf_counter() - t)
    for size in (8, 32):
        for i in range(batches):
            batch = [texts[(i * size + j) % len(texts)] for j in range(size)]
            for p in predictors:
                t = time.perf_counter()
                p.predict(batch)
                times[p.name][str(size)].append(time.perf_counter() - t)
    return {
        name: {f"batch{size}_ms": round(statistics.median(ts) * 1000, 2) for size, ts in t.items()}
        for name, t in times.items()
    }


def evaluate(
    predictors: Sequence[Predictor], datasets: Mapping[str, Sequence[Example]], latency_texts: Sequence[str]
) -> dict:
    """Every model on every dataset, plus side-by-side latency."""
    result: dict = {"models": {}, "latency": latency(predictors, latency_texts)}
    for p in predictors:
        result["models"][p.name] = {
            "runtime": p.runtime,
            "datasets": {name: score(p, rows) for name, rows in datasets.items()},
            **result["latency"][p.name],
        }
    return result


def table(result: dict) -> str:
    """The evaluation as a plain-text table, one row per model and dataset."""
    lines = [f"{'model':<44} {'dataset':<16} {'n':>6} {'acc %':>7} {'ECE':>6} {'b1 ms':>7} {'b8 ms':>7} {'b32 ms':>7}"]
    for name, m in result["models"].items():
        for ds, s in m["datasets"].items():
            lines.append(
                f"{name:<44} {ds:<16} {s['examples']:>6} {s['accuracy'] * 100:>7.2f} "
                f"{s['ece']:>6.3f} {m['batch1_ms']:>7.1f} {m['batch8_ms']:>7.1f} {m['batch32_ms']:>7.1f}"
            )
    lines.append("")
    lines.append("accuracy by source (%):")
    for name, m in result["models"].items():
        for ds, s in m["datasets"].items():
            parts = ", ".join(
                f"{src} {v['accuracy'] * 100:.1f} (n={v['examples']})" for src, v in s["by_source"].items()
            )
            lines.append(f"  {name} / {ds}: {parts}")
    lines.append("accuracy by length (%):")
    for name, m in result["models"].items():
        for ds, s in m["datasets"].items():
            parts = ", ".join(f"{b} {v['accuracy'] * 100:.1f} (n={v['examples']})" for b, v in s["by_length"].items())
            lines.append(f"  {name} / {ds}: {parts}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from models import runtime
    from models.data import prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="model store tags")
    parser.add_argument("--data", nargs="*", type=Path, help="labeled jsonl files (default: held-out corpus sets)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many texts per file")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--json", type=Path, default=Path("var/evaluation.json"), help="where to write the report")
    args = parser.parse_args(argv)

    if args.data:
        datasets = {path.stem: read_jsonl(path) for path in args.data}
    else:
        corpus = prepare()
        datasets = {
            "validation": read_jsonl(corpus.validation),
            "out_of_source": read_jsonl(corpus.out_of_source),
            "reviews_test": read_jsonl(corpus.reviews_test),
        }
    if args.limit:
        datasets = {k: list(v)[: args.limit] for k, v in datasets.items()}
    predictors = [runtime.load(tag, args.threads) for tag in args.models]
    first = next(iter(datasets.values()))
    result = evaluate(predictors, datasets, [ex.text for ex in first])
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
