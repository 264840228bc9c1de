"""Probe: does distillation from an ensemble of full builds pay? (issue: a better model)

    python -m models.distill_probe seed 29             # another full fine-tune, seed 29
    python -m models.distill_probe ensemble 29         # the store's fp32 model + seed 29, and their mean
    python -m models.distill_probe student 29 --weight 0.7 --temperature 2
    python -m models.distill_probe accuracy 0 --folders var/probe/student-w0.7-t2.0-s13

Works in var/probe; needs the corpus of a full build (var/data) and the store's models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from models.data import DEFAULT_DATA_DIR, LABELS, prepare, read_jsonl

WORK = Path("var/probe")


def log(msg: str) -> None:
    print(msg, flush=True)


def fine_tune(folder: Path, seed: int, teacher=None, **overrides) -> dict:
    from models import runtime
    from models.train import TrainConfig, train

    corpus = prepare(DEFAULT_DATA_DIR, log=log)
    cfg = dataclasses.replace(TrainConfig(seed=seed), **overrides)
    stats = train(corpus.encoder, read_jsonl(corpus.train), cfg, folder, teacher_logits=teacher)
    runtime.write_info(folder, runtime.RUNTIME_TORCH, LABELS, cfg.max_length, cfg.head_tokens)
    runtime.trace_torch(folder)
    (folder / "stats.json").write_text(json.dumps(stats, indent=1))
    log(f"trained {folder} in {stats['seconds']} s")
    return stats


def members(seeds: list[int]) -> list[Path]:
    import bentoml

    return [Path(bentoml.models.get("sentiment-minilm:latest").path)] + [WORK / f"seed-{s}" for s in seeds]


def logits_of(folder: Path, name: str, texts: list[str]) -> np.ndarray:
    from models.runtime import load_dir

    cache = WORK / f"logits-{folder.name}-{name}.npy"
    if not cache.exists():
        started = time.perf_counter()
        np.save(cache, load_dir(folder).logits(texts))
        log(f"logits of {folder.name} on {name}: {time.perf_counter() - started:.0f} s")
    return np.load(cache)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ensemble(seeds: list[int]) -> None:
    corpus = prepare(DEFAULT_DATA_DIR, log=log)
    sets = {"validation": corpus.validation, "out_of_source": corpus.out_of_source, "reviews_test": corpus.reviews_test}
    for name, path in sets.items():
        examples = read_jsonl(path)
        target = np.array([LABELS.index(ex.label) for ex in examples])
        probs = []
        for folder in members(seeds):
            z = logits_of(folder, name, [ex.text for ex in examples])
            probs.append(softmax(z))
            log(f"{name:14} {folder.name:28} {np.mean(z.argmax(1) == target):.4f}")
        mean = np.mean(probs, axis=0)
        log(f"{name:14} {'ensemble':28} {np.mean(mean.argmax(1) == target):.4f}")


def accuracy(folders: list[Path]) -> None:
    corpus = prepare(DEFAULT_DATA_DIR, log=log)
    for name in ("validation", "out_of_source", "reviews_test"):
        examples = read_jsonl(getattr(corpus, name))
        target = np.array([LABELS.index(ex.label) for ex in examples])
        for folder in folders:
            z = logits_of(folder, name, [ex.text for ex in examples])
            log(f"{name:14} {folder.name:28} {np.mean(z.argmax(1) == target):.4f}")


def student(seeds: list[int], weight: float, temperature: float, seed: int) -> None:
    corpus = prepare(DEFAULT_DATA_DIR, log=log)
    texts = [ex.text for ex in read_jsonl(corpus.train)]
    teacher = np.mean([logits_of(folder, "train", texts) for folder in members(seeds)], axis=0)
    folder = WORK / f"student-w{weight}-t{temperature}-s{seed}"
    fine_tune(folder, seed, teacher, distill_weight=weight, distill_temperature=temperature)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["seed", "ensemble", "student", "accuracy"])
    parser.add_argument("seeds", type=int, nargs="+")
    parser.add_argument("--weight", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--student-seed", type=int, default=13)
    parser.add_argument("--folders", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.stage == "seed":
        for s in args.seeds:
            fine_tune(WORK / f"seed-{s}", s)
    elif args.stage == "ensemble":
        ensemble(args.seeds)
    elif args.stage == "accuracy":
        accuracy(args.folders)
    else:
        student(args.seeds, args.weight, args.temperature, args.student_seed)


if __name__ == "__main__":
    main()
