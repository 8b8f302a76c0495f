"""A real PostgreSQL for tests: Debian's ``initdb`` and ``pg_ctl`` on a free loopback port in a temporary folder.

PostgreSQL refuses to run as root; as root the cluster belongs to the ``postgres`` account
(made by Debian's package) and its commands run through ``runuser``. Each test database is
made fresh (:meth:`PostgresServer.database`); the server is stopped by PID at the end.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from wearfl.broker import free_port

USER = "wearfl"


def postgres_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl`` (Debian keeps them under /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def needs_postgres() -> Path:
    """The binaries' folder; skip without them, except under CI=true, where their absence is an error."""
    folder = postgres_bin()
    if folder is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but PostgreSQL is not installed: `apt-get install -y postgresql` (see .ci/run).")
        pytest.skip("needs PostgreSQL's initdb and pg_ctl (`apt-get install postgresql`)")
    return folder


class PostgresServer:
    """One PostgreSQL cluster: ``start``, ``kill`` (SIGKILL of the postmaster), ``stop``, ``database()``."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="wearfl-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._as_root = hasattr(os, "geteuid") and os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-instructions")

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        argv = [str(self.bindir / tool), *args]
        if self._as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresServer:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start", "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}")
        return self

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """SIGKILL the postmaster (no shutdown checkpoint: a crash); its backends notice and exit."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        if self.pid() is not None:
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def database(self, prefix: str = "t") -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started cluster (skipped without PostgreSQL, off CI), stopped on the way out whatever happened."""
    server = PostgresServer(needs_postgres()).start()
    try:
        yield server
    finally:
        server.stop()
