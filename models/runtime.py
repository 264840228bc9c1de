"""The predictor the service and the evaluation use: tokenize, batch forward, probabilities.

A model folder holds a tokenizer, the weights (PyTorch safetensors or an ONNX graph) and
`model.json` naming its runtime, labels and max length. The same folder is what the BentoML
model store keeps, so a model is evaluated before it is stored through exactly this code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models import cpus
from models.tokens import Tokenized, quiet_transformers

log = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

MODEL_INFO = "model.json"
RUNTIME_TORCH = "pytorch"
RUNTIME_ONNX = "onnxruntime"
TORCH_WEIGHTS = "model.safetensors"
TORCHSCRIPT = "model.torchscript"  # the fp32 classifier's trace (`trace_torch`)
TRACE_PREFIX = "model"  # the traced module's attribute holding the transformers model
TRACE_INPUTS = "inputs.json"  # in the trace: the names of its positional inputs, in order
# Texts are forwarded in groups of at most this many, sorted by token count.
CHUNK_SIZE = 64
# A forward call costs a fixed part plus a part per token of its padded input: the int8 model's
# fixed part is about that of 6 tokens (docs/decisions.md, "Tokenizer and ONNX Runtime
# settings"). A sorted batch is cut where the padding saved pays for one more call.
CALL_COST_TOKENS = 6


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


def write_info(
    model_dir: Path,
    runtime: str,
    labels: Sequence[str],
    max_length: int,
    head_tokens: int | None = None,
    temperature: float | None = None,
) -> None:
    """The folder's model.json; `head_tokens` (how a long text is cut, `head_and_tail`) is
    left out for a plain cut, and `temperature` (what the logits are divided by before the
    softmax, `models.evaluate.fit_temperature`) when it is 1, as folders written before them have it."""
    info: dict[str, Any] = {"runtime": runtime, "labels": list(labels), "max_length": max_length}
    if head_tokens is not None and head_tokens < max_length:
        info["head_tokens"] = head_tokens
    if temperature is not None and temperature != 1.0:
        info["temperature"] = round(float(temperature), 4)
    (Path(model_dir) / MODEL_INFO).write_text(json.dumps(info, indent=2))


def set_temperature(model_dir: Path, temperature: float) -> None:
    """Record a fitted temperature in the folder's model.json, the rest kept."""
    info = read_info(model_dir)
    write_info(model_dir, info["runtime"], info["labels"], info["max_length"], info.get("head_tokens"), temperature)


