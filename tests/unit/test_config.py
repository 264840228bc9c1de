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
            assert cell.startswith("unset") or "CPUs" in cell, (name, cell)
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


def test_secrets_come_from_files_into_the_urls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """compose and Kubernetes mount secrets as files: the passwords join URLs given without
    them, keys are read as settings, a Kubernetes Secret's upper-case names too."""
    for name in ("REDIS_URL", "REDIS_PASSWORD", "DATABASE_URL", "DATABASE_PASSWORD", "ADMIN_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://sentiment_app@postgres:5432/sentiment")
    (tmp_path / "redis_password").write_text("r/p@ss:word\n")
    (tmp_path / "database_password").write_text("d#1\n")
    (tmp_path / "ADMIN_API_KEY").write_text("k" * 40 + "\n")
    s = Settings(_secrets_dir=tmp_path)
    assert s.redis_url == "redis://:r%2Fp%40ss%3Aword@redis:6379/0"
    assert s.database_url == "postgresql+psycopg://sentiment_app:d%231@postgres:5432/sentiment"
    assert s.admin_api_key is not None and s.admin_api_key.get_secret_value() == "k" * 40
    from sqlalchemy.engine import make_url

    assert make_url(s.database_url).password == "d#1"  # what psycopg is given
    import redis

    pool = redis.Redis.from_url(s.redis_url).connection_pool
    assert pool.connection_kwargs["password"] == "r/p@ss:word"
    monkeypatch.setenv("DATABASE_PASSWORD", "from-env")  # the environment wins over a file
    assert make_url(Settings(_secrets_dir=tmp_path).database_url).password == "from-env"


def test_database_settings_read_the_environment_then_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What the migrations' command reads (storage.migrate), with no service around it."""
    from storage.db import DEFAULT_URL, DatabaseSettings, anchored, with_password

    monkeypatch.setenv("SECRETS_DIR", str(tmp_path))
    for name in ("DATABASE_URL", "DATABASE_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert DatabaseSettings.load().database_url == anchored(DEFAULT_URL)
    (tmp_path / "DATABASE_URL").write_text("postgresql+psycopg://o@db/x\n")
    (tmp_path / "database_password").write_text("pw\n")
    assert DatabaseSettings.load().database_url == "postgresql+psycopg://o:pw@db/x"
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://e@db/x")
    assert DatabaseSettings.load().database_url == "postgresql+psycopg://e:pw@db/x"
    assert with_password("postgresql+psycopg://o:old@db:5432/x", "new") == "postgresql+psycopg://o:new@db:5432/x"
    assert with_password("sqlite:///var/analytics.db", "p") == "sqlite:///var/analytics.db"
    # a user name written percent-encoded stays as written (user@server, as some clouds name them)
    assert with_password("postgresql+psycopg://u%40srv@db/x", "p@") == "postgresql+psycopg://u%40srv:p%40@db/x"
    assert with_password("redis://[::1]:6379/0", "p") == "redis://:p@[::1]:6379/0"
    assert with_password("redis://redis:6379/0", None) == "redis://redis:6379/0"
