#!/usr/bin/env bash
# Build the two base images the Dockerfile and docker-compose.yml pull from Docker Hub,
#
#   python:3.11-slim-bookworm   (Dockerfile: FROM python:${PYTHON_VERSION}-slim-bookworm)
#   redis:7.4-alpine            (docker-compose.yml: the redis service)
#
# from Debian packages instead (debootstrap + docker import), for hosts that reach a Debian mirror but no image
# registry (air-gapped clusters, corporate networks). They are tagged with those names, so the Dockerfile and
# compose work unchanged. What differs from the Hub images: Debian's Python 3.11 (/usr/bin/python3, with venv
# and pip) and Debian's Redis 7.0 (a Redis 7.4 feature would be missing; the project needs none), run as the
# user `redis`, protected mode off as in the Hub image (compose keeps Redis on its own network).
#
#   sudo deploy/base-images.sh                 # both images
#   sudo deploy/base-images.sh python          # one of them: python | redis
#
# Needs root, debootstrap (apt-get install debootstrap) and a running Docker engine.
# Settings (environment): DEBIAN_MIRROR (default http://deb.debian.org/debian), DEBIAN_SUITE (bookworm: its
# Python is 3.11, matching the Dockerfile's PYTHON_VERSION), PYTHON_IMAGE, REDIS_IMAGE (the tags to write).
set -euo pipefail

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${DEBIAN_SUITE:-bookworm}
PYTHON_IMAGE=${PYTHON_IMAGE:-python:3.11-slim-bookworm}
REDIS_IMAGE=${REDIS_IMAGE:-redis:7.4-alpine}
DOCKER=${DOCKER:-docker}

command -v debootstrap >/dev/null || { echo "error: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# rootfs DIR PACKAGES: a minimal Debian with PACKAGES, without apt lists, docs or caches.
rootfs() {
    local dir=$1 packages=$2
    debootstrap --variant=minbase --include="$packages" "$SUITE" "$dir" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; echo "error: debootstrap $SUITE from $MIRROR failed" >&2; exit 1; }
    chroot "$dir" apt-get clean
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/* "$dir"/usr/share/doc/* "$dir"/usr/share/man/* \
        "$dir"/var/log/* "$dir"/tmp/*
}

# import DIR TAG CHANGES...: the rootfs as an image (one layer), with Dockerfile instructions as config.
import() {
    local dir=$1 tag=$2
    shift 2
    local changes=()
    for c in "$@"; do changes+=(--change "$c"); done
    tar -C "$dir" --numeric-owner -c . | "$DOCKER" import "${changes[@]}" - "$tag" >/dev/null
    echo "built $tag ($("$DOCKER" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1 / 1e6}'))"
}

python_image() {
    local dir=$work/python
    rootfs "$dir" python3,python3-venv,python3-pip,python-is-python3,ca-certificates
    import "$dir" "$PYTHON_IMAGE" \
        'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'ENV LANG=C.UTF-8' \
        'CMD ["python3"]'
}

redis_image() {
    local dir=$work/redis
    rootfs "$dir" redis-server
    mkdir -p "$dir/data"
    chroot "$dir" chown redis:redis /data
    # The Hub image's entrypoint turns protected mode off (it is built so); do the same, after a config file
    # when the command names one (redis-server wants it first).
    cat >"$dir/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = redis-server ]; then
    shift
    if [ -f "${1:-}" ]; then conf=$1; shift; set -- redis-server "$conf" --protected-mode no "$@"
    else set -- redis-server --protected-mode no "$@"; fi
fi
exec "$@"
EOF
    chmod 755 "$dir/usr/local/bin/docker-entrypoint.sh"
    import "$dir" "$REDIS_IMAGE" \
        'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'WORKDIR /data' 'USER redis' \
        'EXPOSE 6379' 'ENTRYPOINT ["docker-entrypoint.sh"]' 'CMD ["redis-server"]'
}

case "${1:-all}" in
    python) python_image ;;
    redis) redis_image ;;
    all) python_image; redis_image ;;
    *) echo "usage: $0 [python|redis|all]" >&2; exit 2 ;;
esac
