"""A real PostgreSQL server for the tests (the `postgres_server` fixture): Debian's `postgresql` binaries, a throwaway cluster in a temp dir.

`PostgresServer(workdir).start()` runs ``initdb`` (as the ``postgres`` user when the tests run as root: PostgreSQL
refuses to run as root) and ``pg_ctl start`` on a free loopback port with trust authentication, and `stop()` stops
it by PID (``pg_ctl stop -m immediate``: nothing in it needs to survive). `create_database()` makes a fresh,
empty database per test and returns its SQLAlchemy URL (``postgresql+psycopg://``). Facts this relies on are in
docs/peers.md ("PostgreSQL").
"""

from __future__ import annotations

import glob
import os
import pwd
import subprocess
import uuid
from pathlib import Path

import sqlalchemy as sa

from peers.process import PeerError, find_tool, free_port

PG_GLOB = "/usr/lib/postgresql/*/bin"


def pg_bin_dir() -> Path:
    """The newest installed PostgreSQL's bin folder (Debian keeps them off PATH); raises `PeerMissingError`."""
    found = sorted(glob.glob(PG_GLOB), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    if found:
        return Path(found[-1])
    return Path(find_tool("initdb")).parent


class PostgresServer:
    """One throwaway PostgreSQL cluster on 127.0.0.1:<free port>, started and stopped by the tests."""

    def __init__(self, workdir: Path) -> None:
        self.bin = pg_bin_dir()
        self.workdir = workdir
        self.data = workdir / "pgdata"
        self.port = free_port()
        self.log = workdir / "postgres.log"
        self._user: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            pwd.getpwnam("postgres")
            self._user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._user, *args], capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> PostgresServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._user:
            entry = pwd.getpwnam("postgres")
            os.chown(self.workdir, entry.pw_uid, entry.pw_gid)
        done = self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                         "--no-sync", "-E", "UTF8")
        if done.returncode != 0:
            raise PeerError(f"initdb failed: {done.stderr[-2000:]}")
        return self.resume()

    def pause(self) -> None:
        """Shut the server down (``pg_ctl stop -m fast``: connections are cut, as in a maintenance restart or a
        failover), keeping its data and port for `resume`."""
        done = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "stop", "-m", "fast", "-w", "-t", "60")
        if done.returncode != 0:
            raise PeerError(f"pg_ctl stop failed: {done.stderr[-1000:]}")

    def resume(self) -> PostgresServer:
        """Start the initialised cluster (again) on its port; returns once it accepts connections."""
        options = (f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        done = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.log),
                         "start", "-w", "-t", "60")
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise PeerError(f"pg_ctl start failed: {done.stderr[-1000:]} {log[-2000:]}")
        return self

    @property
    def pid(self) -> int | None:
        pid_file = self.data / "postmaster.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.exists() else None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        if self.data.exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "stop", "-m", "immediate", "-w")
