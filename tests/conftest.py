"""Shared fixtures: free ports, a real node started as a subprocess, and peer-tool discovery.

Peers (DCMTK, Orthanc, dicom3tools) are found on PATH. A missing peer skips the test locally, but under CI
(``CI=true``) it fails, so a broken install step cannot hide behind skips.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

pytest_plugins = ["tests.orthanc"]

REPO = Path(__file__).resolve().parent.parent


def missing_peer(message: str) -> NoReturn:
    """A peer, tool or data set a test needs is not here: skip locally, fail under CI (where `make test` installs
    everything, so a missing one is a missing install step). The one place this policy lives."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Return the path of an executable peer tool, or skip (fail under CI) when it is missing."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        missing_peer(f"{name} is not installed (make test installs it when run as root)")
    return path


# Another weights folder (<name>/<version>/ like models/weights) for the tests that run the real models.
TEST_WEIGHTS_DIR = os.environ.get("PACSNODE_TEST_WEIGHTS_DIR")


def require_weights() -> None:
    """Skip (fail under CI) unless the classifier and U-Net load from the shipped weights or TEST_WEIGHTS_DIR."""
    from models.registry import Registry, RegistryError

    try:
        registry = Registry(Path(TEST_WEIGHTS_DIR) if TEST_WEIGHTS_DIR else None)
        registry.classifier()
        registry.segmenter()
    except RegistryError as exc:
        missing_peer(f"model weights are not available: {exc}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, diagnostics: Callable[[], str] = str) -> Any:
    """Poll ``predicate`` every 0.25 s until it returns something truthy (returned); else fail naming ``what``,
    followed by ``diagnostics()`` (e.g. a node's log tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{diagnostics()}")


def peer_env() -> dict[str, str]:
    """Environment for DCMTK/Orthanc peers: TCP_NODELAY=1 (docs/peers.md: Nagle stalls every small C-STORE)."""
    return {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class RunningNode:
    port: int
    ae_title: str
    data_dir: Path
    config_path: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    http_port: int = 0

    @property
    def spool(self) -> Path:
        return self.data_dir / "spool"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'node.db'}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def launch_node(
    workdir: Path, *, port: int | None = None, allowed: list[str] | None = None, extra_toml: str = "",
    ae_title: str = "PACSNODE",
) -> RunningNode:
    """Start `pacsnode serve` on a free (or the given) port with a temporary config under ``workdir`` and wait
    until it listens; stop it with `stop_node`. For one node per test use the `start_node` fixture."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    http_port = free_port()
    data_dir = workdir / "data"
    config_path = workdir / "node.toml"
    config_path.write_text(
        f"""
[node]
ae_title = "{ae_title}"
host = "127.0.0.1"
port = {port}
allowed_calling_aes = {_toml_list(allowed or [])}
data_dir = "{data_dir}"
http_port = {http_port}
{extra_toml}
"""
    )
    log_path = workdir / "node.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(config_path)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    node = RunningNode(port, ae_title, data_dir, config_path, proc, log_path, http_port)
    try:
        wait_for_port(port, proc=proc)
    except Exception:
        stop_node(node)
        raise
    return node


def stop_node(node: RunningNode) -> None:
    """Stop a node by its PID: SIGTERM, then SIGKILL after 20 s."""
    if node.proc.poll() is None:
        node.proc.terminate()
        try:
            node.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., RunningNode]]:
    """Factory: start `pacsnode serve` on a free port with a temporary config; stopped by PID at teardown."""
    started: list[RunningNode] = []

    def _start(
        *, allowed: list[str] | None = None, extra_toml: str = "", ae_title: str = "PACSNODE", port: int | None = None
    ) -> RunningNode:
        node = launch_node(tmp_path / f"node-{len(started)}", port=port, allowed=allowed, extra_toml=extra_toml,
                           ae_title=ae_title)
        started.append(node)
        return node

    yield _start
    for node in started:
        stop_node(node)


# -- the database backends: the same tests on SQLite (embedded default) and a real PostgreSQL server ---------------
@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One PostgreSQL cluster for the whole run (tests/pg.py), started on first use, stopped by PID at the end.
    Its folder is outside pytest's tmp tree, which only root may enter (the server runs as ``postgres``)."""
    import tempfile

    from tests.pg import PostgresServer

    workdir = Path(tempfile.mkdtemp(prefix="pacsnode-pg-"))
    server = PostgresServer(workdir).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend: a SQLite file in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return str(request.getfixturevalue("postgres_server").create_database())
