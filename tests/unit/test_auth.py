"""node.auth: one bearer-token check for STOW-RS/QIDO-RS, /metrics and the /admin actions — 401 with
``WWW-Authenticate: Bearer``, counted, logged without the presented value, audited — over the real app, ingest
stack and audit file; and the secure-by-default config: HTTP on loopback unless a token is set."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from starlette.testclient import TestClient

from node.admin import admin_routes
from node.audit import AuditTrail, read_records
from node.auth import Authenticator, open_setup_warnings, token_matches
from node.cli import main
from node.config import NodeConfig, is_loopback, load_config
from node.db import create_engine_for, init_schema
from node.dicomweb import create_app
from node.dispatch import Dispatcher
from node.errors import ConfigError
from node.http import HealthProbe, HttpServer
from node.index import Index
from node.ingest import Ingestor
from node.logs import configure_logging
from node.metrics import Metrics
from node.queue import JobQueue
from node.spool import Spool
from tests.conftest import free_port
from tests.ctgen import write_ct_series
from tests.tlscerts import make_pki
from tests.unit.test_dicomweb import STOW_TYPE, multipart

TOKEN = "s3cret-token-value"
REPO = Path(__file__).resolve().parents[2]


class App:
    """The node's HTTP app (DICOMweb + /admin) over a real ingest stack, one Authenticator, a real audit file."""

    def __init__(self, tmp_path: Path, **node: Any) -> None:
        self.config = NodeConfig.model_validate({"node": {"data_dir": str(tmp_path / "data"), **node}})
        self.engine = create_engine_for(f"sqlite:///{tmp_path / 'data' / 'node.db'}")
        init_schema(self.engine)
        spool = Spool(self.config.node.spool_dir)
        self.index = Index(self.engine)
        self.metrics = Metrics()
        self.audit = AuditTrail(self.config.audit, self.config.node.data_dir, ae_title="PACSNODE",
                                on_failure=self.metrics.audit_failure)
        token = self.config.node.dicomweb_token.get_secret_value() if self.config.node.dicomweb_token else None
        auth = Authenticator(token, metrics=self.metrics, audit=self.audit)
        app = create_app(self.config, Ingestor(spool, self.index), self.index,
                         health=HealthProbe(self.engine, spool.root, lambda: True), metrics=self.metrics,
                         token=token, authenticator=auth, audit=self.audit)
        app.router.routes.append(Mount("/admin", routes=admin_routes(
            lambda: self.config, self.engine, token=token, dispatcher=Dispatcher(self.config, self.engine, {}),
            queue=JobQueue(self.engine, self.config.queue), index=self.index, authenticator=auth)))
        self.client = TestClient(app)

    def close(self) -> None:
        self.client.close()
        self.audit.close()
        self.engine.dispose()

    def failures(self, surface: str, reason: str) -> float:
        text = self.metrics.render()[0].decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "pacsnode_auth_failures_total" and s.labels == {"surface": surface, "reason": reason}:
                    return s.value
        return 0.0

    def audited(self, event: str) -> list[dict[str, Any]]:
        return [r for r in read_records(self.audit.path) if r["event"] == event]


@pytest.fixture
def log_stream():
    stream = io.StringIO()
    configure_logging("INFO", stream)
    yield stream
    configure_logging("INFO")


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def test_dicomweb_401_counted_logged_audited_then_200_with_the_token(tmp_path, log_stream):
    app = App(tmp_path, dicomweb_token=TOKEN, http_host="0.0.0.0")
    try:
        ct = write_ct_series(tmp_path / "in", slices=3, size=16, seed=3)
        body = multipart([p.read_bytes() for p in ct.paths])
        stow = lambda headers: app.client.post(  # noqa: E731
            "/dicomweb/studies", content=body, headers={"Content-Type": STOW_TYPE, **headers})
        answers = [stow({}), stow(bearer("not-the-token")), stow({"Authorization": f"Basic {TOKEN}"}),
                   app.client.get("/dicomweb/studies", headers=bearer("guess"))]
        for r in answers:
            assert r.status_code == 401
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert app.failures("dicomweb", "missing") == 1
        assert app.failures("dicomweb", "mismatch") == 2
        assert app.failures("dicomweb", "wrong_scheme") == 1
        assert stow(bearer(TOKEN)).status_code == 200
        q = app.client.get("/dicomweb/studies?StudyInstanceUID=" + ct.study_uid, headers=bearer(TOKEN))
        assert q.status_code == 200 and len(q.json()) == 1
        logged = log_stream.getvalue()
        assert logged.count('"event": "auth_failed"') == 4
        assert "not-the-token" not in logged and "guess" not in logged and TOKEN not in logged
        failed = app.audited("auth_failed")
        assert len(failed) == 4
        ident = failed[0]["EventIdentification"]
        assert ident["EventID"]["csd-code"] == "110114" and ident["EventOutcomeIndicator"] == 4
        assert failed[0]["ActiveParticipant"][0]["NetworkAccessPointID"] == "testclient"
        audit_text = app.audit.path.read_text()
        assert "not-the-token" not in audit_text and TOKEN not in audit_text
        (received,) = app.audited("instances_received")  # only the admitted STOW stored anything
        assert received["ActiveParticipant"][0]["UserID"] == "dicomweb-token"
        (query,) = app.audited("query")
        assert query["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"][1] == \
            {"type": "NumberOfMatches", "value": "1"}
    finally:
        app.close()


