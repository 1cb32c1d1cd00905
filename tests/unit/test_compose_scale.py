"""docker-compose.scale.yml, checked without a Docker engine: the topology the README draws (PostgreSQL, Orthanc,
2 listeners, 2 workers, 1 dispatcher, a one-shot schema upgrade first), every node container's command a valid
`pacsnode` invocation whose config (config/node.toml plus the container's environment) validates, distinct
instance ids, and the shared volumes where the roles need them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from node.cli import build_parser
from node.config import load_config
from node.spools import Spools

REPO = Path(__file__).resolve().parents[2]
ENV = {"POSTGRES_PASSWORD": "pw", "PACSNODE_DICOMWEB_TOKEN": "t" * 32}


def _interpolate(value: str) -> str:
    """Compose's ``${NAME:?message}`` / ``${NAME}`` with the values a deployer would export."""
    return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", lambda m: ENV[m.group(1)], value)


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((REPO / "docker-compose.scale.yml").read_text())["services"]


def _nodes(services: dict) -> dict[str, dict]:
    return {name: s for name, s in services.items() if s.get("build")}


def _args(service: dict):
    command = service["command"]
    assert command[0] == "pacsnode"
    return build_parser().parse_args(command[1:])


def _config(service: dict, tmp_path: Path):
    environ = {k: _interpolate(str(v)) for k, v in service["environment"].items()}
    environ["PACSNODE_NODE__DATA_DIR"] = str(tmp_path)  # the image's ENV (Dockerfile) says /data
    return load_config(REPO / "config" / "node.toml", environ=environ)


def test_the_topology(services):
    roles = {name: getattr(_args(s), "role", None) for name, s in _nodes(services).items()}
    assert sorted(r for r in roles.values() if r) == ["dispatcher", "listener", "listener", "worker", "worker"]
    assert {"postgres", "orthanc", "migrate"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:")


def test_every_node_command_and_config_is_valid(services, tmp_path):
    ids = []
    for name, service in _nodes(services).items():
        args = _args(service)
        config = _config(service, tmp_path / name)
        assert config.database_url.startswith("postgresql+psycopg://pacsnode:pw@postgres:5432/"), name
        assert service["build"]["args"]["EXTRAS"] == "postgres"  # psycopg in the image
        if args.command == "serve":
            ids.append(config.node.instance_id)
            assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        else:
            assert args.command == "db" and name == "migrate"
    assert len(ids) == 5 and len(set(ids)) == 5 and None not in ids


def test_the_shared_volumes_are_where_the_roles_read_and_write(services, tmp_path):
    for name, service in _nodes(services).items():
        role = getattr(_args(service), "role", None)
        if role is None:
            continue
        mounts = dict(v.split(":", 1)[::-1] for v in service.get("volumes", []))
        config = _config(service, Path("/data"))
        # One spool id for everyone on one shared volume at each container's own spool dir: no [spools] needed.
        assert config.node.spool_id == "shared" and config.spools == {}
        assert Spools(config).resolve("shared", "1/2/3.dcm") == Path("/data/spool/1/2/3.dcm")
        assert mounts.get("/data/spool") == "spool", name
        if role in ("worker", "dispatcher"):
            assert mounts.get("/data/results") == "results", name  # written by workers, sent by the dispatcher


def test_orthanc_knows_a_listener_and_the_node_sends_to_orthanc(services, tmp_path):
    modalities = json.loads(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    ae, host, port = modalities["pacsnode"]
    listener = services[host]
    assert _args(listener).role == "listener" and port == 11112  # the listener container's DIMSE port
    (dest,) = _config(services["dispatcher"], tmp_path).destinations
    assert (dest.host, dest.port, dest.ae_title) == ("orthanc", 4242, services["orthanc"]["environment"][
        "ORTHANC__DICOM_AET"])
    assert ae == _config(listener, tmp_path).node.ae_title
