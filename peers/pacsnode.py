"""The node as a peer: `pacsnode serve` run as a child process from this checkout, stopped by PID.

`NodeProcess(config_path, port=...)` runs a node on a complete config file; `launch_node(workdir, ...)` writes a
small config (loopback, free ports, data under ``workdir``, plus ``extra_toml``; ``database_url`` adds a
``[database]`` table, e.g. a PostgreSQL database, instead of the default SQLite file) and starts it. Unless
``extra_toml`` has an ``[admission]`` table of its own, that config judges free disk space by the default bytes only
(`HOST_DISK_ADMISSION`): the default 5 % of a shared build host's disk (13.5 GB of 270 GB) once left a CI run's
nodes refusing every new series while 13 GB were free. Both return once
the node's DIMSE port answers. The child runs ``python -m node.cli`` with this checkout as its working folder, so
it runs the checkout's code whatever is installed, and without ``PACSNODE_*`` variables (its config is complete;
overrides meant for another node, or a test's own settings, must not reach it).
"""

from __future__ import annotations

import json
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from peers.process import PeerProcess, free_port, peer_env, wait_for_port

REPO = Path(__file__).resolve().parent.parent  # the checkout whose node/ the child runs
# what a launched node's [admission] says unless its test sets its own: the floor and reserve in bytes (2 GiB /
# 512 MiB, the defaults), not in percent of whatever disk the tests happen to run on
HOST_DISK_ADMISSION = "\n[admission]\nmin_free_percent = 0\nreserve_free_percent = 0\n"


def node_env() -> dict[str, str]:
    """The peers' environment (`peer_env`) without any ``PACSNODE_*`` variable."""
    return {k: v for k, v in peer_env().items() if not k.startswith("PACSNODE_")}


@dataclass(eq=False)
class NodeProcess(PeerProcess):
    """`pacsnode serve --config config_path` listening for DIMSE on ``port``; its output goes to ``log_path``
    (a fresh file each start; None: discarded). ``args`` go after the config (e.g. ``--log-level WARNING``).
    ``data_dir``, ``http_port`` and ``database_url`` (None: the default SQLite file in ``data_dir``) are what the
    config says, for the helpers below."""

    config_path: Path
    port: int
    log_path: Path | None = None
    ae_title: str = "PACSNODE"
    data_dir: Path | None = None
    http_port: int = 0
    args: tuple[str, ...] = ()
    database_url: str | None = None
    append_log = False

    def start(self, timeout: float = 120.0) -> NodeProcess:
        """Start the node and return once its DIMSE port and its HTTP port answer; raises `PeerError` (stopping
        it) when it exits first or does not listen within ``timeout`` seconds. Under the process model the
        supervisor holds the DIMSE port from the start (node.listenfds) and a listener child serves HTTP, so the
        HTTP port is what says a listener is up."""
        proc = self._spawn([sys.executable, "-m", "node.cli", "serve", "--config", str(self.config_path), *self.args],
                           cwd=REPO, env=node_env())
        deadline = time.monotonic() + timeout

        def listening() -> None:
            for port in [self.port, *([self.http_port] if self.http_port else [])]:
                wait_for_port(port, max(1.0, deadline - time.monotonic()), proc, "the node", self.log_tail)

        self._ready_or_stop(listening)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)

    @property
    def spool(self) -> Path:
        return self._data / "spool"

    @property
    def db_url(self) -> str:
        """The node's database: its ``[database] url``, or the default SQLite file in its data_dir."""
        return self.database_url or f"sqlite:///{self._data / 'node.db'}"

    @property
    def _data(self) -> Path:
        if self.data_dir is None:
            raise ValueError("data_dir: not given for this node")
        return self.data_dir


def launch_node(
    workdir: Path, *, port: int | None = None, allowed: list[str] | None = None, extra_toml: str = "",
    ae_title: str = "PACSNODE", http_port: int | None = None, args: tuple[str, ...] = (), timeout: float = 120.0,
    database_url: str | None = None,
) -> NodeProcess:
    """Write ``workdir/node.toml`` (``[node]`` on 127.0.0.1, the given or a free DIMSE and HTTP port, data in
    ``workdir/data``, ``allowed`` calling AE titles; ``extra_toml`` continues the ``[node]`` table or adds
    sections; ``database_url``, when given, is written as ``[database] url`` after it) and start the node on it,
    logging to ``workdir/node.log``. Stop it with ``.stop()``."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    http_port = http_port or free_port()
    data_dir = workdir / "data"
    config_path = workdir / "node.toml"
    config_path.write_text(node_toml(ae_title, port, http_port, data_dir, allowed, extra_toml, database_url))
    node = NodeProcess(config_path, port, workdir / "node.log", ae_title, data_dir, http_port, args, database_url)
    return node.start(timeout)


def node_toml(ae_title: str, port: int, http_port: int, data_dir: Path, allowed: list[str] | None, extra_toml: str,
              database_url: str | None) -> str:
    """The config `launch_node` writes: its ``[node]`` table continued by ``extra_toml``, ``[database]`` when a URL
    is given, and `HOST_DISK_ADMISSION` unless ``extra_toml`` has an ``[admission]`` table."""
    text = (
        f"""
[node]
ae_title = "{ae_title}"
host = "127.0.0.1"
port = {port}
allowed_calling_aes = {json.dumps(allowed or [])}
data_dir = {json.dumps(str(data_dir))}
http_port = {http_port}
{extra_toml}
"""
        + (f"\n[database]\nurl = {json.dumps(database_url)}\n" if database_url else "")
    )
    return text if "admission" in tomllib.loads(text) else text + HOST_DISK_ADMISSION
