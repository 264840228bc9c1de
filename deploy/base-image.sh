#!/usr/bin/env bash
# A Python 3.11 base image built from Debian packages, standing in for the registry's
# python:3.11-slim where no registry can be reached (an air-gapped builder with a Debian
# mirror and a PyPI mirror). `make image` uses it when BASE_IMAGE names it; elsewhere the
# standard base is used.
#
#   deploy/base-image.sh [name:tag]          default sentiment-base:bookworm
#   EXTRA_CA_BUNDLE=/path/ca.pem deploy/base-image.sh   also trust this CA inside the image
#
# Needs root, debootstrap and a running Docker engine.
set -euo pipefail

name="${1:-sentiment-base:bookworm}"
mirror="${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}"
mirror="${mirror:-$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null)}"
if [ -z "$mirror" ]; then
    echo "no Debian mirror found: set DEBIAN_MIRROR" >&2
    exit 2
fi

if docker image inspect "$name" >/dev/null 2>&1 && [ -z "${REBUILD:-}" ]; then
    echo "$name exists (REBUILD=1 rebuilds)"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "debootstrap bookworm from $mirror ..."
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,curl \
    bookworm "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -20 "$work/debootstrap.log" >&2
    exit 1
}
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar -C "$work/root" -c . | docker import - "$name-rootfs" >/dev/null

mkdir -p "$work/ctx"
cp /etc/ssl/certs/ca-certificates.crt "$work/ctx/host-ca.crt"
if [ -n "${EXTRA_CA_BUNDLE:-}" ]; then
    cat "$EXTRA_CA_BUNDLE" >>"$work/ctx/host-ca.crt"
fi
cat >"$work/ctx/Dockerfile" <<DOCKERFILE
FROM $name-rootfs
# BentoML's Dockerfile installs uv with the system pip, which Debian's PEP 668 marker refuses.
RUN rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED && ln -sf /usr/bin/python3 /usr/local/bin/python
# Downloads made while building on top of this image trust the same CAs as this builder.
COPY host-ca.crt /etc/ssl/certs/build-ca.crt
ENV SSL_CERT_FILE=/etc/ssl/certs/build-ca.crt \\
    PIP_CERT=/etc/ssl/certs/build-ca.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/build-ca.crt \\
    UV_NATIVE_TLS=1 \\
    LANG=C.UTF-8
DOCKERFILE
DOCKER_BUILDKIT=0 docker build --network host -q -t "$name" "$work/ctx" >/dev/null
docker rmi "$name-rootfs" >/dev/null
echo "built $name ($(docker image inspect -f '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}'))"
