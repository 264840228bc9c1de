#!/bin/sh
# The compose stack's secrets, one random value per file, in DIR (default ./secrets):
#   deploy/secrets.sh [DIR]
# The folder is the owner's only (0700); the files are readable (0644) because compose without
# Swarm bind-mounts each as it is, and the services read them as their own users. An existing
# file is kept: run it again after deleting one to rotate that secret (then recreate the stack;
# PostgreSQL's roles keep their passwords until changed with ALTER ROLE).
set -eu
dir="${1:-secrets}"
mkdir -p "$dir"
chmod 0700 "$dir"
umask 022
for name in redis_password postgres_password postgres_app_password admin_api_key grafana_admin_password; do
    if [ ! -s "$dir/$name" ]; then
        openssl rand -hex 32 >"$dir/$name"
        echo "wrote $dir/$name"
    fi
    chmod 0644 "$dir/$name"
done