def plan_chunks(lengths: Sequence[int], call_cost: float, max_size: int) -> list[tuple[int, int]]:
    """[start, end) slices of ascending `lengths` that minimise the total cost of their forward
    calls, each `call_cost` plus its size times its longest length (the padded tokens)."""
    n = len(lengths)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = lengths[end - 1]
        for start in range(max(0, end - max_size), end):
            cost = best[start] + call_cost + (end - start) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    slices = []
    end = n
    while end > 0:
        slices.append((cut[end], end))
        end = cut[end]
    return slices[::-1]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class _Predictor(Tokenized):
    """A model folder's predictor: its tokenizer (models/tokens.py), then the runtime's forward
    calls (`_forward`) in chunks, then probabilities."""

    runtime = ""

    def __init__(self, model_dir: Path, name: str, threads: int) -> None:
        info = read_info(model_dir)
        max_length = int(info["max_length"])
        super().__init__(Path(model_dir), max_length, int(info.get("head_tokens", max_length)))
        self.name = name
        self.labels: tuple[str, ...] = tuple(info["labels"])
        self.temperature: float = float(info.get("temperature", 1.0))
        self.threads = threads

    def _forward(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Raw logits in input order: texts sorted by token count, forwarded in the chunks
        `plan_chunks` cuts, each padded only to its own longest text."""
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        encodings = self._rust.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: self._length(encodings[i]))
        lengths = [self._length(encodings[i]) for i in order]
        for start, end in plan_chunks(lengths, CALL_COST_TOKENS, CHUNK_SIZE):
            idx = order[start:end]
            out[idx] = self._forward(self._pack([encodings[i] for i in idx]))
        return out

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        if not texts:
            return []
        probs = _softmax(self.logits(texts) / self.temperature)
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
    """A transformers sequence classifier run by PyTorch in fp32.

    Served from its TorchScript trace (`TORCHSCRIPT`, written by `trace_torch` when the model is
    built) when the folder has one: the same operations on the same weights, without importing
    transformers' modeling code into every worker, and faster per call at small batches (less
    Python per layer; docs/performance.md). The trace's parameters are then pointed at the
    safetensors weights, memory-mapped, so the workers share one copy from the page cache
    instead of holding one each. A folder
    without a trace (a store built before it) loads through transformers as before.
    """

    runtime = RUNTIME_TORCH

    def __init__(self, model_dir: Path, name: str, threads: int) -> None:
        super().__init__(model_dir, name, threads)
        import torch

        torch.set_num_threads(threads)
        self._torch = torch
        trace = self.model_dir / TORCHSCRIPT
        self.traced = trace.exists()
        self.model: Any
        if self.traced:
            recorded = {TRACE_INPUTS: ""}
            # torch 2.13 warns that TorchScript is deprecated for torch.export, whose loader would
            # import the modules this avoids (docs/performance.md); torch is pinned.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(trace), _extra_files=recorded).eval()
            if not recorded[TRACE_INPUTS]:
                raise ValueError(f"{trace}: no {TRACE_INPUTS} (not written by runtime.trace_torch)")
            self._take_inputs(json.loads(recorded[TRACE_INPUTS]))
            _map_weights(self.model, self.model_dir / TORCH_WEIGHTS)
        else:
            from models.classifier import load_classifier

            log.warning(
                "%s: no %s, loading through transformers (more memory per worker; runtime.trace_torch writes it)",
                self.model_dir,
                TORCHSCRIPT,
            )
            quiet_transformers()
            self.model = load_classifier(model_dir).eval()
            self._take_inputs(self._tokenizer_inputs())

    def _forward(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            if self.traced:
                return self.model(*(torch.from_numpy(encoded[name]) for name, _ in self._fields)).float().numpy()
            inputs = {k: torch.from_numpy(v) for k, v in encoded.items()}
            return self.model(**inputs).logits.float().numpy()


def _map_weights(traced: Any, weights: Path) -> None:
    """Point each parameter of the `traced` module at its tensor in the safetensors file
    `weights`, which safetensors maps into memory (read-only pages of the page cache: one copy
    for every process). The trace's own copy is freed. A weight that differs from the trace's
    (a trace left from other weights) stops the load."""
    import torch
    from safetensors.torch import load_file

    if not weights.is_file():
        raise ValueError(f"{weights.parent}: {TORCHSCRIPT} without the weights file {weights.name}")
    mapped = load_file(str(weights))
    for name, param in traced.named_parameters():
        key = name.removeprefix(f"{TRACE_PREFIX}.")
        tensor = mapped.get(key)
        if tensor is None or not torch.equal(tensor, param.data):
            raise ValueError(f"{weights.parent}: {TORCHSCRIPT} does not match {weights.name} at {key}")
        param.data = tensor


def trace_torch(model_dir: Path) -> Path:
    """Write the TorchScript trace of the folder's classifier (its logits) beside its weights,
    checked against the eager model on a batch of another shape than the one traced."""
    import torch

    from models.classifier import load_classifier

    quiet_transformers()
    model = load_classifier(model_dir).eval()
    encoder = _Predictor(Path(model_dir), "trace", 1)
    names = encoder._tokenizer_inputs()
    encoder._take_inputs(names)

    def logits(inputs: tuple[Any, ...]) -> Any:
        return model(**dict(zip(names, inputs, strict=True))).logits

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            setattr(self, TRACE_PREFIX, model)

        def forward(self, *inputs: Any) -> Any:
            return logits(inputs)

    def example(texts: list[str]) -> tuple[Any, ...]:
        encoded = encoder.encode(texts)
        return tuple(torch.from_numpy(encoded[name]) for name in names)

    # Texts of different lengths, so the batch is padded and the attention mask's path is traced.
    traced_on = example([WARM_UP_TEXT, "Dull.", "Not bad at all, I would watch it again."])
    # The tracer warns of the Python branches in transformers' masking code; they take the same
    # way for every unpadded or padded batch without a cache, which the checks below confirm on
    # shapes other than the traced one: one text alone (no padding) and a padded pair.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(Logits().eval(), traced_on)
        for texts in (["Awful"], ["Awful", f"{WARM_UP_TEXT} {WARM_UP_TEXT}"]):
            inputs = example(texts)
            expected, got = logits(inputs), traced(*inputs)
            if not torch.allclose(expected, got, atol=1e-5):
                gap = float((expected - got).abs().max())
                raise ValueError(f"{model_dir}: the TorchScript trace differs from the model by {gap} on {texts}")
    path = Path(model_dir) / TORCHSCRIPT
    traced.save(str(path), _extra_files={TRACE_INPUTS: json.dumps(names)})
    return path


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
        # With more than one intra-op thread, idle pool threads spin by default: CPU the event
        # loop of a loaded worker needs (docs/performance.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(Path(model_dir) / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self._take_inputs([i.name for i in self.session.get_inputs()])

    def _forward(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, encoded)[0]


RUNTIMES: dict[str, type[_Predictor]] = {
    RUNTIME_TORCH: TorchPredictor,
    RUNTIME_ONNX: OnnxPredictor,
}


WARM_UP_TEXT = "A film worth seeing: the story holds from the first scene to the last, and the actors care."


def warm_up(predictor: Predictor, max_batch: int) -> None:
    """A few forward calls at the batch sizes a worker meets (1, 8 and `max_batch` texts): the
    first calls of a fresh session allocate and plan, and are slower than every call after."""
    for size in sorted({1, min(8, max_batch), max_batch}):
        predictor.predict([WARM_UP_TEXT] * size)


def default_threads() -> int:
    return cpus.available().cpus


def load_dir(model_dir: Path, name: str | None = None, threads: int | None = None) -> _Predictor:
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
