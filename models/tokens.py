"""A predictor's tokenizing: the model folder's Rust tokenizer (tokenizer.json), a long text cut
at both ends (`head_and_tail`), and the model's inputs packed and padded as numpy arrays."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The model inputs a tokenizer encoding provides, by the attribute holding each.
ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


def head_and_tail(ids: Sequence[int], max_length: int, head: int) -> list[int]:
    """`ids` cut to `max_length` tokens: its first `head` and its last `max_length - head`.

    A long review's verdict is usually at its end; the head keeps [CLS] and the opening, the tail
    the closing sentences and [SEP]. With `head` equal to `max_length` this is a plain cut, with
    the last token ([SEP]) kept."""
    if len(ids) <= max_length:
        return list(ids)
    if head >= max_length:
        return [*ids[: max_length - 1], ids[-1]]
    return [*ids[:head], *ids[len(ids) - (max_length - head) :]]


def quiet_transformers() -> None:
    """Silence transformers' per-load reports and progress bars; ours say what matters."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


class Tokenized:
    """The tokenizer of a model folder, cutting each text to `max_length` tokens (its first
    `head_tokens` and its end) and packing the inputs its model takes (`_take_inputs`)."""

    def __init__(self, model_dir: Path, max_length: int, head_tokens: int) -> None:
        from tokenizers import Tokenizer

        self.model_dir = model_dir
        self.max_length = max_length
        self.head_tokens = head_tokens
        # The Rust tokenizer the folder was saved with (tokenizer.json, which transformers' fast
        # tokenizer loads unchanged), with truncation and padding set once: its batch call skips
        # the wrapper's per-call Python work, and a worker never imports transformers' tokenizer
        # classes (docs/performance.md).
        tokenizer_file = self.model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{self.model_dir}: no tokenizer.json (the fast tokenizer save_pretrained writes)")
        self._rust = Tokenizer.from_file(str(tokenizer_file))
        config = self.model_dir / "tokenizer_config.json"
        pad = json.loads(config.read_text()).get("pad_token") if config.is_file() else None
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = self._rust.token_to_id(pad) if pad else 0  # no pad token: 0, as transformers pads
        if pad_id is None:
            raise ValueError(
                f"{self.model_dir}: the pad token {pad!r} of tokenizer_config.json is not in tokenizer.json"
            )
        self._pad_id = int(pad_id)
        # Encoded whole (a text is at most MAX_TEXT_CHARS), then cut by head_and_tail: the Rust
        # tokenizer's truncation keeps only a head.
        self._rust.no_truncation()
        self._rust.no_padding()
        self._fields: list[tuple[str, str]] = []  # set by the runtime, from the inputs its model takes

    def _take_inputs(self, names: Sequence[str]) -> None:
        """Encode the model inputs `names`, in that order."""
        unknown = [n for n in names if n not in ENCODING_FIELDS]
        if unknown:
            raise ValueError(f"{self.model_dir}: the model takes inputs a tokenizer does not give: {unknown}")
        self._fields = [(n, ENCODING_FIELDS[n]) for n in names]

    def _tokenizer_inputs(self) -> list[str]:
        """The inputs transformers' tokenizer of the folder gives its model, in our order."""
        return [n for n in ENCODING_FIELDS if n in self.tokenizer.model_input_names]

    @functools.cached_property
    def tokenizer(self) -> Any:
        """transformers' tokenizer of the folder, for tools and tests that compare with it. The
        predictor loads it only for a PyTorch model without its trace."""
        from transformers import AutoTokenizer

        quiet_transformers()
        return AutoTokenizer.from_pretrained(str(self.model_dir))

    def _length(self, encoding: Any) -> int:
        return min(len(encoding.ids), self.max_length)

    def _values(self, encoding: Any, attr: str) -> Sequence[int]:
        values = getattr(encoding, attr)
        if len(values) > self.max_length:
            return head_and_tail(values, self.max_length, self.head_tokens)
        return values

    def _pack(self, encodings: Sequence[Any]) -> dict[str, np.ndarray]:
        """The model's inputs for `encodings`, each cut to max_length, padded to the longest."""
        width = max(self._length(e) for e in encodings)
        out = {}
        for name, attr in self._fields:
            array = np.full((len(encodings), width), self._pad_id if name == "input_ids" else 0, dtype=np.int64)
            for row, e in enumerate(encodings):
                values = self._values(e, attr)
                array[row, : len(values)] = values
            out[name] = array
        return out

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids, attention mask and token types of `texts`, padded to the longest."""
        return self._pack(self._rust.encode_batch(list(texts)))
