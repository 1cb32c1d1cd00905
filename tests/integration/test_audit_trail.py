"""A full run's audit trail, with real peers: DCMTK storescu sends a CT series to the node (a subprocess with the
shipped models and a DICOMweb token), echoscu tries a wrong called AE, a QIDO-RS query comes without and then with
the token, the results go to Orthanc — and ``pacsnode audit --since`` must show that run's association start/stop,
the rejected association, the study received (with its counts and patient ID), the failed and the good query and
the export to Orthanc and a config reload, while the node's own log never carries the patient ID."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from peers import dcmtk
from tests.conftest import REPO, free_port, require_weights, wait_until
from tests.ctgen import write_ct_series
from tests.integration.test_end_to_end import node_toml, results_by_study, storescu

pytestmark = pytest.mark.integration

TOKEN = "audit-test-token-0123456789"
PATIENT = "AUDIT-PID-4711"
CT = "1.2.840.10008.5.1.4.1.1.2"


def audit_records(config_path: Path, since: str) -> list[dict[str, Any]]:
    """The records ``pacsnode audit --since SINCE --json`` prints (the command an admin runs)."""
    out = subprocess.run([sys.executable, "-m", "node.cli", "audit", "--config", str(config_path), "--since", since,
                          "--json"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def qido(port: int, study: str, token: str | None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/dicomweb/studies?StudyInstanceUID={study}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("WWW-Authenticate")


@pytest.mark.one_backend  # the records written; the receipts read back from the index run on both backends in the
# killed-listener test below
def test_a_full_run_is_in_the_audit_trail(start_node, orthanc_factory, tmp_path):
    require_weights()
    since = dt.datetime.now(dt.UTC).replace(microsecond=0, tzinfo=None).isoformat()  # what an admin would type
    node_port = free_port()
    orthanc = orthanc_factory(modalities={"node": ("PACSNODE", "127.0.0.1", node_port)})
    node = start_node(port=node_port, extra_toml=f'dicomweb_token = "{TOKEN}"\n'
                      + node_toml(orthanc, scope_check=False))  # a ctgen disc is no chest the scope check passes
    series = write_ct_series(tmp_path / "s", slices=20, size=64, seed=33, images_in_acquisition=True,
                             patient_id=PATIENT)
    storescu(node.port, tmp_path / "s")
    rejected = dcmtk.echoscu(node.port, called_ae="NOT-THE-NODE", calling_ae="PROBE", timeout=30)
    assert rejected.returncode != 0

    assert qido(node.http_port, series.study_uid, None) == (401, 'Bearer realm="pacsnode"')
    status, found = qido(node.http_port, series.study_uid, TOKEN)
    assert status == 200 and len(found) == 1
    subprocess.run([sys.executable, "-m", "node.cli", "config", "reload", "--config", str(node.config_path)],
                   cwd=REPO, check=True, capture_output=True, timeout=60)

    wait_until(lambda: (results_by_study(orthanc).get(series.study_uid) or {}).get("SEG"), 120,
               "SR and SEG at Orthanc", diagnostics=lambda: node.log_text()[-3000:])
    exported = wait_until(
        lambda: [r for r in audit_records(node.config_path, since) if r["event"] == "exported"], 30,
        "the export in the audit trail")
    node.stop()
    records = audit_records(node.config_path, since)
    by_event: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_event.setdefault(record["event"], []).append(record)

    assert len(by_event["application_started"]) == 1 and len(by_event["application_stopped"]) == 1
    # the storescu association: login, what it stored, logout
    (started,) = [r for r in by_event["association_started"] if r["ActiveParticipant"][0]["UserID"] == "CT-SCANNER"]
    assert started["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1"
    assert started["ActiveParticipant"][1]["UserID"] == "PACSNODE"
    assoc_id = started["pacsnode"]["association_id"]
    (received,) = by_event["instances_received"]
    assert received["pacsnode"]["association_id"] == assoc_id and received["pacsnode"]["instances"] == 20
    study, patient = received["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == series.study_uid
    assert study["ParticipantObjectDescription"]["SOPClass"] == [{"UID": CT, "NumberOfInstances": 20}]
    assert patient["ParticipantObjectID"] == PATIENT
    (ended,) = [r for r in by_event["association_ended"] if r["pacsnode"]["association_id"] == assoc_id]
    assert ended["EventIdentification"]["EventOutcomeDescription"] == "association released"
    # the echo with the wrong called AE
    (refused,) = by_event["association_rejected"]
    assert [p["UserID"] for p in refused["ActiveParticipant"]] == ["PROBE", "NOT-THE-NODE"]
    assert refused["EventIdentification"]["EventOutcomeIndicator"] == 4
    # the two queries: the one without a token is an authentication failure, the other a query with one match
    (failed,) = by_event["auth_failed"]
    assert failed["EventIdentification"]["EventOutcomeDescription"] == "dicomweb: bearer token missing"
    (query,) = by_event["query"]
    assert query["ActiveParticipant"][0]["UserID"] == "dicomweb-token"
    assert {"type": "NumberOfMatches", "value": "1"} in \
        query["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]
    # the reload (SIGHUP through `pacsnode config reload`)
    (reloaded,) = by_event["config_reloaded"]
    assert reloaded["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == str(node.config_path)
    assert reloaded["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110131"
    # the results: SR, SEG and key images to Orthanc, for that study and patient
    (export,) = exported
    assert export["ActiveParticipant"][1]["UserID"] == orthanc.aet
    assert export["ActiveParticipant"][1]["AlternativeUserID"] == "orthanc"
    objects = export["ParticipantObjectIdentification"]
    assert objects[0]["ParticipantObjectID"] == series.study_uid
    # SR, SEG and the key-images KOS
    assert sum(c["NumberOfInstances"] for c in objects[0]["ParticipantObjectDescription"]["SOPClass"]) == 3
    assert objects[1]["ParticipantObjectID"] == PATIENT
    assert export["pacsnode"]["series_uid"] == series.series_uid
    # the records are in time order, and the patient ID stayed out of the node's log
    times = [r["EventIdentification"]["EventDateTime"] for r in records]
    assert times == sorted(times)
    assert PATIENT not in node.log_text() and TOKEN not in node.log_text()


def listener_process(node: Any) -> dict[str, Any]:
    """``listener-0``'s entry in the node's /readyz process table; while it restarts (the only listener serves HTTP
    too) nothing answers: then not alive, no restarts."""
    import httpx

    try:
        report = httpx.get(f"http://127.0.0.1:{node.http_port}/readyz", timeout=10).json()
    except httpx.HTTPError:
        return {"restarts": 0, "alive": False}
    return dict(next(p for p in report["processes"]["processes"] if p["name"] == "listener-0"))


LEAN_PROCESSES = ("listener_processes = 1\n[worker]\nenabled = false\n[completion]\nstable_seconds = 3600\n"
                  "[supervise]\nrestart_backoff_seconds = 0.2\n")


def test_a_listener_killed_mid_association_still_leaves_the_receipt(start_node, tmp_path):
    """The listener process dies (kill -9, the OOM killer) while a modality's association is open: what it had
    acknowledged is indexed, but the 110104 record is written at the association's close, which never comes. The
    restarted listener closes the association as aborted — and audits it as a close does: the study, its counts
    and patient, then the logout."""
    import os
    import signal

    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    node = start_node(extra_toml=LEAN_PROCESSES)
    trail = node.data_dir / "audit" / "audit.jsonl"

    series = write_ct_series(tmp_path / "s", slices=3, size=32, seed=7, patient_id=PATIENT)
    ae = AE("CT-SCANNER")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:  # a modality streaming a study keeps its association open between images
        assert [int(assoc.send_c_store(dcmread(p)).Status) for p in series.paths] == [0, 0, 0]
        before = listener_process(node)
        os.kill(before["pid"], signal.SIGKILL)
    finally:
        assoc.abort()
    wait_until(lambda: (p := listener_process(node))["restarts"] == 1 and p["alive"], 60, "the listener restarted",
               diagnostics=lambda: node.log_text()[-3000:])

    def by_event(event: str) -> list[dict[str, Any]]:
        lines = trail.read_text().splitlines() if trail.exists() else []
        return [r for r in map(json.loads, lines) if r["event"] == event]

    (received,) = wait_until(lambda: by_event("instances_received"), 30, "the receipt in the audit trail",
                             diagnostics=lambda: node.log_text()[-3000:])
    assert received["ActiveParticipant"][0]["UserID"] == "CT-SCANNER"
    assert received["pacsnode"]["instances"] == 3
    study, patient = received["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == series.study_uid
    assert study["ParticipantObjectDescription"]["SOPClass"] == [{"UID": CT, "NumberOfInstances": 3}]
    assert patient["ParticipantObjectID"] == PATIENT
    (started,) = by_event("association_started")
    (ended,) = by_event("association_ended")
    assert started["pacsnode"] == ended["pacsnode"] == {"association_id": received["pacsnode"]["association_id"]}
    assert ended["EventIdentification"]["EventOutcomeDescription"] == "association aborted (found open at restart)"
