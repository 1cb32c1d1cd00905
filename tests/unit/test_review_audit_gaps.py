"""Review of gaps in the audit trail (PS3.15 A.5): STOW-RS requests that stored nothing, through the real uvicorn
server; what ``pacsnode audit`` leaves in the trail it reads (110101 Audit Log Used)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from node.audit import AuditTrail, read_records
from node.auth import Authenticator
from node.config import NodeConfig, load_config
from node.db import create_engine_for, init_schema
from node.dicomweb import create_app
from node.http import HealthProbe, HttpServer
from node.index import Index
from node.ingest import Ingestor
from node.metrics import Metrics
from node.spool import Spool
from tests.conftest import REPO, free_port, missing_peer
from tests.ctgen import write_ct_series

TOKEN = "review-audit-gaps-token"
BOUNDARY = "review-audit-gaps"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
PATIENT = "GAPS-PID-0815"


class _Node:
    """The HTTP app with a token on a real uvicorn server, its audit trail in ``tmp_path/data``; started."""

    def __init__(self, tmp_path: Path, *, max_request_bytes: int | None = None) -> None:
        self.config = NodeConfig.model_validate({"node": {
            "data_dir": str(tmp_path / "data"), "host": "127.0.0.1", "http_port": free_port(),
            "dicomweb_token": TOKEN}})
        self.engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
        init_schema(self.engine)
        spool, index = Spool(self.config.node.spool_dir), Index(self.engine)
        self.audit = AuditTrail(self.config.audit, self.config.node.data_dir, ae_title="PACSNODE")
        auth = Authenticator(TOKEN, metrics=Metrics(), audit=self.audit)
        health = HealthProbe(self.engine, spool.root, lambda: True)
        app = create_app(self.config, Ingestor(spool, index), index, health=health, metrics=Metrics(), token=TOKEN,
                         authenticator=auth, audit=self.audit, max_request_bytes=max_request_bytes)
        self.http = HttpServer(self.config, app, health=health)
        self.http.start()
        self.base = f"http://127.0.0.1:{self.http.port}/dicomweb/studies"

    def post(self, url: str, body: bytes, content_type: str = MULTIPART, token: str | None = TOKEN) -> int:
        headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
        return httpx.post(url, content=body, headers=headers, timeout=30).status_code

    def records(self, *events: str) -> list[dict[str, Any]]:
        return [r for r in read_records(self.audit.path) if r["event"] in events]

    def close(self) -> None:
        self.http.stop()
        self.audit.close()
        self.engine.dispose()


def _body(paths: list[Path]) -> bytes:
    out = io.BytesIO()
    for path in paths:
        out.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def test_a_stow_request_that_stores_nothing_is_in_the_audit_trail(tmp_path: Path) -> None:
    """A refused C-STORE leaves its association's login and logout (who, from where) in the trail; a STOW-RS
    request refused as a whole — 409 every part refused, 400, 413, 415 — left nothing at all, so a sender pushing
    a study at the wrong URL, or a client probing the node, was invisible in the ATNA record. Each is recorded
    now: 110104, action C, outcome 4, who (the token's holder) at which address, the status and reason."""
    series = write_ct_series(tmp_path / "s", slices=2, size=16, seed=5, patient_id=PATIENT)
    node = _Node(tmp_path, max_request_bytes=1 << 20)
    other_study = "1.2.826.0.1.3680043.8.498.1"
    try:
        answers = [
            node.post(f"{node.base}/{other_study}", _body(series.paths)),  # 409: both parts of another study
            node.post(node.base, b"{}", content_type="application/json"),  # 415
            node.post(node.base, b"x" * ((1 << 20) + 1)),  # 413: declared over max_request_bytes
            node.post(f"{node.base}/not-a-uid", _body(series.paths)),  # 400: the URL's study
            node.post(node.base, _body(series.paths), token=None),  # 401: audited as an authentication failure
        ]
    finally:
        node.close()
    assert answers == [409, 415, 413, 400, 401]
    refused = node.records("stow_refused")
    assert [r["EventIdentification"]["EventOutcomeDescription"].split(":")[0] for r in refused] == [
        "STOW-RS answered 409", "STOW-RS answered 415", "STOW-RS answered 413", "STOW-RS answered 400"]
    for record in refused:
        ident = record["EventIdentification"]
        assert ident["EventID"]["csd-code"] == "110104" and ident["EventActionCode"] == "C"
        assert ident["EventOutcomeIndicator"] == 4
        sender, node_participant = record["ActiveParticipant"]
        assert (sender["UserID"], sender["NetworkAccessPointID"], sender["UserIsRequestor"]) == \
            ("dicomweb-token", "127.0.0.1", True)
        assert node_participant["UserID"] == "PACSNODE"
    conflict = refused[0]
    assert "2 instances refused (0xA900)" in conflict["EventIdentification"]["EventOutcomeDescription"]
    study, request = conflict["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == other_study  # the study the sender named
    assert request["ParticipantObjectID"] == f"/dicomweb/studies/{other_study}"
    assert request["ParticipantObjectDescription"]["SOPClass"] == [
        {"UID": "1.2.840.10008.5.1.4.1.1.2", "NumberOfInstances": 2}]
    assert "not multipart/related" in refused[1]["EventIdentification"]["EventOutcomeDescription"]
    assert len(node.records("auth_failed")) == 1  # the 401: its own record, not a second one
    assert node.records("instances_received") == []


def test_a_flood_of_refused_stow_requests_does_not_grow_the_audit_trail_without_bound(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """Each refused request is recorded (~1 KB, kept for good by default): a client looping on a 415 a thousand
    times a second would grow the trail tens of GB a day on the data disk. As for 401s (node.auth.Bursts): an
    address's first RECORD_BURST per window one by one, the rest counted and their number recorded with the
    address's next refusal after the window."""
    from node import auth as auth_module

    monkeypatch.setattr(auth_module, "RECORD_WINDOW_SECONDS", 600.0)  # the whole flood in one window
    node = _Node(tmp_path)
    try:  # a connection each: one answered before its body was read is closed by the server (node.httpguard)
        answers = [node.post(node.base, b"{}", content_type="text/plain") for _ in range(60)]
        monkeypatch.setattr(auth_module, "RECORD_WINDOW_SECONDS", 0.0)  # the window has passed
        answers.append(node.post(node.base, b"{}", content_type="text/plain"))
    finally:
        node.close()
    assert answers == [415] * 61
    records = node.records("stow_refused", "stow_refusals_unrecorded")
    described = [r["EventIdentification"]["EventOutcomeDescription"] for r in records]
    one = "STOW-RS answered 415: Content-Type 'text/plain' is not multipart/related"
    assert described == [*[one] * auth_module.RECORD_BURST,
                         "50 more STOW-RS requests that stored nothing, not recorded one by one", one], described


def test_reading_the_audit_trail_is_itself_audited(tmp_path: Path) -> None:
    """``pacsnode audit`` shows every patient ID the node received, yet reading it left no trace: DICOM's Audit
    Log Used (PS3.15 A.5.3.2, 110101) is recorded now, naming the OS user who read it — by the process's uid, not
    the USER variable anyone can set."""
    import pwd

    data_dir = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = {json.dumps(str(data_dir))}\nae_title = "GAPSNODE"\n')
    env = {**os.environ, "USER": "someone-else", "LOGNAME": "someone-else"}
    out = subprocess.run([sys.executable, "-m", "node.cli", "audit", "--config", str(config), "--since", "1h",
                          "--event", "query"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    trail = AuditTrail.file_for(NodeConfig.model_validate({"node": {"data_dir": str(data_dir)}}).audit, data_dir)
    (used,) = [r for r in read_records(trail) if r["event"] == "audit_log_used"]
    ident = used["EventIdentification"]
    assert (ident["EventID"]["csd-code"], ident["EventActionCode"], ident["EventOutcomeIndicator"]) == \
        ("110101", "R", 0)
    application, reader = used["ActiveParticipant"]
    assert application["UserID"] == "GAPSNODE"
    assert reader["UserIsRequestor"] is True
    assert reader["UserID"] == pwd.getpwuid(os.getuid()).pw_name and reader["AlternativeUserID"] == str(os.getuid())
    (log,) = used["ParticipantObjectIdentification"]
    assert log["ParticipantObjectID"] == trail.resolve().as_uri()
    assert log["ParticipantObjectName"] == "Security Audit Log" and log["ParticipantObjectTypeCodeRole"] == "13"
    assert used["pacsnode"] == {"since": "1h", "events": ["query"]}


def test_who_replayed_dead_letters_is_the_uid_not_the_user_variable(tmp_path: Path) -> None:
    """``pacsnode retry`` (and ``purge``, a config reload) records the OS user as the requestor: it was taken from
    ``$LOGNAME``/``$USER`` (getpass.getuser), so ``USER=someone-else pacsnode retry`` put someone else's name in
    the trail. The name is the process's uid's now."""
    import pwd

    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = {json.dumps(str(tmp_path / "data"))}\n')
    env = {**os.environ, "USER": "someone-else", "LOGNAME": "someone-else"}
    for command in (["db", "upgrade"], ["retry"]):
        out = subprocess.run([sys.executable, "-m", "node.cli", *command, "--config", str(config)], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    trail = tmp_path / "data" / "audit" / "audit.jsonl"
    (replayed,) = [r for r in read_records(trail) if r["event"] == "dead_letters_replayed"]
    launcher = replayed["ActiveParticipant"][1]
    assert launcher["UserIsRequestor"] is True and launcher["UserID"] == pwd.getpwuid(os.getuid()).pw_name


def _as_nobody(config: Path, started: bool) -> None:
    """The node's record (110100 start or stop), written as the unprivileged user the node runs as: in a forked
    child (the repository and its interpreter are root's only here), which exits 0 once it is written."""
    trail_config = load_config(config)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            failures: list[str] = []
            trail = AuditTrail(trail_config.audit, trail_config.node.data_dir, ae_title="PACSNODE",
                               on_failure=failures.append)
            trail.application(started=started)
            trail.close()
            status = 0 if not failures else 3
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the node's own record was not written"


NOBODY = 65534


@contextlib.contextmanager
def nobody_trail(prefix: str) -> Iterator[tuple[Path, Path, Path]]:
    """(base, data_dir, config) of a node run as ``nobody`` whose trail (``audit/``, ``audit.jsonl``) its first
    record made, in a temporary folder others may enter (tmp_path's parents are root's only, 0700); removed after.
    Needs root (`missing_peer` otherwise): only root writes where the node's user cannot."""
    if os.geteuid() != 0:
        missing_peer("root, to run `pacsnode audit` as root against a trail another user writes")
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        base.chmod(0o755)
        data = base / "data"
        data.mkdir()
        os.chown(data, NOBODY, NOBODY)
        config = base / "node.toml"
        config.write_text(f'[node]\ndata_dir = {json.dumps(str(data))}\n')
        _as_nobody(config, True)
        yield base, data, config
    finally:
        shutil.rmtree(base, ignore_errors=True)


def audit_as_root(config: Path) -> subprocess.CompletedProcess[str]:
    """``pacsnode audit`` run by this (root) process, as an admin's ``sudo pacsnode audit``; asserted to exit 0."""
    out = subprocess.run([sys.executable, "-m", "node.cli", "audit", "--config", str(config)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out


def test_an_admin_reading_the_trail_as_root_does_not_lock_the_node_out_of_it(tmp_path: Path) -> None:
    """The node runs as its own user; an admin runs ``sudo pacsnode audit``, which now records its reading. When
    that record fell due for rotation (the day's first record, or ``rotate_bytes`` reached), root renamed the file
    and created the new ``audit.jsonl`` — root's, mode 0640 — and every record the node wrote after that failed
    (EACCES: ``audit_write_failed``), silently to anyone not watching the metric. ``pacsnode retry`` and ``purge``
    under sudo did the same. A file or directory root creates in the trail now belongs to the trail directory's
    owner."""
    with nobody_trail("pacsnode-audit-owner-") as (_, data, config):  # the node's record yesterday ...
        yesterday = time.time() - 86400
        os.utime(data / "audit" / "audit.jsonl", (yesterday, yesterday))  # ... so today's first record rotates it
        audit_as_root(config)
        _as_nobody(config, False)  # the node's next record, after root's
        files = sorted((data / "audit").iterdir())
        assert all(f.stat().st_uid == NOBODY for f in files), [(f.name, f.stat().st_uid) for f in files]
        events = [r["event"] for r in read_records(data / "audit" / "audit.jsonl")]
        assert events == ["application_started", "audit_log_used", "application_stopped"], events
