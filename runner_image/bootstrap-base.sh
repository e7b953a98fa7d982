#!/usr/bin/env bash
# Build a local Debian bookworm base image when the public one cannot be pulled.
#
# Why: hosts without a reachable container registry cannot `FROM debian:bookworm-slim`,
# but they do reach a Debian package mirror. debootstrap makes a minimal root file system
# from that mirror (about a minute) and `docker import` turns it into an image that the
# runner Dockerfile can use as its BASE. Users with a registry never run this.
#
# Env: SHOPFLOOR_DEBIAN_MIRROR          mirror for bookworm (default: the host's apt mirror,
#                                      else http://deb.debian.org/debian)
#      SHOPFLOOR_DEBIAN_SECURITY_MIRROR mirror for bookworm-security
#      SHOPFLOOR_LOCAL_BASE             tag to create (default shopfloor/base:bookworm)
set -euo pipefail

TAG=${SHOPFLOOR_LOCAL_BASE:-shopfloor/base:bookworm}
SUITE=bookworm
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ENSURE_PACKAGES="${HERE}/../scripts/ensure-packages.sh"

log() { echo "bootstrap-base: $*" >&2; }

if docker image inspect "${TAG}" >/dev/null 2>&1; then
    log "${TAG} already exists; nothing to do"
    exit 0
fi

# The first http(s) URI of a Debian archive (not debian-security) in the host's apt
# sources, so a host configured for a local mirror keeps using it.
host_mirror() {
    local files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f "${f}" ]] && files+=("${f}")
    done
    [[ ${#files[@]} -gt 0 ]] || return 0
    awk '
        /^[[:space:]]*#/ { next }
        /^deb[[:space:]]/ {
            for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; break }
            next
        }
        /^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) print $i }
    ' "${files[@]}" | grep -E '/debian/?$' | head -n 1 | sed 's:/*$::' || true
}

MIRROR=${SHOPFLOOR_DEBIAN_MIRROR:-$(host_mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SHOPFLOOR_DEBIAN_SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}

if [[ "$(id -u)" -ne 0 ]]; then
    log "debootstrap needs root; run this script as root, or make ${TAG} (or debian:bookworm-slim) available to the engine"
    exit 1
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    if [[ -x "${ENSURE_PACKAGES}" ]]; then
        "${ENSURE_PACKAGES}" debootstrap
    else
        log "debootstrap is missing; install it (apt-get install debootstrap)"
        exit 1
    fi
fi

ROOTFS=$(mktemp -d /var/tmp/shopfloor-rootfs.XXXXXX)
cleanup() {
    # debootstrap mounts /proc and /sys inside the target and may leave them on failure.
    local m
    { grep -o " ${ROOTFS}/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do
        umount -l "${m}" 2>/dev/null || true
    done
    rm -rf --one-file-system "${ROOTFS}" || true
}
trap cleanup EXIT

log "debootstrap ${SUITE} from ${MIRROR} (about a minute)"
start=$(date +%s)
debootstrap --variant=minbase --include=ca-certificates "${SUITE}" "${ROOTFS}" "${MIRROR}" \
    >"${ROOTFS}.log" 2>&1 || {
    log "debootstrap failed; last lines of its log:"
    tail -n 30 "${ROOTFS}.log" >&2
    [[ -f "${ROOTFS}/debootstrap/debootstrap.log" ]] && tail -n 30 "${ROOTFS}/debootstrap/debootstrap.log" >&2
    rm -f "${ROOTFS}.log"
    exit 1
}
rm -f "${ROOTFS}.log"

# Same apt sources and slimming as the public bookworm-slim image: updates and security
# suites, no docs/man/locales from later installs, no package lists or caches kept.
rm -f "${ROOTFS}/etc/apt/sources.list"
cat >"${ROOTFS}/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: ${MIRROR}
Suites: ${SUITE} ${SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${SECURITY_MIRROR}
Suites: ${SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
cat >"${ROOTFS}/etc/dpkg/dpkg.cfg.d/docker" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
DPKG
cat >"${ROOTFS}/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::GzipIndexes "true";
Acquire::GzipIndexes::CompressionTypes::Order:: "gz";
APT
cat >"${ROOTFS}/etc/apt/apt.conf.d/docker-no-languages" <<'APT'
Acquire::Languages "none";
APT
find "${ROOTFS}/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
rm -rf "${ROOTFS}"/usr/share/{man,info,groff,lintian,linda,locale}/* \
    "${ROOTFS}"/var/lib/apt/lists/* "${ROOTFS}"/var/cache/apt/*.bin \
    "${ROOTFS}"/var/cache/apt/archives/*.deb "${ROOTFS}"/var/log/*.log \
    "${ROOTFS}"/tmp/* "${ROOTFS}"/debootstrap
# A host-specific resolver or hostname must not leak into the image; the engine sets both.
: >"${ROOTFS}/etc/resolv.conf"
: >"${ROOTFS}/etc/hostname"

log "importing as ${TAG}"
tar --numeric-owner -C "${ROOTFS}" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase ${SUITE} ${MIRROR}" \
    - "${TAG}" >/dev/null
log "built ${TAG} in $(($(date +%s) - start))s"
