#!/bin/sh
# First start: a cluster with the POSTGRES_USER / POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) /
# POSTGRES_DB of the official image, then the scripts in /docker-entrypoint-initdb.d (compose.yaml mounts
# deploy/postgres/app-role.sh there: the replicas' role); then PostgreSQL in the foreground
# with the arguments given.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
        POSTGRES_PASSWORD="$(cat "$POSTGRES_PASSWORD_FILE")"
    fi
    pwfile="$(mktemp)"
    printf '%s' "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE}" >"$pwfile"
    initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 >/dev/null
    rm -f "$pwfile"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k /run/postgresql" -w start >/dev/null
    export PGHOST=/run/postgresql PGPASSWORD="$POSTGRES_PASSWORD"
    psql -U "$POSTGRES_USER" -d postgres -qc "CREATE DATABASE \"$POSTGRES_DB\""
    for script in /docker-entrypoint-initdb.d/*.sh; do
        [ -e "$script" ] || continue
        echo "running $script"
        sh "$script"
    done
    unset PGHOST PGPASSWORD POSTGRES_PASSWORD
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec postgres -D "$PGDATA" -k /run/postgresql "$@"
