"""The README's "Using your own model" recipe, step by step: a transformers classifier folder of
one's own, `model.json` as documented, saved with the documented call, served by `bentoml serve`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from models import store
from tests.conftest import DATA_DIR
from tests.support.serving import Served

pytestmark = [pytest.mark.slow, pytest.mark.integration]

README = Path(__file__).resolve().parents[2] / "README.md"


def test_a_folder_saved_as_the_readme_says_is_served(
    quick_models: list[str], bentoml_home: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from models.data import prepare

    # A classifier the user trained elsewhere: transformers' own [CLS] head on the base encoder,
    # saved with save_pretrained (weights, config, fast tokenizer), no trace.
    encoder = prepare(DATA_DIR, log=lambda _: None).encoder
    folder = tmp_path / "my-model"
    labels = {0: "negative", 1: "positive"}
    model = AutoModelForSequenceClassification.from_pretrained(
        str(encoder), num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(encoder)).save_pretrained(folder)
    info = {"runtime": "pytorch", "labels": ["negative", "positive"], "max_length": 64, "head_tokens": 16}
    (folder / "model.json").write_text(json.dumps(info))
    # the documented call, as the README writes it
    call = 'store.save_all([store.ModelSpec("my-model", Path("FOLDER"))])'
    assert call in README.read_text()
    (tag,) = store.save_all([store.ModelSpec("my-model", Path(str(folder)))])
    assert tag.startswith("my-model:")

    env = {"BENTOML_HOME": str(bentoml_home), "SENTIMENT_MODEL": tag, "AB_MODEL_B": quick_models[0]}
    with Served(env, tmp_path / "serve.log", workers=1) as served:
        r = httpx.post(f"{served.url}/predict", json={"text": "A fine film."}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == tag and body["label"] in ("negative", "positive")
        assert body["probabilities"]["negative"] + body["probabilities"]["positive"] == pytest.approx(1.0)
        health = httpx.get(f"{served.url}/health", timeout=30).json()
    assert tag in json.dumps(health), health
