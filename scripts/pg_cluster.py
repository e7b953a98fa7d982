"""A private PostgreSQL 15 cluster in a temp dir on a free port, for the tests and the benches.

    cluster = PgCluster()   # initdb, trust auth for the user ``shopfloor``
    cluster.start()         # pg_ctl start: its unix socket, and 127.0.0.1 only
    cluster.url             # postgresql+psycopg://shopfloor@/postgres?host=<dir>&port=<port>
    cluster.tcp_url         # postgresql+psycopg://shopfloor@127.0.0.1:<port>/postgres
    cluster.remove()        # stop it and remove its files

``url`` is the unix socket, as a controller reaches a PostgreSQL on its own host (Debian's
default, ``host=/var/run/postgresql``); ``tcp_url`` the way a controller on another host
does (a loopback round trip costs ~0.3 ms more per statement here than the socket's).

The tests (tests/integration/conftest.py) and bench/lease.py both start theirs with it, so
both run the database the same way; ``make test`` installs PostgreSQL 15 (``make
postgres``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PgCluster:
    """A private PostgreSQL cluster in a temp dir on a free port; ``stop`` and ``start`` it
    to take the database away from a controller and give it back."""

    def __init__(self) -> None:
        assert (PG_BIN / "initdb").exists(), "PostgreSQL 15 is needed (`make postgres`)"
        self.base = Path(tempfile.mkdtemp(prefix="shopfloor-pg-"))
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            shutil.chown(self.base, "postgres", "postgres")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        self.data, self.port = self.base / "data", free_port()
        self.url = f"postgresql+psycopg://shopfloor@/postgres?host={self.base}&port={self.port}"
        self.tcp_url = f"postgresql+psycopg://shopfloor@127.0.0.1:{self.port}/postgres"
        self._pg(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "shopfloor",
            "--auth=trust",
            "-E",
            "UTF8",
        )

    def _pg(self, *argv: str) -> None:
        subprocess.run([*self.as_postgres, *argv], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c max_connections=300"
        )
        log = str(self.base / "log")
        self._pg(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start"
        )

    def stop(self) -> None:
        self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # stopped already
        shutil.rmtree(self.base, ignore_errors=True)

    def fresh_database(self, prefix: str = "db") -> str:
        """The URL of a new, empty database of its own on this cluster."""
        return fresh_database(self.url, prefix)


def fresh_database(server_url: str, prefix: str = "db") -> str:
    """A new, empty database on the cluster at ``server_url``; its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{secrets.token_hex(4)}"
    server = make_url(server_url)
    plain = server.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.set(database=name).render_as_string(hide_password=False)
