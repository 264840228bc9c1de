"""The quick-profile models, built through the real pipeline into a throwaway BentoML store."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import bentoml
import numpy as np
import pytest

from models import data, runtime, store, tokens
from models.build import FP32_NAME, INT8_NAME, build
from models.evaluate import main as evaluate_main
from models.train import TrainConfig

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]

POSITIVE = [
    "I absolutely loved this movie, it was wonderful and moving.",
    "Fantastic service, friendly staff, I will definitely come back!",
    "This is the best purchase I have made all year. Highly recommend.",
]
NEGATIVE = [
    "Terrible film. Boring, far too long and badly acted.",
    "The worst customer service I have ever had, rude and useless.",
    "It broke after two days. Complete waste of money, avoid.",
]


def test_build_stores_both_models_with_metadata(quick_models: list[str]) -> None:
    fp32, int8 = quick_models
    assert fp32.startswith(f"{FP32_NAME}:") and int8.startswith(f"{INT8_NAME}:")
    for tag, kind in ((fp32, runtime.RUNTIME_TORCH), (int8, runtime.RUNTIME_ONNX)):
        model = bentoml.models.get(tag)
        meta = model.info.metadata
        assert model.info.labels["runtime"] == kind
        assert meta["runtime"] == kind
        assert meta["labels"] == ["negative", "positive"]
        assert meta["max_length"] == 64
        assert meta["profile"] == "quick"
        packages = {s["package"]: s["sha256"] for s in meta["data"]["sources"]}
        assert packages == {n: p.sha256 for n, p in data.PACKAGES.items() if n != data.ENCODER_PACKAGE}
        assert meta["data"]["base_encoder"]["sha256"] == data.PACKAGES[data.ENCODER_PACKAGE].sha256
        assert meta["training"]["steps"] == 80
        assert 0.5 < meta["evaluation"]["datasets"]["validation"]["accuracy"] <= 1.0
        assert meta["evaluation"]["batch32_ms"] > 0
        # fitted on the held-out calibration split, recorded with the folder and applied
        assert 0.05 < meta["temperature"] < 20 and meta["temperature"] != 1.0
        assert runtime.load(tag, threads=1).temperature == meta["temperature"]


def test_the_head_is_the_masked_mean_and_cls_folders_still_load(quick_models: list[str], tmp_path: Path) -> None:
    """A text's logits do not depend on the padding beside it (the mean counts its own tokens
    only), and a folder of transformers' [CLS] classifier (own models, 0.2's) loads as that."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from models.classifier import POOLING_KEY, MeanPooledClassifier, load_classifier

    folder = Path(store.path_of(quick_models[0]))
    model = load_classifier(folder).eval()
    assert isinstance(model, MeanPooledClassifier)
    assert json.loads((folder / "config.json").read_text())[POOLING_KEY] == "mean"
    tokenizer = runtime.load_dir(folder, threads=1).tokenizer
    with torch.inference_mode():
        alone = model(**tokenizer(["Dull."], return_tensors="pt")).logits[0]
        padded = model(**tokenizer(["Dull.", runtime.WARM_UP_TEXT], padding=True, return_tensors="pt")).logits[0]
    assert torch.allclose(alone, padded, atol=1e-4)

    cls_folder = tmp_path / "cls"
    BertForSequenceClassification(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(cls_folder)
    assert type(load_classifier(cls_folder)) is BertForSequenceClassification


def test_temperature_changes_scores_not_labels(quick_models: list[str], tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(store.path_of(quick_models[1]), folder)
    texts = [*NEGATIVE, *POSITIVE]
    runtime.set_temperature(folder, 1.0)
    plain = runtime.load_dir(folder, threads=1).predict(texts)
    runtime.set_temperature(folder, 4.0)
    assert runtime.read_info(folder)["temperature"] == 4.0
    softer = runtime.load_dir(folder, threads=1).predict(texts)
    assert [p.label for p in softer] == [p.label for p in plain]
    for a, b in zip(plain, softer, strict=True):
        assert 0.5 <= b.score < a.score
        logit_gap = np.log(a.score / (1 - a.score))
        assert np.log(b.score / (1 - b.score)) == pytest.approx(logit_gap / 4, rel=1e-3)


def test_corpus_manifest_counts(quick_models: list[str]) -> None:
    manifest = store.metadata_of(quick_models[0])["data"]
    splits = manifest["splits"]
    assert 55_000 < sum(splits[s]["total"] for s in ("train", "calibration", "validation")) < 64_000
    assert 1900 <= splits["validation"]["total"] <= 2100
    assert 1900 <= splits["calibration"]["total"] <= 2100
    assert set(splits["calibration"]["by_source"]) <= set(splits["train"]["by_source"])
    assert set(splits["out_of_source"]["by_source"]) == set(data.OUT_OF_SOURCE)
    assert not set(data.OUT_OF_SOURCE) & set(splits["train"]["by_source"])
    # the review sources train the model and have a test split, but stay out of validation
    assert not set(data.REVIEW_SOURCES) & set(splits["validation"]["by_source"])
    assert splits["reviews_test"]["by_source"] == {s: 2 * data.REVIEW_TEST_PER_LABEL for s in data.REVIEW_SOURCES}
    for source, per_label in data.TRAIN_CAPS.items():
        assert splits["train"]["by_source"][source] <= 2 * per_label
    assert manifest["dedupe"]["conflicts"] > 0 and manifest["dedupe"]["duplicates"] > 0


@pytest.mark.parametrize("which", [0, 1], ids=["fp32", "int8"])
def test_runtime_predicts_obvious_texts(quick_models: list[str], which: int) -> None:
    predictor = runtime.load(quick_models[which], threads=1)
    preds = predictor.predict(POSITIVE + NEGATIVE)
    assert [p.label for p in preds] == ["positive"] * 3 + ["negative"] * 3
    for p in preds:
        assert p.score == pytest.approx(p.probabilities[p.label])
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.score >= 0.5


def test_runtime_keeps_input_order_and_truncates_long_texts(quick_models: list[str]) -> None:
    predictor = runtime.load(quick_models[0], threads=1)
    long_positive = "wonderful delightful brilliant " * 400
    texts = [NEGATIVE[0], long_positive, POSITIVE[0]]
    batch = predictor.predict(texts)
    one_by_one = [predictor.predict([t])[0] for t in texts]
    assert [p.label for p in batch] == ["negative", "positive", "positive"]
    for a, b in zip(batch, one_by_one, strict=True):
        assert a.probabilities["positive"] == pytest.approx(b.probabilities["positive"], abs=1e-4)
    assert predictor.predict([]) == []


@pytest.mark.parametrize("which", [0, 1], ids=["fp32", "int8"])
def test_batch_tokenizer_matches_transformers(quick_models: list[str], which: int) -> None:
    """The Rust tokenizer's batch call gives exactly the ids, masks and types of transformers',
    a long text cut to its head and tail as training cut it."""
    predictor = runtime.load(quick_models[which], threads=1)
    assert predictor.head_tokens == TrainConfig().head_tokens < predictor.max_length
    long_text = "dreadful opening " * 100 + "but a wonderful ending"
    texts = [NEGATIVE[0], long_text, "Ünïcödé, emoji 😀 and\ttabs", POSITIVE[0]]
    ours = predictor.encode(texts)
    theirs = predictor.tokenizer(texts, verbose=False)
    assert set(ours) == set(theirs)
    width = predictor.max_length
    for name, values in ours.items():
        pad = predictor.tokenizer.pad_token_id if name == "input_ids" else 0
        cut = [tokens.head_and_tail(v, width, predictor.head_tokens) for v in theirs[name]]
        assert values.tolist() == [v + [pad] * (width - len(v)) for v in cut], name
    assert ours["input_ids"].shape[1] == width  # the long text was cut
    tail = predictor.tokenizer.decode(ours["input_ids"][1][-8:].tolist())
    assert tail.endswith("but a wonderful ending [SEP]")


# Run in a fresh interpreter: what a worker's modules and the fp32 model import, and where its
# weights live.
LOAD_PROBE = """
import json, sys
from pathlib import Path
import service.service  # everything a worker imports before it loads its models
from models import runtime
predictor = runtime.load_dir(Path(sys.argv[1]), threads=1)
predictor.predict(["warm"])
maps = []
for line in open("/proc/self/maps"):
    fields = line.split()
    if fields[-1].endswith(runtime.TORCH_WEIGHTS):
        start, end = (int(x, 16) for x in fields[0].split("-"))
        maps.append((start, end))
params = list(predictor.model.named_parameters())
mapped = [n for n, p in params if any(a <= p.data_ptr() < b for a, b in maps)]
print(json.dumps({"traced": predictor.traced, "params": len(params), "mapped": len(mapped),
                  "transformers": sorted(m for m in sys.modules if m.split(".")[0] == "transformers")}))
"""


def test_fp32_model_is_served_from_its_trace_on_mapped_weights(quick_models: list[str], tmp_path: Path) -> None:
    """Variant B loads from its TorchScript trace and its tokenizer from tokenizer.json: nothing of
    transformers is imported, by the service's modules or the model, and every parameter lies in
    the memory-mapped safetensors file, shared by the workers."""
    folder = store.path_of(quick_models[0])
    assert (folder / runtime.TORCHSCRIPT).is_file()
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}", "SPILL_DIR": str(tmp_path / "spill")}
    command = [sys.executable, "-c", LOAD_PROBE, str(folder)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=PROJECT, env=env)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["traced"] and probe["transformers"] == [], probe
    assert probe["params"] > 50 and probe["mapped"] == probe["params"], probe


def test_trace_gives_the_eager_models_outputs(
    quick_models: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same probabilities, batched and alone, as the model loaded through transformers from
    the same folder without its trace (how a store built before the trace loads)."""
    folder = store.path_of(quick_models[0])
    eager_dir = tmp_path / "eager"
    shutil.copytree(folder, eager_dir, ignore=shutil.ignore_patterns(runtime.TORCHSCRIPT))
    traced = runtime.load_dir(folder, threads=1)
    with caplog.at_level(logging.WARNING, logger="models.runtime"):
        eager = runtime.load_dir(eager_dir, threads=1)
    assert traced.traced and not eager.traced
    assert f"no {runtime.TORCHSCRIPT}, loading through transformers" in caplog.text
    texts = [*POSITIVE, *NEGATIVE, "wonderful delightful brilliant " * 400, "ok"]
    for batch in (texts, texts[:1], texts[-1:]):
        for a, b in zip(traced.predict(batch), eager.predict(batch), strict=True):
            assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)


def test_trace_of_other_weights_stops_the_load(quick_models: list[str], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "changed"
    shutil.copytree(store.path_of(quick_models[0]), copy)
    weights = {k: v.clone() for k, v in load_file(str(copy / runtime.TORCH_WEIGHTS)).items()}
    key = next(k for k in weights if k.startswith("classifier."))
    weights[key] += 1.0
    save_file(weights, str(copy / runtime.TORCH_WEIGHTS))
    with pytest.raises(ValueError, match=f"does not match {runtime.TORCH_WEIGHTS} at {key}"):
        runtime.load_dir(copy, threads=1)


def test_folder_without_a_fast_tokenizer_is_refused_by_name(quick_models: list[str], tmp_path: Path) -> None:
    copy = tmp_path / "no-tokenizer"
    shutil.copytree(store.path_of(quick_models[1]), copy, ignore=shutil.ignore_patterns("tokenizer.json"))
    with pytest.raises(ValueError, match="no tokenizer.json"):
        runtime.load_dir(copy, threads=1)


def test_trace_without_its_input_names_stops_the_load(quick_models: list[str], tmp_path: Path) -> None:
    import torch

    copy = tmp_path / "bare-trace"
    shutil.copytree(store.path_of(quick_models[0]), copy)
    torch.jit.load(str(copy / runtime.TORCHSCRIPT)).save(str(copy / runtime.TORCHSCRIPT))
    with pytest.raises(ValueError, match=f"no {runtime.TRACE_INPUTS}"):
        runtime.load_dir(copy, threads=1)


def test_pad_token_missing_from_the_vocabulary_stops_the_load(quick_models: list[str], tmp_path: Path) -> None:
    copy = tmp_path / "bad-pad"
    shutil.copytree(store.path_of(quick_models[1]), copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "[NO-SUCH-TOKEN]"}))
    with pytest.raises(ValueError, match=r"pad token '\[NO-SUCH-TOKEN\]'"):
        runtime.load_dir(copy, threads=1)


def test_store_round_trip_matches_the_built_folder(quick_models: list[str], tmp_path: Path) -> None:
    folder = store.path_of(quick_models[1])
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    from_store = runtime.load(quick_models[1], threads=1).predict(POSITIVE)
    from_folder = runtime.load_dir(copy, threads=1).predict(POSITIVE)
    assert [p.probabilities for p in from_store] == [p.probabilities for p in from_folder]


def test_failed_save_leaves_the_store_unchanged(quick_models: list[str], tmp_path: Path) -> None:
    before = sorted(str(m.tag) for m in bentoml.models.list())
    good = store.ModelSpec("rollback-check", store.path_of(quick_models[1]))
    broken = store.ModelSpec("rollback-check-2", tmp_path / "no-such-folder")
    with pytest.raises(FileNotFoundError):
        store.save_all([good, broken])
    assert sorted(str(m.tag) for m in bentoml.models.list()) == before


def test_corrupt_download_fails_the_build_and_leaves_the_store_unchanged(
    quick_models: list[str], tmp_path: Path
) -> None:
    before = sorted(str(m.tag) for m in bentoml.models.list())
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    package = data.PACKAGES["vaderSentiment"]
    (downloads / package.filename).write_bytes(b"truncated")
    with pytest.raises(data.DataError, match=package.sha256):
        build("quick", tmp_path, force=True, names=("corrupt-a", "corrupt-b"))
    assert sorted(str(m.tag) for m in bentoml.models.list()) == before


def test_second_build_is_skipped(quick_models: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert build("quick", Path("unused-because-skipped")) == quick_models
    assert "already in the model store" in capsys.readouterr().out


def test_evaluate_cli_writes_report_for_any_jsonl(quick_models: list[str], tmp_path: Path) -> None:
    labeled = tmp_path / "obvious.jsonl"
    data.write_jsonl(
        labeled,
        [data.Example(t, "positive", "obvious") for t in POSITIVE]
        + [data.Example(t, "negative", "obvious") for t in NEGATIVE],
    )
    out = tmp_path / "report.json"
    assert evaluate_main(["--models", *quick_models, "--data", str(labeled), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["models"]) == set(quick_models)
    for m in report["models"].values():
        assert m["datasets"]["obvious"]["examples"] == 6
        assert m["datasets"]["obvious"]["accuracy"] == 1.0
        assert m["batch1_ms"] > 0 and m["batch8_ms"] > 0 and m["batch32_ms"] > 0
