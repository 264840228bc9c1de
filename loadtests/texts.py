"""Texts for the load generators: the held-out validation reviews of the model build's corpus
(var/data, written by `make model`), or the caller's fallback list where there is no corpus."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = "var/data/corpus/validation.jsonl"


def load_texts(path: Path, max_chars: int, fallback: list[str]) -> list[str]:
    """Each text of the JSON-lines file cut to `max_chars`, or `fallback` without the file."""
    if path.exists():
        with path.open(encoding="utf-8") as f:
            texts = [json.loads(line)["text"][:max_chars] for line in f if line.strip()]
        if texts:
            return texts
    return fallback
