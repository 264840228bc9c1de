"""Alembic migrations of the analytics database, run once per deployment.

python -m storage.migrate upgrade [--url URL]     # to the newest schema
python -m storage.migrate downgrade base          # everything removed
python -m storage.migrate check                   # tables.py and the migrations agree
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from storage.db import DEFAULT_URL, DatabaseSettings, anchored, with_password

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head() -> str:
    """The newest revision of the migrations."""
    return str(ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head())


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def check(url: str) -> None:
    """Raise if the models in storage/tables.py differ from the migrated schema."""
    command.check(alembic_config(url))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["upgrade", "downgrade", "check"])
    parser.add_argument("revision", nargs="?", default=None)
    parser.add_argument(
        "--url",
        default=None,
        help=f"database URL (default: $DATABASE_URL or the secret file database_url, else {DEFAULT_URL}, as the"
        " service); its password may come from $DATABASE_PASSWORD or the secret file database_password",
    )
    args = parser.parse_args()
    settings = DatabaseSettings.load()
    password = settings.database_password.get_secret_value() if settings.database_password else None
    url = anchored(with_password(args.url, password)) if args.url else settings.database_url
    if args.action == "upgrade":
        upgrade(url, args.revision or "head")
    elif args.action == "downgrade":
        downgrade(url, args.revision or "base")
    else:
        check(url)
    print(f"{args.action} done on {url.split('@')[-1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
