"""Shared fixtures over the real peers of `peers/` (the harness the demo and the benchmarks use too), and the policy
for a missing peer.

Peers (DCMTK, Orthanc, dicom3tools, PostgreSQL) are found on PATH. A missing peer skips the test locally, but under
CI (``CI=true``) it fails, so a broken install step cannot hide behind skips: `missing_peer` decides, and a
`PeerMissingError` raised by the harness anywhere in a test or its fixtures goes through it. The fixtures return named
objects: `start_node` → `NodeProcess`, `orthanc_factory` → `OrthancServer`, `postgres_server` → `PostgresServer`;
`db_url` gives a fresh database of each backend and `engine` an engine over it with the schema.
The harness helpers the tests use are importable from here as well as from `peers`.

The database every test node runs on is chosen in one place, `node_database` (``--node-db=sqlite|postgres|both``,
``both`` running each integration test that starts nodes once per backend, as `make test` does; default
from ``TEST_NODE_DB`` (not ``PACSNODE_*``: the config loader would take that for an override), else SQLite): on PostgreSQL each node gets a fresh database on the session's one cluster
(`postgres_server`). `start_node` uses it; a test that launches a node itself, or builds the node's components in
process, asks it for a URL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import structlog

from peers import (  # noqa: F401  (re-exported: the tests import these from here)
    REPO,
    NodeProcess,
    PeerMissingError,
    find_tool,
    free_port,
    launch_node,
    peer_env,
    wait_for_port,
    wait_until,
)
from peers.orthanc import OrthancServer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--node-db", choices=("sqlite", "postgres", "both"), default=os.environ.get("TEST_NODE_DB") or "sqlite",
        help="the database the integration tests' nodes run on; 'both' runs each integration test that starts "
             "nodes once per backend (default: $TEST_NODE_DB, else sqlite)",
    )


@pytest.fixture(autouse=True)
def _logging_config_restored() -> Iterator[None]:
    """structlog's configuration as it was before each test, after it: a test running a CLI command in-process
    (``purge`` and ``status`` configure logging at WARNING) left the level there, and the next test in that worker
    captured no info event (``shutting_down``, ``inference_device_selected``: CI run 35)."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


BACKENDS = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``--node-db=both``: every integration test whose nodes take `node_database` runs on SQLite and on
    PostgreSQL (ids ``[sqlite]``/``[postgres]``; session-scoped, so each backend's cluster starts once per worker)
    — except those marked ``one_backend`` (a browser page, a routing loop's long quiet window, the image-only scope
    check: their subject is not the database, and their database paths run on both backends in other tests), which
    run on PostgreSQL only, the backend a plain run (SQLite by default) does not cover. That keeps `make test` within
    its time budget."""
    if (metafunc.config.getoption("--node-db") == "both" and "node_database" in metafunc.fixturenames
            and metafunc.definition.get_closest_marker("integration") is not None):
        one = metafunc.definition.get_closest_marker("one_backend") is not None
        metafunc.parametrize("node_database", ("postgres",) if one else BACKENDS, indirect=True, scope="session")


def missing_peer(message: str) -> NoReturn:
    """A peer, tool or data set a test needs is not here: skip locally, fail under CI (where `make test` installs
    everything, so a missing one is a missing install step). The one place this policy lives."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Return the path of an executable peer tool, or skip (fail under CI) when it is missing."""
    try:
        return find_tool(name)
    except PeerMissingError as exc:
        missing_peer(str(exc))


@contextlib.contextmanager
def _peer_missing_policy() -> Iterator[None]:
    """A `PeerMissingError` from the harness (a tool or file not installed): skip locally, fail under CI."""
    try:
        yield
    except PeerMissingError as exc:
        missing_peer(str(exc))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    """Fixtures: a `PeerMissingError` goes through `missing_peer`."""
    with _peer_missing_policy():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Test bodies: a `PeerMissingError` goes through `missing_peer`."""
    with _peer_missing_policy():
        return (yield)


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


class NodeDatabases:
    """The backend the test nodes run on (``--node-db``). `for_node()` is a node's ``[database] url``: None on
    SQLite (the node's default file in its data_dir), a fresh database on PostgreSQL; `fresh(sqlite_file)` is a
    fresh database's URL for a test that builds the node's components itself."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        chosen = str(getattr(request, "param", None) or request.config.getoption("--node-db"))
        self.backend: str = "sqlite" if chosen == "both" else chosen  # "both" reaches here only outside integration
        self._request = request

    @property
    def postgres(self) -> bool:
        return self.backend == "postgres"

    def for_node(self) -> str | None:
        return str(self._request.getfixturevalue("postgres_server").create_database()) if self.postgres else None

    def fresh(self, sqlite_file: Path) -> str:
        return self.for_node() or f"sqlite:///{sqlite_file}"


@pytest.fixture(scope="session")
def node_database(request: pytest.FixtureRequest) -> NodeDatabases:
    """The one place the integration tests' database backend is chosen (`NodeDatabases`)."""
    return NodeDatabases(request)


@pytest.fixture
def start_node(tmp_path: Path, node_database: NodeDatabases) -> Iterator[Callable[..., NodeProcess]]:
    """Factory: start `pacsnode serve` on a free port with a temporary config (`launch_node`) on a fresh database
    of the chosen backend (`node_database`); each returns its `NodeProcess`, stopped by PID at teardown."""
    started: list[NodeProcess] = []

    def _start(
        *, allowed: list[str] | None = None, extra_toml: str = "", ae_title: str = "PACSNODE", port: int | None = None
    ) -> NodeProcess:
        node = launch_node(tmp_path / f"node-{len(started)}", port=port, allowed=allowed, extra_toml=extra_toml,
                           ae_title=ae_title, database_url=node_database.for_node())
        started.append(node)
        return node

    yield _start
    for node in started:
        node.stop()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """Factory: ``orthanc_factory(**OrthancServer kwargs)`` returns a started `OrthancServer`; all stop at teardown."""
    made: list[OrthancServer] = []

    def make(**kwargs: Any) -> OrthancServer:
        server = OrthancServer(tmp_path / f"orthanc-{len(made)}", **kwargs)
        made.append(server)
        return server.start()

    yield make
    for server in made:
        server.stop()


# -- the database backends: the same tests on SQLite (embedded default) and a real PostgreSQL server ---------------
def throwaway_postgres(prefix: str = "pacsnode-pg-") -> Iterator[Any]:
    """A started `peers.postgres.PostgresServer`, stopped by PID and removed at the end. Its folder is outside
    pytest's tmp tree, which only root may enter (it runs as ``postgres``)."""
    import tempfile

    from peers.postgres import PostgresServer

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    server = PostgresServer(workdir).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One PostgreSQL cluster for the whole run, started on first use (`throwaway_postgres`)."""
    yield from throwaway_postgres()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend: a SQLite file in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return str(request.getfixturevalue("postgres_server").create_database())


@pytest.fixture
def engine(db_url: str) -> Iterator[Any]:
    """An engine over `db_url` (each backend) with the node's schema, disposed afterwards. A test module with an
    ``engine`` fixture of its own (one backend only, say) overrides it."""
    from node.db import create_engine_for, init_schema

    eng = create_engine_for(db_url)
    init_schema(eng)
    yield eng
    eng.dispose()