def test_metrics_open_by_default_and_behind_the_token_when_asked(tmp_path):
    open_app = App(tmp_path / "a", dicomweb_token=TOKEN)
    try:
        assert open_app.client.get("/metrics").status_code == 200
    finally:
        open_app.close()
    app = App(tmp_path / "b", dicomweb_token=TOKEN, metrics_require_token=True)
    try:
        r = app.client.get("/metrics")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert app.client.get("/metrics", headers=bearer("nope")).status_code == 401
        r = app.client.get("/metrics", headers=bearer(TOKEN))
        assert r.status_code == 200
        assert 'pacsnode_auth_failures_total{reason="missing",surface="metrics"} 1.0' in r.text
        assert 'pacsnode_auth_failures_total{reason="mismatch",surface="metrics"} 1.0' in r.text
        assert app.client.get("/healthz").status_code == 200  # probes stay open
    finally:
        app.close()


def test_admin_action_uses_the_same_check(tmp_path):
    app = App(tmp_path, dicomweb_token=TOKEN)
    try:
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        r = app.client.post("/admin/retry", content=b"all=deliveries", headers={**form, **bearer("wrong")})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = app.client.post("/admin/retry", content=b"all=deliveries&token=wrong", headers=form)
        assert r.status_code == 401
        assert app.failures("admin", "mismatch") == 2
        r = app.client.post("/admin/retry", content=b"all=deliveries", headers={**form, **bearer(TOKEN)})
        assert r.status_code == 200 and r.json() == {"deliveries": 0, "jobs": 0}
        assert [r["EventIdentification"]["EventOutcomeDescription"] for r in app.audited("auth_failed")] == \
            ["admin: bearer token mismatch"] * 2
    finally:
        app.close()


def test_open_node_admits_everyone_as_anonymous(tmp_path):
    app = App(tmp_path)
    try:
        assert app.client.get("/dicomweb/studies").status_code == 200
        assert app.client.get("/metrics").status_code == 200
        (query,) = app.audited("query")
        assert query["ActiveParticipant"][0]["UserID"] == "anonymous"
    finally:
        app.close()


def test_token_matches_is_exact():
    assert token_matches(TOKEN, TOKEN)
    assert not token_matches(TOKEN + "x", TOKEN) and not token_matches("", TOKEN)
    assert not token_matches("s3cret-tokén-value", TOKEN)  # non-ASCII input compares, never raises
    with pytest.raises(ValueError, match="token"):
        Authenticator("  ")


# -- secure by default ---------------------------------------------------------------------------------------------
def test_fresh_config_binds_http_to_loopback(tmp_path):
    assert NodeConfig().node.http_host == "127.0.0.1"
    shipped = load_config(REPO / "config" / "node.toml", environ={})
    assert shipped.node.http_host == "127.0.0.1" and shipped.node.dicomweb_token is None
    config = NodeConfig.model_validate({"node": {"data_dir": str(tmp_path), "http_port": free_port()}})
    server = HttpServer(config, Starlette())
    server.start()
    try:
        assert server._sock.getsockname()[0] == "127.0.0.1"  # the socket the node really listens on
    finally:
        server.stop()


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "10.1.2.3", "pacs-node.hospital.example"])
def test_non_loopback_http_without_token_is_refused_naming_the_keys(tmp_path, host):
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\nhttp_host = "{host}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert "node.http_host" in str(err.value)
    assert "dicomweb_token" in str(err.value) and "PACSNODE_NODE__DICOMWEB_TOKEN" in str(err.value)
    config = load_config(path, environ={"PACSNODE_NODE__DICOMWEB_TOKEN": TOKEN})  # the container's way
    assert config.node.http_host == host and config.node.http_authenticates()


