"""Evaluation maths and report shape, on a predictor with fixed outputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from models.data import Example
from models.evaluate import expected_calibration_error, fit_temperature, score, table
from models.runtime import Prediction


class FixedPredictor:
    """Answers from a lookup table: a stand-in for a model, so the scoring maths can be checked."""

    name = "fixed"
    runtime = "table"
    labels = ("negative", "positive")
    max_length = 8

    def __init__(self, answers: dict[str, tuple[str, float]]) -> None:
        self.answers = answers

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        out = []
        for t in texts:
            label, p = self.answers[t]
            other = 1 - p
            probs = {"positive": p, "negative": other} if label == "positive" else {"negative": p, "positive": other}
            out.append(Prediction(label, p, probs))
        return out


def test_ece_of_perfectly_calibrated_and_overconfident_predictions() -> None:
    assert expected_calibration_error([0.75] * 4, [True, True, True, False]) == pytest.approx(0.0)
    assert expected_calibration_error([1.0, 1.0], [True, False]) == pytest.approx(0.5)
    assert expected_calibration_error([], []) == 0.0


def test_score_counts_accuracy_per_source_and_confusion() -> None:
    examples = [
        Example("a", "positive", "s1"),
        Example("b", "negative", "s1"),
        Example("c", "negative", "s2"),
        Example("d", "positive", "s2"),
    ]
    predictor = FixedPredictor(
        {"a": ("positive", 0.9), "b": ("negative", 0.8), "c": ("positive", 0.6), "d": ("positive", 0.7)}
    )
    result = score(predictor, examples)
    assert result["accuracy"] == 0.75
    assert result["by_source"] == {
        "s1": {"examples": 2, "accuracy": 1.0},
        "s2": {"examples": 2, "accuracy": 0.5},
    }
    assert result["by_length"] == {"1-10 words": {"examples": 4, "accuracy": 0.75}}
    assert result["confusion"] == {
        "negative": {"negative": 1, "positive": 1},
        "positive": {"negative": 0, "positive": 2},
    }


def test_table_lists_every_model_and_dataset() -> None:
    result = {
        "models": {
            name: {
                "runtime": "x",
                "batch1_ms": 1.5,
                "batch8_ms": 6.5,
                "batch32_ms": 20.25,
                "datasets": {
                    ds: {
                        "examples": 10,
                        "accuracy": 0.9,
                        "ece": 0.05,
                        "by_source": {"s": {"examples": 10, "accuracy": 0.9}},
                        "by_length": {"1-10 words": {"examples": 10, "accuracy": 0.9}},
                    }
                    for ds in ("validation", "other")
                },
            }
            for name in ("m1", "m2")
        }
    }
    text = table(result)
    rows = [line for line in text.splitlines() if line.startswith(("m1", "m2"))]
    assert len(rows) == 4
    assert "90.00" in rows[0] and "20.2" in rows[0]
    assert "m2 / other: s 90.0 (n=10)" in text
    assert "m1 / validation: 1-10 words 90.0 (n=10)" in text


def test_length_buckets_bound_by_words() -> None:
    from models.evaluate import length_bucket

    assert length_bucket("one") == "1-10 words"
    assert length_bucket(" ".join(["w"] * 10)) == "1-10 words"
    assert length_bucket(" ".join(["w"] * 11)) == "11-20 words"
    assert length_bucket(" ".join(["w"] * 40)) == "21-40 words"
    assert length_bucket(" ".join(["w"] * 41)) == "over 40 words"


def test_metadata_is_made_storable() -> None:
    from models.store import storable

    cfg = {"max_steps": None, "epochs": 1.0, "nested": {"a": None, "b": [1, None, {"c": None}]}}
    assert storable(cfg) == {"epochs": 1.0, "nested": {"b": [1, {}]}}


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 3.0])
def test_fit_temperature_recovers_how_far_logits_were_scaled(true_temperature: float) -> None:
    """Labels drawn from softmax(z), logits shown as z * T: the fit finds T again, and the
    ranking (every label) is the same after dividing by it."""
    rng = np.random.default_rng(7)
    z = rng.normal(0, 2.5, size=(20_000, 2))
    p_positive = 1 / (1 + np.exp(z[:, 0] - z[:, 1]))
    labels = (rng.random(len(z)) < p_positive).astype(int)
    fitted = fit_temperature(z * true_temperature, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.06)
    assert ((z * true_temperature / fitted).argmax(1) == z.argmax(1)).all()
