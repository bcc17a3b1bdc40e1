#!/usr/bin/env bash
# Make this (Debian bookworm, root) machine able to build and run the images of docker/ with podman, with no
# container registry reachable. Idempotent; each step is skipped when already done. Used by
# tests/test_containers.py (in CI, SEGMASK_REQUIRE_CONTAINERS=1) and usable by hand:
#
#   sudo docker/podman-setup.sh            # podman + config + podman-compose + base image
#
# Steps:
#  1. apt-get install podman buildah runc debootstrap (Debian's podman 4.3).
#  2. /etc/containers/containers.conf: runc with cgroupfs and fixed ulimits (sandboxed CI machines may not raise
#     rlimits, and crun refuses their hybrid cgroup v1 layout), file events logger (no journald). An existing
#     file that does not carry our marker is left alone (say so, and go on).
#  3. podman-compose (PyPI) in its own venv: $SEGMASK_PODMAN_COMPOSE_VENV (default /opt/segmask-podman-compose).
#  4. The base image $SEGMASK_BASE_IMAGE (default localhost/debian:bookworm) from `debootstrap --variant=minbase`
#     and the Debian mirror of this machine's apt sources, imported with `podman import`.
# Prints `podman-compose=<path>` last.
set -euo pipefail

BASE_IMAGE="${SEGMASK_BASE_IMAGE:-localhost/debian:bookworm}"
COMPOSE_VENV="${SEGMASK_PODMAN_COMPOSE_VENV:-/opt/segmask-podman-compose}"
PODMAN_COMPOSE_VERSION="${SEGMASK_PODMAN_COMPOSE_VERSION:-1.6.0}"
MARKER="# written by segmask docker/podman-setup.sh"

log() { printf '[podman-setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    echo "podman-setup.sh: needs root (apt-get, /etc/containers, rootful podman)" >&2
    exit 2
fi

# 1. packages
missing=()
for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -q podman buildah runc debootstrap >/dev/null
fi

# 2. engine configuration
conf=/etc/containers/containers.conf
if [ ! -e "$conf" ] || grep -qF "$MARKER" "$conf"; then
    mkdir -p /etc/containers
    cat >"$conf.tmp" <<CONF
$MARKER
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    if ! cmp -s "$conf.tmp" "$conf" 2>/dev/null; then
        log "writing $conf"
        mv "$conf.tmp" "$conf"
    else
        rm -f "$conf.tmp"
    fi
else
    log "$conf exists and was not written by this script: left as it is"
fi

# 3. podman-compose
if [ ! -x "$COMPOSE_VENV/bin/podman-compose" ]; then
    log "installing podman-compose $PODMAN_COMPOSE_VERSION into $COMPOSE_VENV"
    rm -rf "$COMPOSE_VENV"
    python3 -m venv "$COMPOSE_VENV"
    "$COMPOSE_VENV/bin/pip" install -q --disable-pip-version-check "podman-compose==$PODMAN_COMPOSE_VERSION"
fi

# 4. base image
if ! podman image exists "$BASE_IMAGE"; then
    mirror="$(sed -n -e 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' \
        -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\)[[:space:]]\+bookworm[[:space:]].*/\2/p' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -v -- '-security' | head -n1 || true)"
    mirror="${mirror:-http://deb.debian.org/debian}"
    root="$(mktemp -d /var/tmp/segmask-debootstrap.XXXXXX)"
    trap 'rm -rf "$root"' EXIT
    log "debootstrap bookworm from $mirror (about 30 s)"
    debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
        tail -n 30 "$root.log" >&2
        exit 1
    }
    rm -f "$root.log"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    log "podman import -> $BASE_IMAGE"
    tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
fi

log "ready: $(podman --version), base image $BASE_IMAGE"
echo "podman-compose=$COMPOSE_VENV/bin/podman-compose"