def test_loopback_names_and_metrics_token_needs_a_token(tmp_path):
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "", "::", "192.168.1.2", "example.org"))
    path = tmp_path / "node.toml"
    path.write_text("[node]\nmetrics_require_token = true\n")
    with pytest.raises(ConfigError, match="metrics_require_token"):
        load_config(path, environ={})


def test_compose_and_docker_bind_beyond_loopback_only_with_the_token():
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    env = compose["services"]["pacsnode"]["environment"]
    assert env["PACSNODE_NODE__DICOMWEB_TOKEN"].startswith("${PACSNODE_DICOMWEB_TOKEN:?")  # compose refuses without
    assert env["PACSNODE_NODE__HTTP_HOST"] == "0.0.0.0"
    entry = (REPO / "deploy" / "docker-entrypoint.sh").read_text()
    assert 'if [ -n "${PACSNODE_NODE__DICOMWEB_TOKEN:-}" ]' in entry and "HTTP_HOST" in entry
    assert "PACSNODE_NODE__HTTP_HOST=0.0.0.0" not in (REPO / "Dockerfile").read_text()


def test_docker_entrypoint_sets_the_http_bind_only_with_a_token(tmp_path):
    import subprocess

    script = REPO / "deploy" / "docker-entrypoint.sh"
    probe = ["sh", "-c", 'echo "host=${PACSNODE_NODE__HTTP_HOST:-unset}"']
    without = subprocess.run(["sh", str(script), *probe], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert without.stdout.strip() == "host=unset" and "DICOMWEB_TOKEN is not set" in without.stderr
    with_token = subprocess.run(["sh", str(script), *probe], capture_output=True, text=True,
                                env={"PATH": "/usr/bin:/bin", "PACSNODE_NODE__DICOMWEB_TOKEN": TOKEN})
    assert with_token.stdout.strip() == "host=0.0.0.0"


# -- pacsnode config check -----------------------------------------------------------------------------------------
def _check(tmp_path: Path, toml: str, capsys: Any, *extra: str) -> tuple[int, str]:
    path = tmp_path / "node.toml"
    path.write_text(toml)
    code = main(["config", "check", "--config", str(path), *extra])
    out = capsys.readouterr()
    json.loads(out.out)  # the effective config still goes to stdout
    return code, out.err


def test_config_check_warns_about_an_open_plaintext_setup(tmp_path, capsys, monkeypatch):
    for name in [k for k in __import__("os").environ if k.startswith("PACSNODE_")]:
        monkeypatch.delenv(name)
    toml = f'[node]\nhost = "0.0.0.0"\nhttp_host = "0.0.0.0"\ndicomweb_token = "{TOKEN}"\n'
    code, err = _check(tmp_path, toml, capsys)
    assert code == 0
    warnings_ = [line for line in err.splitlines() if line.startswith("pacsnode: warning:")]
    assert len(warnings_) == 4, err
    assert any("allowed_calling_aes" in w for w in warnings_)
    assert any("DIMSE" in w and "plaintext" in w for w in warnings_)
    assert any("HTTP" in w and "plaintext" in w for w in warnings_)
    assert any("/metrics is open" in w for w in warnings_)
    assert TOKEN not in err
    code, _ = _check(tmp_path, toml, capsys, "--strict")
    assert code == 1
    locked = (f'[node]\nhost = "0.0.0.0"\nallowed_calling_aes = ["CT1"]\nhttp_host = "0.0.0.0"\n'
              f'dicomweb_token = "{TOKEN}"\nmetrics_require_token = true\n')
    code, err = _check(tmp_path, locked, capsys, "--strict")
    assert code == 1 and err.count("warning:") == 2 and err.count("is plaintext") == 2  # TLS: what is left
    pki = make_pki(tmp_path / "pki")
    tls = (f'[tls]\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\nca_file = "{pki.ca}"\n'
           'dimse_port = 2762\nplaintext_dimse = false\nhttps = true\n')
    code, err = _check(tmp_path, locked + tls, capsys, "--strict")
    assert code == 0 and "warning" not in err, err
    local = '[node]\nhost = "127.0.0.1"\n'
    code, err = _check(tmp_path, local, capsys, "--strict")
    assert code == 0 and "warning" not in err


def test_open_setup_warnings_for_the_shipped_config():
    warnings_ = open_setup_warnings(load_config(REPO / "config" / "node.toml", environ={}))
    # DIMSE on 0.0.0.0 without an allow-list, in plaintext; HTTP stays on loopback so /metrics is not flagged
    assert len(warnings_) == 2 and "allowed_calling_aes" in warnings_[0] and "plaintext" in warnings_[1]


def test_https_with_required_client_certificates_may_bind_beyond_loopback_without_a_token(tmp_path):
    from node.errors import ConfigError

    pki = make_pki(tmp_path / "pki")
    base = (f'[node]\nhttp_host = "0.0.0.0"\n[tls]\ncertificate = "{pki.server_cert}"\n'
            f'private_key = "{pki.server_key}"\nca_file = "{pki.ca}"\nhttps = true\n')
    path = tmp_path / "node.toml"
    path.write_text(base + 'client_certificates = "required"\n')
    config = load_config(path, environ={})
    assert config.http_authenticates() and not config.node.http_authenticates()
    path.write_text(base + 'client_certificates = "optional"\n')  # a certificate is not demanded: open
    with pytest.raises(ConfigError, match="node.http_host"):
        load_config(path, environ={})


def test_config_check_warns_about_plaintext_destinations_beyond_loopback():
    def warnings_for(*destinations):
        return [w for w in open_setup_warnings(NodeConfig.model_validate({"destinations": list(destinations)}))
                if w.startswith("destination")]

    plain = {"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "10.1.2.3", "port": 104}
    web = {"name": "web", "kind": "dicomweb", "url": "http://pacs.example/dicom-web", "token": "t0k"}
    (dimse,) = warnings_for(plain)
    assert "'pacs'" in dimse and "plaintext" in dimse and "token" not in dimse
    (token,) = warnings_for(web)
    assert "and its token" in token and "t0k" not in token
    assert warnings_for({**plain, "host": "127.0.0.1"}, {**web, "url": "https://pacs.example/dicom-web"}) == []


def test_config_check_warns_about_plaintext_syslog_beyond_loopback():
    def syslog_warnings(**audit):
        return [w for w in open_setup_warnings(NodeConfig.model_validate({"audit": audit})) if "syslog" in w]

    (tcp,) = syslog_warnings(syslog_host="siem.hospital.example", syslog_protocol="tcp")
    assert "patient identifiers in audit records cross the network in cleartext" in tcp and "'tcp'" in tcp
    (udp,) = syslog_warnings(syslog_host="10.1.2.3")  # udp, the default
    assert "cleartext" in udp and "'udp'" in udp
    assert syslog_warnings(syslog_host="127.0.0.1", syslog_protocol="tcp") == []  # a local relay
    assert syslog_warnings(syslog_host="siem.hospital.example", syslog_protocol="tls") == []
    assert syslog_warnings(syslog_host="10.1.2.3", enabled=False) == []  # nothing is sent


def test_config_check_warns_about_private_keys_others_may_read(tmp_path):
    keys = {name: tmp_path / f"{name}.key" for name in ("node", "dest", "syslog")}
    cert = tmp_path / "cert.pem"
    for path in (*keys.values(), cert):
        path.write_text("-----BEGIN PRIVATE KEY-----\n")
    config = NodeConfig.model_validate({
        "tls": {"certificate": cert, "private_key": keys["node"]},
        "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
                          "tls": True, "client_certificate": cert, "client_private_key": keys["dest"]}],
        "audit": {"syslog_host": "127.0.0.1", "syslog_protocol": "tls", "syslog_client_certificate": cert,
                  "syslog_client_private_key": keys["syslog"]},
    })

    def key_warnings():
        return [w for w in open_setup_warnings(config) if "chmod 600" in w]

    for path in keys.values():
        path.chmod(0o600)
    assert key_warnings() == []
    keys["syslog"].chmod(0o644)
    keys["dest"].chmod(0o640)
    keys["node"].chmod(0o604)
    got = key_warnings()
    assert len(got) == 3, got
    assert any(w.startswith("tls.private_key") and "0604" in w for w in got)
    assert any("'pacs' client_private_key" in w and "0640" in w for w in got)
    assert any(w.startswith("audit.syslog_client_private_key") and str(keys["syslog"]) in w and "0644" in w
               for w in got)
