"""The model's own knobs, measured without HTTP (`python -m loadtests.model_knobs`):

- ONNX Runtime session options: intra-op threads, the CPU memory arena, the graph
  optimization level, thread-pool spinning;
- the tokenizer: transformers' call against the Rust tokenizer's batch call, per text and
  per batch.

Each figure is the median over repeated calls on texts of the model build's out-of-source set,
one process, nothing else running in it. The README's Performance section records the table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from loadtests.texts import OUT_OF_SOURCE, load_texts


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentiment-minilm-int8:latest")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    import bentoml
    import numpy as np
    import onnxruntime as ort

    from models import runtime

    folder = Path(bentoml.models.get(args.model).path)
    texts = load_texts(Path(OUT_OF_SOURCE), 400)
    predictor = runtime.load_dir(folder, args.model, 1)
    assert isinstance(predictor, runtime.OnnxPredictor)

    print("tokenizer, median per call (microseconds per text):")
    for size in (1, 8, 32):
        batch = texts[:size]
        slow = _median_ms(
            lambda b=batch: predictor.tokenizer(
                b, truncation=True, max_length=predictor.max_length, padding=True, return_tensors="np"
            ),
            args.repeats,
        )
        fast = _median_ms(lambda b=batch: predictor.encode(b), args.repeats)
        print(
            f"  batch {size:>2}: transformers {slow * 1000 / size:7.1f} us   tokenizers batch call "
            f"{fast * 1000 / size:7.1f} us"
        )
    one_by_one = _median_ms(lambda: [predictor.encode([t]) for t in texts[:32]], args.repeats)
    print(f"  32 texts one call each (tokenizers): {one_by_one * 1000 / 32:7.1f} us per text")

    print("ONNX Runtime forward, median ms per call (per text):")
    print(f"  {'threads':>7} {'arena':>5} {'opt':>8} {'spin':>4} {'batch 1':>14} {'batch 8':>14} {'batch 32':>14}")
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    feeds = {size: predictor.encode(texts[:size]) for size in (1, 8, 32)}
    configs = [
        (1, True, "all", False),
        (1, False, "all", False),
        (1, True, "extended", False),
        (1, True, "basic", False),
        (2, True, "all", False),
        (2, True, "all", True),
    ]
    for threads, arena, level, spin in configs:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = arena
        options.graph_optimization_level = levels[level]
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        cells = []
        for size, feed in feeds.items():
            inputs = {k: v.astype(np.int64) for k, v in feed.items() if k in names}
            ms = _median_ms(lambda s=session, i=inputs: s.run(None, i), args.repeats)
            cells.append(f"{ms:6.2f} ({ms / size:5.2f})")
        print(
            f"  {threads:>7} {'on' if arena else 'off':>5} {level:>8} {'on' if spin else 'off':>4} " + " ".join(cells)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
