"""Settings: defaults from the contract, parsing, and the README's table kept in step."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import PROJECT_ROOT, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    s = Settings()
    assert s.redis_url is None
    # var/analytics.db of the project, wherever the process starts (BentoML's parent and workers)
    assert s.database_url == f"sqlite:///{PROJECT_ROOT / 'var' / 'analytics.db'}"
    assert s.spill_dir == str(PROJECT_ROOT / "var" / "spill")
    assert s.sentiment_model == "sentiment-minilm-int8:latest"
    assert s.ab_model_b == "sentiment-minilm:latest"
    assert s.ab_split == 0.5
    assert s.cache_ttl_seconds == 86400
    assert (s.rate_limit_predict, s.rate_limit_batch) == ("100/minute", "20/minute")
    assert (s.max_text_chars, s.max_batch_size, s.max_body_bytes) == (5000, 64, 1_048_576)
    assert s.trusted_proxies == [] and s.admin_api_key is None and s.store_text is False
    assert s.torch_num_interop_threads == 1


def test_environment_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")
    monkeypatch.setenv("SERVICE_WORKERS", "2")
    monkeypatch.setenv("STORE_TEXT", "true")
    monkeypatch.delenv("TORCH_NUM_THREADS", raising=False)
    s = Settings()
    assert s.trusted_proxies == ["10.0.0.0/8", "127.0.0.1"]
    assert s.store_text is True
    assert s.threads_per_worker >= 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AB_SPLIT", "1.5"),
        ("TRUSTED_PROXIES", "not-an-ip"),
        ("MAX_BATCH_SIZE", "0"),
        ("ADMIN_API_KEY", "s3cret"),  # too short to resist guessing
        ("ADMIN_API_KEY", "change-me-change-me-change-me-change-me"),  # an example's placeholder
        ("SPILL_MAX_BYTES", "0"),
    ],
)
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def _shown(value: object) -> str:
    """A default as the README writes it: `true`, `2`, `var/spill`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_readme_documents_every_setting_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    readme = readme[readme.index("### The service") : readme.index("### Make variables")]
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]*) \|", readme, flags=re.M))
    assert set(rows) == {name.upper() for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        cell, default = rows[name.upper()], field.default
        if default is None:  # unset, or computed from the machine
            assert cell.startswith("unset") or "cores" in cell, (name, cell)
        elif default == []:
            assert cell.startswith("empty"), (name, cell)
        else:
            assert cell.startswith(f"`{_shown(default)}`"), (name, cell, default)


def test_a_strong_admin_key_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "9f2c" * 8
    monkeypatch.setenv("ADMIN_API_KEY", key)
    value = Settings().admin_api_key
    assert value is not None and value.get_secret_value() == key


def test_the_published_text_pattern_accepts_exactly_the_texts_the_service_takes() -> None:
    """A schema-valid text must never be refused as blank (nor a refused one be schema-valid):
    every code point alone, against check_text's rule (not NUL, not blank once stripped)."""
    from service.schemas import TEXT_SCHEMA

    pattern = re.compile(TEXT_SCHEMA["pattern"])
    disagree = [
        hex(i)
        for i in range(0x110000)
        if not 0xD800 <= i < 0xE000 and bool(pattern.fullmatch(chr(i))) != bool(i and chr(i).strip())
    ]
    assert disagree == []
    assert pattern.fullmatch(" \x1f a \x85") and not pattern.fullmatch(" \x1f\t\x85\u3000")


@pytest.mark.parametrize("name", ["ADMIN_API_KEY", "REQUEST_ID_KEY"])
@pytest.mark.parametrize("key", ["short-key", "change-me-" + "x" * 40])
def test_guessable_keys_are_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, key: str) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv(name, key)
    with pytest.raises(ValidationError, match=name):
        Settings()
