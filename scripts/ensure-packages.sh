#!/usr/bin/env bash
# Install the given Debian packages unless they are already installed.
#
# Why: project scripts must bring their own tools onto a fresh host; checking with
# dpkg first keeps repeated runs fast and runs `apt-get update` only when needed.
# Usage: scripts/ensure-packages.sh PKG [PKG...]
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 PACKAGE [PACKAGE...]" >&2
    exit 2
fi

missing=()
for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("${pkg}")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if [[ ! -f /etc/debian_version ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-packages: missing ${missing[*]}, and this host is not Debian;" \
        "install them with your system's package manager." >&2
    exit 1
fi
if [[ "$(id -u)" -ne 0 ]]; then
    echo "ensure-packages: missing ${missing[*]}; run as root or install them:" \
        "sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi

echo "ensure-packages: installing ${missing[*]}" >&2
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
