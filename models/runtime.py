"""The predictor the service and the evaluation use: tokenize, batch forward, probabilities.

A model folder holds a tokenizer, the weights (PyTorch safetensors or an ONNX graph) and
`model.json` naming its runtime, labels and max length. The same folder is what the BentoML
model store keeps, so a model is evaluated before it is stored through exactly this code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

MODEL_INFO = "model.json"
RUNTIME_TORCH = "pytorch"
RUNTIME_ONNX = "onnxruntime"
# Texts are forwarded in groups of at most this many, grouped by length to limit padding.
CHUNK_SIZE = 64


@dataclass(frozen=True)
class Prediction:
    """The label with the highest probability, its probability, and all of them."""

    label: str
    score: float
    probabilities: dict[str, float]


class Predictor(Protocol):
    """What the service needs of a model."""

    name: str
    runtime: str
    labels: tuple[str, ...]
    max_length: int

    def predict(self, texts: Sequence[str]) -> list[Prediction]: ...


def read_info(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / MODEL_INFO).read_text())


def write_info(model_dir: Path, runtime: str, labels: Sequence[str], max_length: int) -> None:
    info = {"runtime": runtime, "labels": list(labels), "max_length": max_length}
    (Path(model_dir) / MODEL_INFO).write_text(json.dumps(info, indent=2))


def quiet_transformers() -> None:
    """Silence transformers' per-load reports and progress bars; ours say what matters."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class _Predictor:
    runtime = ""

    def __init__(self, model_dir: Path, name: str, threads: int) -> None:
        from transformers import AutoTokenizer

        quiet_transformers()
        info = read_info(model_dir)
        self.name = name
        self.labels: tuple[str, ...] = tuple(info["labels"])
        self.max_length: int = int(info["max_length"])
        self.threads = threads
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    def _forward(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Raw logits in input order, computed in length-sorted chunks."""
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), CHUNK_SIZE):
            idx = order[start : start + CHUNK_SIZE]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="np",
            )
            out[idx] = self._forward(dict(enc))
        return out

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        if not texts:
            return []
        probs = _softmax(self.logits(texts))
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append(
                Prediction(
                    label=self.labels[best],
                    score=float(row[best]),
                    probabilities={lab: float(p) for lab, p in zip(self.labels, row, strict=True)},
                )
            )
        return results


class TorchPredictor(_Predictor):
    """A transformers sequence classifier run by PyTorch in fp32."""

    runtime = RUNTIME_TORCH

    def __init__(self, model_dir: Path, name: str, threads: int) -> None:
        super().__init__(model_dir, name, threads)
        import torch
        from transformers import AutoModelForSequenceClassification

        torch.set_num_threads(threads)
        self._torch = torch
        self.model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()

    def _forward(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            inputs = {k: torch.from_numpy(v) for k, v in encoded.items()}
            return self.model(**inputs).logits.float().numpy()


class OnnxPredictor(_Predictor):
    """An ONNX graph of the classifier run by ONNX Runtime on the CPU."""

    runtime = RUNTIME_ONNX

    def __init__(self, model_dir: Path, name: str, threads: int) -> None:
        super().__init__(model_dir, name, threads)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(Path(model_dir) / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self.session.get_inputs()}

    def _forward(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: v.astype(np.int64) for k, v in encoded.items() if k in self._inputs}
        return self.session.run(None, feed)[0]


RUNTIMES: dict[str, type[_Predictor]] = {
    RUNTIME_TORCH: TorchPredictor,
    RUNTIME_ONNX: OnnxPredictor,
}


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def load_dir(model_dir: Path, name: str | None = None, threads: int | None = None) -> Predictor:
    """A predictor for the model folder, with the runtime `model.json` names."""
    runtime = read_info(model_dir)["runtime"]
    if runtime not in RUNTIMES:
        raise ValueError(f"{model_dir}: unknown runtime {runtime!r}")
    return RUNTIMES[runtime](Path(model_dir), name or Path(model_dir).name, threads or default_threads())


def load(tag: str, threads: int | None = None) -> Predictor:
    """A predictor for a model in the BentoML model store, by tag (`name` or `name:version`)."""
    import bentoml

    model = bentoml.models.get(tag)
    return load_dir(Path(model.path), str(model.tag), threads)
