#!/bin/sh
# Start sshd and keep the machine up. Runs as root, must be quick: a machine is expected
# to be usable within ~100 ms of `docker run`.
set -eu

# Without the engine's --init we are PID 1: let tini reap zombies and forward signals.
if [ "$$" = 1 ]; then
    exec /usr/bin/tini -- "$0" "$@"
fi

[ -d /run/sshd ] || install -d -m 0755 /run/sshd

# A fresh named volume inherits /workspace's owner from the image; bind mounts and old
# volumes may not. Chown only when needed: a recursive chown of a big tree is slow.
if [ "$(stat -c %u /workspace)" != 1000 ]; then
    chown runner:runner /workspace
fi

rm -f /run/sshd.pid /run/shopfloor-ready
/usr/sbin/sshd -D -e &
sshd_pid=$!
trap 'kill -TERM "$sshd_pid" 2>/dev/null; exit 0' TERM INT HUP

# sshd writes its pid file once it listens; then the machine is ready.
i=0
while [ ! -s /run/sshd.pid ]; do
    if ! kill -0 "$sshd_pid" 2>/dev/null; then
        echo "shopfloor-entrypoint: sshd exited during start-up" >&2
        wait "$sshd_pid" || exit $?
        exit 1
    fi
    i=$((i + 1))
    if [ "$i" -gt 1000 ]; then
        echo "shopfloor-entrypoint: sshd did not start within 10 s" >&2
        exit 1
    fi
    sleep 0.01
done
: >/run/shopfloor-ready

# Commands in the machine do not depend on sshd (they come through the engine), so
# wait for it but stay up if it dies: an engine exec still works, and the controller
# notices the missing forwarding on its own.
wait "$sshd_pid" || echo "shopfloor-entrypoint: sshd exited with $?" >&2
exec sleep infinity
