"""Test hosts: Docker engines nested in containers of the host's own engine.

This machine has one engine and no other hosts, so the fleet's tests (and ``bench/hosts.py``)
make their own: containers of a local image (the Debian base plus ``docker.io`` and
``iptables``) each running ``dockerd`` on a unix socket bind-mounted to a host folder, with
the options /work/shared/ENGINE.md found to work without ``--privileged`` (which fails here:
the host's bounding set lacks CAP_SYS_RESOURCE). The controller reaches each as
``unix://<folder>/docker.sock``: no network between them. Everything made carries the
caller's labels and is removed by :meth:`NestedHosts.close`, even after a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

BASE_IMAGE = "shopfloor/base:bookworm"
"""The local Debian base ``runner_image/bootstrap-base.sh`` makes (see services/images.py)."""
DOCKERFILE = f"""\
FROM {BASE_IMAGE}
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
      docker.io iptables ca-certificates openssh-server \\
 && rm -rf /var/lib/apt/lists/*
"""
IMAGE_REPO = "shopfloor/testhost"
SOCKET_DIR = "/run/dockerhost"
ENGINE_ARGV = [
    "dockerd",
    "-H",
    f"unix://{SOCKET_DIR}/docker.sock",
    "-H",
    "unix:///var/run/docker.sock",  # where `docker system dial-stdio` looks (ssh:// hosts)
    "--bridge=none",
    "--iptables=false",
]


def image_tag() -> str:
    """Tagged by a hash of its Dockerfile: built once per engine, rebuilt when it changes."""
    return f"{IMAGE_REPO}:{hashlib.sha256(DOCKERFILE.encode()).hexdigest()[:12]}"


def ensure_image(client: docker.DockerClient) -> str:
    tag = image_tag()
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    client.images.get(BASE_IMAGE)  # raises: build the runner image first (shopfloor image build)
    dockerfile = io.BytesIO(DOCKERFILE.encode())
    client.images.build(fileobj=dockerfile, tag=tag, rm=True, forcerm=True, timeout=1800)
    return tag


@dataclass
class NestedHost:
    name: str
    container: str
    volume: str
    folder: Path

    @property
    def url(self) -> str:
        return f"unix://{self.folder}/docker.sock"

    def client(self, timeout: int = 60) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=timeout)


class NestedHosts:
    """``count`` nested engines, started at once and each waited for until it answers."""

    def __init__(self, labels: dict[str, str], *, prefix: str = "sf-host") -> None:
        self.labels = dict(labels)
        self.prefix = prefix
        self.client = docker.from_env(timeout=300)
        self.root = Path(tempfile.mkdtemp(prefix="sfh-", dir="/tmp"))  # short: socket paths
        self.hosts: list[NestedHost] = []

    def start(self, count: int, timeout_s: float = 120, *, ssh: bool = False) -> list[NestedHost]:
        """``ssh``: on the outer engine's bridge with port 22 published on 127.0.0.1 (see
        :meth:`enable_ssh`); otherwise no network at all."""
        tag = ensure_image(self.client)
        started = [self._start_one(tag, len(self.hosts) + i, ssh) for i in range(count)]
        self.hosts.extend(started)
        deadline = time.monotonic() + timeout_s
        for host in started:
            self._wait(host, deadline)
        return started

    def _start_one(self, tag: str, index: int, ssh: bool) -> NestedHost:
        suffix = self.labels.get("shopfloor.test", "") or str(id(self))
        name = f"{self.prefix}{index}-{suffix}"[:60]
        folder = self.root / f"h{index}"
        folder.mkdir()
        volume = self.client.volumes.create(name=f"{name}-lib", labels=self.labels)
        host = NestedHost(name=f"h{index}", container=name, volume=volume.name, folder=folder)
        # The CLI, not the SDK: ``systempaths=unconfined`` is the CLI's (it empties the
        # engine's masked and read-only paths), which the SDK does not offer.
        labels = {**self.labels, "shopfloor.testhost": host.name}
        argv = ["docker", "run", "--detach", "--name", name]
        argv += ["--publish", "127.0.0.1::22"] if ssh else ["--network", "none"]
        argv += [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]
        argv += [
            "--cap-add",
            "ALL",
            "--cap-drop",
            "SYS_RESOURCE",
            "--security-opt",
            "seccomp=unconfined",
            "--security-opt",
            "apparmor=unconfined",
            "--security-opt",
            "systempaths=unconfined",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            "-v",
            f"{volume.name}:/var/lib/docker",
            "-v",
            f"{folder}:{SOCKET_DIR}",
            tag,
            *ENGINE_ARGV,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"cannot start test host {name}: {done.stderr.strip()}")
        return host

    def _wait(self, host: NestedHost, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            if (host.folder / "docker.sock").exists():
                try:
                    with contextlib.closing(host.client(timeout=5)) as engine:
                        engine.ping()
                        return
                except docker.errors.DockerException as exc:
                    last = exc
            state = self.client.containers.get(host.container).status
            if state not in ("created", "running"):
                logs = self.client.containers.get(host.container).logs(tail=30).decode()
                raise RuntimeError(f"test host {host.name} exited ({state}):\n{logs}")
            time.sleep(0.2)
        raise RuntimeError(f"test host {host.name} did not answer in time: {last}")

    def enable_ssh(self, host: NestedHost, public_key: str) -> tuple[int, str]:
        """Start sshd in the host (root logs in with ``public_key``); answer the port published
        on 127.0.0.1 and the host's ``known_hosts`` line for it."""
        script = (
            "set -e; mkdir -p /run/sshd /root/.ssh; ssh-keygen -A >/dev/null; "
            'printf "%s\\n" "$KEY" > /root/.ssh/authorized_keys; '
            "chmod 700 /root/.ssh; chmod 600 /root/.ssh/authorized_keys; /usr/sbin/sshd"
        )
        subprocess.run(
            ["docker", "exec", "-e", f"KEY={public_key}", host.container, "bash", "-c", script],
            check=True,
            capture_output=True,
            timeout=60,
        )
        published = subprocess.run(
            ["docker", "port", host.container, "22/tcp"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        port = int(published.split()[0].rsplit(":", 1)[1])
        key = subprocess.run(
            ["docker", "exec", host.container, "cat", "/etc/ssh/ssh_host_ed25519_key.pub"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        return port, f"[127.0.0.1]:{port} {key[0]} {key[1]}"

    @staticmethod
    def pause(host: NestedHost) -> None:
        """Freeze the host's container: its engine stops answering (host loss)."""
        subprocess.run(["docker", "pause", host.container], check=True, timeout=60)

    @staticmethod
    def unpause(host: NestedHost) -> None:
        subprocess.run(["docker", "unpause", host.container], check=True, timeout=60)

    def close(self) -> None:
        """Remove every container and volume made, then the socket folders."""
        for host in self.hosts:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.containers.get(host.container).remove(force=True, v=True)
            with contextlib.suppress(docker.errors.NotFound):
                self.client.volumes.get(host.volume).remove(force=True)
        self.hosts.clear()
        self.client.close()
        shutil.rmtree(self.root, ignore_errors=True)
