"""Where the audit trail must not be silent: each failed DICOM TLS handshake (DCMTK and Python's ``ssl`` as the
peers, none of it rate-limited), the associations a dead process left open (their receipt and logout written at the
next start), each study retention deletes (110105, from the real purge, the loop and ``pacsnode purge``, never the
dry run), each replay of dead letters (``pacsnode retry``, ``POST /admin/retry``) with who asked, and several
processes writing one trail that each follow the others' rotation."""

from __future__ import annotations

import contextlib
import getpass
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from node.audit import AuditTrail, audit_files, read_records
from node.config import AuditSection, NodeConfig, NodeSection, TlsSection
from node.db import create_engine_for, init_schema
from node.dimse import DimseServer
from node.index import Index
from node.ingest import Ingestor, Origin
from node.processes import ProcessSupervisor
from node.refusals import LOG_BURST
from node.roles import Identity, Role
from node.spool import Spool
from tests.conftest import REPO, free_port, peer_env, require_tool, wait_until
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes
from tests.tlscerts import Pki, make_pki
from tests.unit.test_retention import DAY, Site

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def records(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    return [r for r in read_records(path) if event is None or r["event"] == event]


# -- F8: several writers of one trail -------------------------------------------------------------------------------
def test_writers_of_one_trail_follow_each_others_rotation(tmp_path: Path) -> None:
    """Two processes' trails on one path (the listener and dispatcher children): when the busy one rotates, the
    other used to write on into the renamed file through its open handle, which then grew without bound."""
    settings = AuditSection(rotate_bytes=4000, rotate_daily=False)
    listener = AuditTrail(settings, tmp_path, ae_title="PACSNODE")
    dispatcher = AuditTrail(settings, tmp_path, ae_title="PACSNODE")
    dispatcher.config_changed(source=None, applied=True, reason="DISPATCHER-first")
    for i in range(200):
        listener.association_started(assoc_id=f"a{i}", calling_ae="MOD", called_ae="PACSNODE", peer="10.0.0.1")
        if i % 10 == 0:
            dispatcher.config_changed(source=None, applied=True, reason=f"DISPATCHER-{i}")
    listener.close()
    dispatcher.close()
    files = audit_files(listener.path)
    assert len(files) > 5
    longest = max(len(line) for f in files for line in f.read_text().splitlines()) + 1
    for f in files:  # none grew past the limit (a file holds at least one record, whatever its size)
        assert f.stat().st_size <= max(settings.rotate_bytes, longest), (f.name, f.stat().st_size)
    # nothing lost, each record once, and the current file is the one both write
    assert len(records(listener.path, "association_started")) == 200
    assert len(records(listener.path, "config_reloaded")) == 21
    dispatcher.config_changed(source=None, applied=True, reason="DISPATCHER-last")
    dispatcher.close()
    assert "DISPATCHER-last" in listener.path.read_text()


def test_a_writer_reopens_a_trail_removed_under_it(tmp_path: Path) -> None:
    audit = AuditTrail(AuditSection(), tmp_path, ae_title="PACSNODE")
    audit.application(started=True)
    audit.path.unlink()  # an operator or a log shipper moved it away
    audit.application(started=False)
    audit.close()
    assert [r["event"] for r in records(audit.path)] == ["application_stopped"]


# -- F3: DICOM TLS handshakes ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class TlsNode:
    """An in-process DIMSE server with a DICOM TLS listener (client certificates required) and an audit trail."""

    def __init__(self, tmp_path: Path, pki: Pki) -> None:
        self.config = NodeConfig(
            node=NodeSection(host="127.0.0.1", port=free_port(), data_dir=tmp_path / "data", ae_title="PACSNODE",
                             allowed_calling_aes=["MODALITY"], association_timeout_seconds=5,
                             network_timeout_seconds=5),
            tls=TlsSection(certificate=pki.server_cert, private_key=pki.server_key, ca_file=pki.ca,
                           client_certificates="required", dimse_port=free_port()))
        self.engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
        init_schema(self.engine)
        self.audit = AuditTrail(self.config.audit, self.config.node.data_dir, ae_title="PACSNODE")
        index = Index(self.engine)
        self.server = DimseServer(self.config, Ingestor(Spool(self.config.node.spool_dir), index), index,
                                  audit=self.audit)
        self.server.start()
        address = self.server.tls_address
        assert address is not None
        self.port = address[1]

    def echo(self, *tls: str, aet: str = "MODALITY") -> int:
        done = subprocess.run([require_tool("echoscu"), "-aet", aet, "-aec", "PACSNODE", *tls, "127.0.0.1",
                               str(self.port)], capture_output=True, text=True, env=peer_env(), timeout=30)
        return done.returncode

    def stop(self) -> None:
        self.server.stop()
        self.audit.close()
        self.engine.dispose()


@pytest.fixture
def tls_node(tmp_path: Path, pki: Pki) -> Iterator[TlsNode]:
    node = TlsNode(tmp_path, pki)
    yield node
    node.stop()


def _python_client(pki: Pki, port: int, certificate: tuple[Path, Path] | None) -> None:
    """A TLS client trusting the node's CA, offering ``certificate`` (cert, key) or none; the node refuses it."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if certificate is not None:
        ctx.load_cert_chain(str(certificate[0]), str(certificate[1]))
    with contextlib.suppress(ssl.SSLError, OSError), socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.recv(1)  # TLS 1.3: the server's verdict on our certificate arrives after our side is done


def test_failed_dicom_tls_handshakes_are_audited_and_a_flood_is_counted(tls_node: TlsNode, pki: Pki) -> None:
    """As an AE title refused at A-ASSOCIATE time is (110114 login, minor failure): with no client certificate, one
    from a foreign CA — one by one as far as the refusal log goes (LOG_BURST per peer and minute), then counted: each
    record is ~1.2 KB on the data disk, and "every one" let a flood of bad handshakes grow the trail without bound.
    The count goes in one `failures_unrecorded` record with the peer's next failure after the window, so every
    failure is accounted for. A bare TCP connect is no login attempt: not recorded one by one."""
    assert tls_node.echo("+tla", "+cf", str(pki.ca)) != 0  # DCMTK, no client certificate
    assert tls_node.echo("+tls", str(pki.other_server_key), str(pki.other_server_cert), "-pw",
                         "+cf", str(pki.ca)) != 0  # DCMTK, a certificate of another CA
    burst = LOG_BURST + 3
    for _ in range(burst):
        _python_client(pki, tls_node.port, (pki.other_server_cert, pki.other_server_key))
    for _ in range(20):  # bare TCP connects (a load balancer's probe, a port scan): no login attempt, not audited
        socket.create_connection(("127.0.0.1", tls_node.port), timeout=10).close()
    assert tls_node.echo("+tls", str(pki.client_key), str(pki.client_cert), "-pw", "+cf", str(pki.ca),
                         aet="INTRUDER") != 0  # a good certificate, an AE title not allowed
    assert tls_node.echo("+tls", str(pki.client_key), str(pki.client_cert), "-pw", "+cf", str(pki.ca)) == 0
    failed = wait_until(lambda: (r := records(tls_node.audit.path, "tls_handshake_failed")) and
                        len(r) >= LOG_BURST and r, 20, "a record per failed handshake of the burst")
    tls_node.server._refusals.window_seconds = 1e-9  # noqa: SLF001 - the minute has passed
    _python_client(pki, tls_node.port, (pki.other_server_cert, pki.other_server_key))
    (summary,) = wait_until(lambda: records(tls_node.audit.path, "failures_unrecorded"), 20, "the count recorded")
    failed = wait_until(lambda: (r := records(tls_node.audit.path, "tls_handshake_failed")) and
                        len(r) == LOG_BURST + 1 and r, 20, "the next failure recorded")
    for record in [*failed, summary]:
        ident = record["EventIdentification"]
        assert ident["EventID"]["csd-code"] == "110114" and ident["EventTypeCode"][0]["csd-code"] == "110122"
        assert ident["EventOutcomeIndicator"] == 4
        peer, node = record["ActiveParticipant"]
        assert peer["NetworkAccessPointID"] == "127.0.0.1" and peer["UserIsRequestor"] is True
        assert node["UserID"] == "PACSNODE"
    reasons = [r["EventIdentification"]["EventOutcomeDescription"] for r in failed]
    assert all(reason.startswith("DICOM TLS handshake failed: ") for reason in reasons)
    assert "certificate" in reasons[0]  # "peer did not return a certificate"
    assert all("certificate verify failed" in reason for reason in reasons[1:]), reasons
    # 2 + burst + 20 failed before the window passed, LOG_BURST of them recorded one by one
    assert summary["EventIdentification"]["EventOutcomeDescription"] == \
        f"{2 + burst + 20 - LOG_BURST} more DICOM TLS handshakes failed, not recorded one by one"
    (rejected,) = records(tls_node.audit.path, "association_rejected")
    assert rejected["ActiveParticipant"][0]["UserID"] == "INTRUDER"
    assert len(records(tls_node.audit.path, "association_started")) == 1


def test_a_flood_of_rejected_associations_is_counted_not_recorded_one_by_one(tls_node: TlsNode) -> None:
    """Each A-ASSOCIATE-RJ (an AE title not allowed) was audited, ~1.2 KB a record: a plaintext peer cycling
    associations with a wrong calling AE, hundreds a second, grew the trail on the data disk without bound. Now one
    by one as far as the refusal log goes, then counted into one `failures_unrecorded` record."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    def echo_as_intruder() -> None:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        assert not ae.associate("127.0.0.1", tls_node.config.node.port, ae_title="PACSNODE").is_established

    for _ in range(LOG_BURST + 7):
        echo_as_intruder()
    tls_node.server._refusals.window_seconds = 1e-9  # noqa: SLF001 - the minute has passed
    echo_as_intruder()
    (summary,) = wait_until(lambda: records(tls_node.audit.path, "failures_unrecorded"), 20, "the count recorded")
    assert summary["EventIdentification"]["EventOutcomeDescription"] == \
        "7 more associations rejected, not recorded one by one"
    assert len(records(tls_node.audit.path, "association_rejected")) == LOG_BURST + 1


def _store(ingestor: Ingestor, folder: Path, association_id: str, patient_id: str) -> str:
    series = write_ct_series(folder, slices=3, size=16, seed=5, patient_id=patient_id)
    for path in series.paths:
        ingestor.accept(dataset_bytes(path), EXPLICIT_LE, Origin(calling_ae="CT1", association_id=association_id))
    return series.study_uid


def test_the_supervisor_audits_associations_its_dead_children_left_open(tmp_path: Path) -> None:
    """The whole node was killed (kill -9, OOM) while a listener held an association: its instances were
    acknowledged, but the 110104 receipt is written at the association's close, which never came. The next start
    closes it — and now audits it as that close would have."""
    config = NodeConfig(node=NodeSection(data_dir=tmp_path / "data"))
    engine = create_engine_for(config.database_url)
    init_schema(engine)
    listener = Index(engine, node_id=Identity.of(config, Role.LISTENER, 0).node_id)
    listener.association_opened("assoc-dead", "CT1", "PACSNODE", "10.1.2.3:40000")
    study = _store(Ingestor(Spool(config.node.spool_dir), listener), tmp_path / "ct", "assoc-dead", "PID-CRASH")
    engine.dispose()

    assert ProcessSupervisor(config, None).prepare()[0] == 1  # (closed, series re-timed)
    trail = AuditTrail.file_for(config.audit, config.node.data_dir)
    (received,) = records(trail, "instances_received")
    assert received["pacsnode"] == {"association_id": "assoc-dead", "called_ae": "PACSNODE", "instances": 3}
    study_object, patient = received["ParticipantObjectIdentification"]
    assert study_object["ParticipantObjectID"] == study and patient["ParticipantObjectID"] == "PID-CRASH"
    assert received["ActiveParticipant"][0]["UserID"] == "CT1"
    assert received["ActiveParticipant"][0]["NetworkAccessPointID"] == "10.1.2.3"
    (ended,) = records(trail, "association_ended")
    assert ended["EventIdentification"]["EventOutcomeDescription"] == "association aborted (found open at restart)"
    assert ProcessSupervisor(config, None).prepare()[0] == 0  # closed once, audited once
    assert len(records(trail, "instances_received")) == 1


def test_closing_dangling_associations_returns_each_one_once(tmp_path: Path) -> None:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    mine, other = Index(engine, node_id="n:listener-0"), Index(engine, node_id="m:listener-0")
    mine.association_opened("a1", "CT1", "PACSNODE", "10.0.0.1:1")
    mine.association_opened("a2", "CT2", "PACSNODE", "10.0.0.2:2")
    mine.association_closed("a2", "released")  # type: ignore[arg-type]
    other.association_opened("b1", "CT3", "PACSNODE", "10.0.0.3:3")
    (closed,) = mine.abort_dangling_associations()
    assert (closed.id, closed.calling_ae, closed.called_ae, closed.peer) == ("a1", "CT1", "PACSNODE", "10.0.0.1:1")
    assert mine.abort_dangling_associations() == []
    engine.dispose()


# -- F5: retention deletes studies ------------------------------------------------------------------------------------
@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    s.engine.dispose()


def _trail(site: Site) -> Path:
    return AuditTrail.file_for(site.config.audit, site.config.node.data_dir)


def _study_of(site: Site, series_uid: str) -> str:
    with site.engine.connect() as conn:
        return str(conn.execute(sa.text("select study_uid from instances where series_uid = :s"),
                                {"s": series_uid}).scalar())


def test_a_purge_audits_each_study_it_deleted_and_a_dry_run_nothing(site: Site) -> None:
    uid = site.series("a", seed=1)
    study = _study_of(site, uid)
    site.clock.now += 8 * DAY
    assert site.retention.purge(dry_run=True).instance_files == 10
    assert records(_trail(site)) == []
    assert site.retention.purge().instance_files == 10
    (deleted,) = records(_trail(site))
    ident = deleted["EventIdentification"]
    assert deleted["event"] == "study_deleted"
    assert (ident["EventID"]["csd-code"], ident["EventActionCode"], ident["EventOutcomeIndicator"]) == ("110105", "D", 0)
    study_object, patient = deleted["ParticipantObjectIdentification"]
    assert study_object["ParticipantObjectID"] == study
    assert (study_object["ParticipantObjectTypeCode"], study_object["ParticipantObjectTypeCodeRole"]) == ("2", "3")
    assert study_object["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"
    assert study_object["ParticipantObjectDescription"]["SOPClass"] == [{"UID": CT, "NumberOfInstances": 10}]
    assert patient["ParticipantObjectID"] == "CTGEN-0001"
    assert (patient["ParticipantObjectTypeCode"], patient["ParticipantObjectTypeCodeRole"]) == ("1", "1")
    assert deleted["pacsnode"] == {"series": [uid], "instances": 10}
    # not the loop: whoever ran it is the requestor (the OS user), the node the application
    node, user = deleted["ActiveParticipant"]
    assert node["UserID"] == "PACSNODE" and user["RoleIDCode"][0]["csd-code"] == "110151" and user["UserIsRequestor"]
    assert site.retention.purge().instance_files == 0
    assert len(records(_trail(site))) == 1  # nothing more deleted, nothing more recorded


def test_the_scheduled_purge_is_the_nodes_own_and_a_partial_one_is_instances_deleted(site: Site) -> None:
    uid = site.series("a", seed=1)
    study = _study_of(site, uid)
    more = write_ct_series(site.tmp_path / "more", slices=2, size=16, seed=9, study_uid=study)
    for path in more.paths:  # another series of the study, still receiving: it stays
        site.ingestor.accept(dataset_bytes(path), EXPLICIT_LE, Origin("CT1", "a2"))
    site.clock.now += 8 * DAY
    assert site.retention.purge(scheduled=True).instance_files == 10
    (deleted,) = records(_trail(site))
    assert deleted["event"] == "instances_deleted"  # PS3.15 A.5.3.6: 110105 only when the whole study went
    ident = deleted["EventIdentification"]
    assert (ident["EventID"]["csd-code"], ident["EventActionCode"]) == ("110103", "D")
    assert deleted["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == study
    (node,) = deleted["ActiveParticipant"]
    assert node["UserID"] == "PACSNODE" and node["UserIsRequestor"] is True


def test_pacsnode_purge_audits_what_it_deleted(site: Site, tmp_path: Path) -> None:
    uid = site.series("cli", seed=10)
    with site.engine.begin() as conn:  # settled 8 days ago by the wall clock the CLI uses
        conn.execute(sa.text("update deliveries set delivered_at = :t"), {"t": site.clock() - 8 * DAY})
        conn.execute(sa.text("update series set state_changed_at = :t"), {"t": site.clock() - 8 * DAY})
    config_path = tmp_path / "node.toml"
    config_path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
                           f'[database]\nurl = "sqlite:///{tmp_path / "node.db"}"\n')

    def purge(*flags: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "node.cli", "purge", "--config", str(config_path), "--json",
                               *flags], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    assert purge("--dry-run")["instance_files"] == 10
    assert records(_trail(site)) == []
    assert purge()["instance_files"] == 10
    (deleted,) = records(_trail(site))
    assert deleted["event"] == "study_deleted" and deleted["pacsnode"]["series"] == [uid]
    assert deleted["ActiveParticipant"][1]["UserID"] == getpass.getuser()  # who ran `pacsnode purge`


# -- F5: replaying dead letters -----------------------------------------------------------------------------------------
def test_admin_retry_is_audited_with_the_token_holder_and_the_peer(tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from node.admin import admin_routes
    from node.auth import Authenticator
    from node.states import DeliveryState
    from tests.unit.test_admin import TOKEN, TestClient
    from tests.unit.test_admin import Site as AdminSite

    site = AdminSite(tmp_path)
    uid = site.series("s", seed=4)
    dead = site.delivery(uid, "archive")
    audit = AuditTrail(site.config.audit, site.config.node.data_dir, ae_title="NODE-AE")
    routes = admin_routes(lambda: site.config, site.engine, token=TOKEN, dispatcher=site.dispatcher, queue=site.queue,
                          index=site.index, clock=site.clock, authenticator=Authenticator(TOKEN, audit=audit))
    with TestClient(Starlette(routes=[Mount("/admin", routes=routes)]), base_url="http://node.local",
                    follow_redirects=False) as client:
        answer = client.post("/admin/retry", data={"delivery": str(dead.id)},
                             headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.json() == {"deliveries": 1, "jobs": 0}
    assert site.delivery(uid, "archive").state == DeliveryState.PENDING
    audit.close()
    site.engine.dispose()
    (replayed,) = records(audit.path, "dead_letters_replayed")
    ident = replayed["EventIdentification"]
    assert ident["EventID"]["csd-code"] == "110100" and ident["EventOutcomeIndicator"] == 0
    assert ident["EventOutcomeDescription"] == "POST /admin/retry: 1 deliveries and 0 jobs queued again"
    node, user = replayed["ActiveParticipant"]
    assert node["UserID"] == "NODE-AE" and node["UserIsRequestor"] is False
    assert (user["UserID"], user["UserIsRequestor"], user["NetworkAccessPointID"]) == (
        "dicomweb-token", True, "testclient")
    assert replayed["pacsnode"]["delivery_ids"] == [dead.id]


def test_pacsnode_retry_is_audited_with_the_os_user(tmp_path: Path) -> None:
    from node.config import load_config
    from node.dispatch import Dispatcher, deliveries
    from node.states import DeliveryState

    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[[destinations]]\nname = "pacs"\nkind = "dimse"\n'
                   'ae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n')
    config = load_config(cfg, environ={})
    engine = create_engine_for(config.database_url)
    init_schema(engine)
    ids = [Dispatcher(config, engine, {}).enqueue(f"1.2.{i}", 1, [tmp_path / f"sr{i}.dcm"], [f"1.2.9.{i}"])[0]
           for i in range(2)]
    with engine.begin() as conn:
        conn.execute(deliveries.update().values(state=DeliveryState.DEAD, last_error="refused"))
    engine.dispose()
    done = subprocess.run([sys.executable, "-m", "node.cli", "retry", "--config", str(cfg), "--delivery", str(ids[0])],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    (replayed,) = records(AuditTrail.file_for(config.audit, config.node.data_dir), "dead_letters_replayed")
    assert replayed["EventIdentification"]["EventOutcomeDescription"] == \
        "pacsnode retry: 1 deliveries and 0 jobs queued again"
    assert replayed["ActiveParticipant"][1]["UserID"] == getpass.getuser()
    assert replayed["ActiveParticipant"][1]["UserIsRequestor"] is True
    assert replayed["pacsnode"]["delivery_ids"] == [ids[0]]
