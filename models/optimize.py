"""The optimized CPU version of a fine-tuned model: an ONNX graph with dynamic int8 weights.

Chosen by measurement on this 2-core machine against PyTorch fp32, dynamic int8 PyTorch and
bf16 autocast (figures in models/README.md): ONNX Runtime with dynamic int8 quantization was
the fastest at batch 1 and 32 with accuracy within noise of fp32.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path

from models.runtime import RUNTIME_ONNX, read_info, write_info
from models.tokens import ENCODING_FIELDS

ONNX_OPSET = 17
INPUTS = tuple(ENCODING_FIELDS)


def export_onnx_int8(torch_dir: Path, out_dir: Path, quantize: bool = True) -> Path:
    """Export the PyTorch model in `torch_dir` to ONNX, quantize it, and write a model folder."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoTokenizer

    from models.classifier import load_classifier

    info = read_info(torch_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(torch_dir))
    # Eager attention exports to plain ONNX ops; the SDPA path traces shape-specific masks.
    model = load_classifier(torch_dir, attn_implementation="eager").eval()
    sample = tokenizer(
        ["a short text", "a somewhat longer text to give the tracer two lengths"],
        padding=True,
        return_tensors="pt",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model-fp32.onnx"
        axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                tuple(sample[name] for name in INPUTS),
                str(fp32),
                input_names=list(INPUTS),
                output_names=["logits"],
                dynamic_axes={**axes, "logits": {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        if quantize:
            # Per-channel weight scales: per-tensor ones cost 0.85 points of validation accuracy
            # here, per-channel 0.2, at the same speed. (onnxruntime's transformer graph
            # optimizer before quantizing was tried too: no faster, so not used; its
            # "consider pre-processing" hint on the root logger is muted for that reason.)
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)
            try:
                quantize_dynamic(str(fp32), str(out_dir / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True)
            finally:
                root.setLevel(level)
        else:
            shutil.copy2(fp32, out_dir / "model.onnx")
    for path in Path(torch_dir).iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab")) or path.name == "config.json":
            shutil.copy2(path, out_dir / path.name)
    write_info(out_dir, RUNTIME_ONNX, info["labels"], info["max_length"], info.get("head_tokens"))
    return out_dir


def compare(torch_dir: Path, texts: list[str], labels: list[str], threads: int = 2) -> dict[str, dict]:
    """Latency and accuracy of each CPU candidate for the optimized model, side by side.

    The measurement behind the choice above; run it with `python -m models.optimize DIR`.
    """
    import torch

    from models.evaluate import latency
    from models.runtime import TorchPredictor, load_dir

    class TorchInt8(TorchPredictor):
        runtime = "pytorch-dynamic-int8"

        def __init__(self, model_dir: Path, name: str, threads: int) -> None:
            super().__init__(model_dir, name, threads)
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)

    class TorchBf16(TorchPredictor):
        runtime = "pytorch-bf16-autocast"

        def _forward(self, encoded):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return super()._forward(encoded)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_fp32 = export_onnx_int8(torch_dir, Path(tmp) / "onnx-fp32", quantize=False)
        onnx_int8 = export_onnx_int8(torch_dir, Path(tmp) / "onnx-int8")
        candidates = [
            load_dir(torch_dir, "pytorch-fp32", threads),
            TorchInt8(torch_dir, "pytorch-dynamic-int8", threads),
            TorchBf16(torch_dir, "pytorch-bf16-autocast", threads),
            load_dir(onnx_fp32, "onnxruntime-fp32", threads),
            load_dir(onnx_int8, "onnxruntime-dynamic-int8", threads),
        ]
        timings = latency(candidates, texts)
        result = {}
        for c in candidates:
            preds = c.predict(texts)
            acc = sum(p.label == y for p, y in zip(preds, labels, strict=True)) / len(labels)
            result[c.name] = {**timings[c.name], "accuracy": round(acc, 4)}
    return result


if __name__ == "__main__":
    import argparse
    import json

    from models.data import DEFAULT_DATA_DIR, prepare, read_jsonl

    parser = argparse.ArgumentParser(description="compare CPU runtimes for a fine-tuned model folder")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = read_jsonl(prepare(DEFAULT_DATA_DIR).validation)
    print(json.dumps(compare(args.model_dir, [r.text for r in rows], [r.label for r in rows], args.threads), indent=2))
