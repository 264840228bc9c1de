"""Texts for the load generators and the benchmarks, shared by all of them: the model build's
corpus files (var/data, written by `make model`), or a built-in list where there is no corpus."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

# The held-out validation reviews: the load tests' texts.
CORPUS = "var/data/corpus/validation.jsonl"
# Reviews from a source never used in training: the benchmarks' texts.
OUT_OF_SOURCE = "var/data/corpus/out_of_source.jsonl"
# Without the corpus (no `make model` yet).
FALLBACK = (
    "The food was cold and the waiter ignored us all evening.",
    "A warm, funny and beautifully acted film with a great ending.",
    "Delivery took three weeks and the box arrived crushed.",
    "Exactly what I needed, works perfectly and the battery lasts for days.",
    "I want my money back; the screen cracked on the second day.",
    "Friendly staff, clean rooms, and a view worth every penny.",
    "The plot drags, the jokes fall flat, and it is far too long.",
    "Solid build quality; I would buy it again without a second thought.",
)


def load_texts(path: Path, max_chars: int, fallback: Sequence[str] = FALLBACK) -> list[str]:
    """Each text of the JSON-lines file cut to `max_chars`, or `fallback` without the file."""
    if path.exists():
        with path.open(encoding="utf-8") as f:
            texts = [json.loads(line)["text"][:max_chars] for line in f if line.strip()]
        if texts:
            return texts
    return list(fallback)
