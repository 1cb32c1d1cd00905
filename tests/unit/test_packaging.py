"""The Dockerfile and docker-compose example, checked without a Docker engine: every copied path exists, the
image runs as a non-root user with a data volume, ports and a /healthz healthcheck, and the compose file's node
settings validate against the node's own config model."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from node.config import load_config

REPO = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_copies_only_paths_that_exist():
    copies = [shlex.split(rest) for op, rest in instructions() if op in ("COPY", "ADD")]
    assert copies
    for args in copies:
        sources = [a for a in args[:-1] if not a.startswith("--")]
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"


def test_dockerfile_slim_base_non_root_volume_ports_healthcheck():
    ops = instructions()
    base = [rest for op, rest in ops if op == "FROM"]
    assert base and re.match(r"python:3\.11(\.\d+)?-slim", base[0])
    users = [rest for op, rest in ops if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(op == "VOLUME" and "/data" in rest for op, rest in ops)
    exposed = " ".join(rest for op, rest in ops if op == "EXPOSE").split()
    assert {"11112", "8080"} <= set(exposed)
    health = [rest for op, rest in ops if op == "HEALTHCHECK"]
    assert health and "/healthz" in health[0] and ":8080" in health[0]
    cmd = [rest for op, rest in ops if op == "CMD"]
    assert cmd and json.loads(cmd[-1])[:2] == ["pacsnode", "serve"]
    env = " ".join(rest for op, rest in ops if op == "ENV")
    assert "PACSNODE_NODE__DATA_DIR=/data" in env and "PACSNODE_NODE__HTTP_PORT=8080" in env


def test_compose_file_node_settings_validate(tmp_path):
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"orthanc", "pacsnode"} <= set(services)
    node = services["pacsnode"]
    assert node["build"] == "."
    environ = {k: str(v) for k, v in node["environment"].items()}
    config = load_config(REPO / "config" / "node.toml", environ=environ)
    (dest,) = config.destinations
    assert dest.host == "orthanc" and dest.port == 4242
    modalities = json.loads(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert modalities["pacsnode"] == [config.node.ae_title, "pacsnode", 11112]
    assert any(v.endswith(":/data") for v in node["volumes"])
