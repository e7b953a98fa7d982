#!/usr/bin/env bash
# Make sure a Docker Engine answers on this host.
#
# Why: a fresh Debian host has the `docker` client at most, no daemon and no socket.
# On Debian as root we install docker.io and start dockerd ourselves (nothing set up by
# hand survives onto a new machine or into CI); anywhere else we say what to do and fail.
set -euo pipefail

LOG=/var/log/shopfloor-dockerd.log
WAIT_S=${SHOPFLOOR_ENGINE_WAIT_S:-60}

engine_answers() {
    command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

if engine_answers; then
    exit 0
fi

if [[ -n "${DOCKER_HOST:-}" && "${DOCKER_HOST}" != unix:///var/run/docker.sock && "${DOCKER_HOST}" != unix:///run/docker.sock ]]; then
    echo "ensure-engine: DOCKER_HOST=${DOCKER_HOST} does not answer 'docker info';" \
        "start that engine or unset DOCKER_HOST to use a local one." >&2
    exit 1
fi

if [[ ! -f /etc/debian_version || "$(id -u)" -ne 0 ]]; then
    echo "ensure-engine: no Docker Engine answers 'docker info'." >&2
    echo "  Install Docker Engine (https://docs.docker.com/engine/install/) and start it," >&2
    echo "  and make sure this user may use it (e.g. member of the 'docker' group)." >&2
    echo "  (Automatic setup only runs as root on Debian.)" >&2
    exit 1
fi

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    echo "ensure-engine: installing docker.io" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io
fi

start_dockerd() {
    echo "ensure-engine: starting dockerd (log: ${LOG})" >&2
    nohup dockerd >"${LOG}" 2>&1 &
}

# A dockerd that is already starting (or a systemd-managed one) only needs waiting for;
# a second one would fail on the pid file. One that is shutting down is started again
# once it has gone.
if pgrep -x dockerd >/dev/null 2>&1; then
    echo "ensure-engine: dockerd is running but not answering yet; waiting" >&2
else
    start_dockerd
fi

for ((i = 0; i < WAIT_S * 2; i++)); do
    if docker info >/dev/null 2>&1; then
        echo "ensure-engine: engine is up" >&2
        exit 0
    fi
    if ! pgrep -x dockerd >/dev/null 2>&1; then
        start_dockerd
    fi
    sleep 0.5
done

echo "ensure-engine: dockerd did not answer within ${WAIT_S}s; last lines of ${LOG}:" >&2
tail -n 40 "${LOG}" >&2 2>/dev/null || true
exit 1
