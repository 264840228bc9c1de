"""Alembic migrations of the analytics database, run once per deployment.

python -m storage.migrate upgrade [--url URL]     # to the newest schema
python -m storage.migrate downgrade base          # everything removed
python -m storage.migrate check                   # tables.py and the migrations agree
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError

from storage.db import (
    DEFAULT_URL,
    MIGRATION_CONNECT_ARGS,
    DatabaseSettings,
    anchored,
    ensure_sqlite_folder,
    with_password,
)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
log = logging.getLogger(__name__)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head() -> str:
    """The newest revision of the migrations."""
    return str(ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head())


def current(url: str) -> set[str]:
    """The revisions the database at `url` is at (none before the first migration)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, pool

    url = anchored(url)
    ensure_sqlite_folder(url)
    postgres = url.startswith("postgresql")
    engine = create_engine(url, poolclass=pool.NullPool, connect_args=MIGRATION_CONNECT_ARGS if postgres else {})
    try:
        with engine.connect() as conn:
            return set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()


def unknown(url: str) -> set[str]:
    """The database's revisions this code has no migration for: a newer release migrated it."""
    script = ScriptDirectory.from_config(alembic_config(url))
    known = {r.revision for r in script.walk_revisions()}
    return current(url) - known


def upgrade(url: str, revision: str = "head") -> bool:
    """Migrate the database at `url` to `revision`; False, and nothing done, when it is already
    past this code's newest migration. A pod of the previous release that starts during or
    after a rollout (a rollback, the autoscaler scaling the old ReplicaSet) then serves on the
    newer schema, which migrations only expand (docs/decisions.md), instead of failing to start."""
    if revision == "head" and (newer := unknown(url)):
        log.warning("schema at %s, newer than this code's migrations (head %s): left as it is", newer, head())
        return False
    try:
        command.upgrade(alembic_config(url), revision)
    except CommandError:
        if revision == "head" and (newer := unknown(url)):  # a newer release migrated meanwhile
            log.warning("schema at %s, newer than this code's migrations (head %s): left as it is", newer, head())
            return False
        raise
    return True


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
        if not upgrade(url, args.revision or "head"):
            print(f"schema at {sorted(unknown(url))}, newer than this code's head {head()}: left as it is")
            return 0
    elif args.action == "downgrade":
        downgrade(url, args.revision or "base")
    else:
        check(url)
    print(f"{args.action} done on {url.split('@')[-1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
