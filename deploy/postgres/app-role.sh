#!/bin/sh
# The replicas' PostgreSQL role, sentiment_app: it may connect, read and write the analytics rows
# (tables and sequences the migrations create later included), and nothing else: no DDL, no
# temporary tables, no superuser. The database's owner ($POSTGRES_USER, `sentiment`) runs the
# migrations. Safe to run again: it sets the password and grants what is missing.
#
# Run by the postgres image from /docker-entrypoint-initdb.d when the data directory is created
# (compose.yaml, the password in POSTGRES_APP_PASSWORD_FILE), and by
# deploy/airgap/postgres-entrypoint.sh. Against a database of your own:
#   POSTGRES_USER=sentiment POSTGRES_DB=sentiment POSTGRES_APP_PASSWORD=... \
#   PGHOST=... PGPASSWORD=<the owner's password> sh deploy/postgres/app-role.sh
#
# No `set -u`, no `exit`: the postgres image sources a script it cannot execute.
set -e
if [ -n "${POSTGRES_APP_PASSWORD_FILE:-}" ]; then
    POSTGRES_APP_PASSWORD="$(cat "$POSTGRES_APP_PASSWORD_FILE")"
fi
psql -v ON_ERROR_STOP=1 -X -q \
    --username "${POSTGRES_USER:?}" --dbname "${POSTGRES_DB:?}" \
    -v owner="$POSTGRES_USER" -v db="$POSTGRES_DB" \
    -v app_password="${POSTGRES_APP_PASSWORD:?set POSTGRES_APP_PASSWORD or POSTGRES_APP_PASSWORD_FILE, the password of the role sentiment_app}" <<'SQL'
SELECT 'CREATE ROLE sentiment_app' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sentiment_app') \gexec
ALTER ROLE sentiment_app WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'app_password';
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO sentiment_app;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO sentiment_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO sentiment_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO sentiment_app;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO sentiment_app;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO sentiment_app;
SQL
