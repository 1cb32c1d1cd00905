"""node.audit / node.syslog / node.auditdb: the record format of every event, append-only JSON lines safe from many
threads, rotation, a failing write that never reaches the caller, RFC 5424 over real UDP and TCP sockets (parsed
back), `pacsnode audit --since`, and the study summaries read from a real index."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from node.audit import AuditTrail, StudySummary, parse_since, read_records
from node.auditdb import received_studies
from node.cli import main
from node.config import AuditSection
from node.db import create_engine_for, init_schema
from node.index import Index
from node.ingest import Ingestor, Origin
from node.metrics import Metrics
from node.spool import Spool
from node.syslog import BOM, format_message
from tests.ctgen import write_ct_series

STUDY = "1.2.826.0.1.3680043.10.999.1"
CT = "1.2.840.10008.5.1.4.1.1.2"

# RFC 5424 section 6: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD SP MSG
RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?Z) (?P<host>[!-~]{1,255}) "
    rb"(?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) "
    rb"(?P<sd>-|(?:\[(?:[^\]\\]|\\.)*\])+) (?P<msg>.*)$", re.S)  # SD-PARAM values escape " \\ ]


def trail(tmp_path: Path, clock: Any = None, metrics: Metrics | None = None, **settings: Any) -> AuditTrail:
    kwargs = {"clock": clock} if clock else {}
    return AuditTrail(AuditSection(**settings), tmp_path, ae_title="PACSNODE",
                      on_failure=metrics.audit_failure if metrics else None, **kwargs)


def one_of_each(audit: AuditTrail, cfg: Path) -> None:
    study = StudySummary(STUDY, {CT: 40}, {"PID-0001"})
    audit.application(started=True)
    audit.association_started(assoc_id="a1", calling_ae="CT1", called_ae="PACSNODE", peer="10.0.0.5:51000")
    audit.association_rejected(calling_ae="ROGUE", called_ae="PACSNODE", peer="10.0.0.9:4000")
    audit.instances_received(studies=[study], source_user="CT1", peer="10.0.0.5:51000",
                             context={"association_id": "a1"})
    audit.association_ended(assoc_id="a1", calling_ae="CT1", called_ae="PACSNODE", peer="10.0.0.5:51000",
                            state="released")
    audit.query(user="dicomweb-token", peer="10.0.0.7", path="/dicomweb/studies",
                query_string=f"StudyInstanceUID={STUDY}", matches=1, outcome=0)
    audit.exported(destination="pacs", destination_user="ORTHANC", destination_address="10.0.0.2",
                   studies=[StudySummary(STUDY, {"1.2.840.10008.5.1.4.1.1.88.34": 1,
                                                 "1.2.840.10008.5.1.4.1.1.66.4": 1}, {"PID-0001"})],
                   context={"series_uid": "1.2.3", "version": 1, "objects": 2})
    audit.config_changed(source=str(cfg), applied=True, reason="config reloaded", needs_restart=["port"])
    audit.config_changed(source=str(cfg), applied=False, reason="node.port: bad")
    audit.auth_failed(surface="dicomweb", reason="mismatch", peer="10.0.0.8", path="/dicomweb/studies")
    audit.application(started=False)


def test_each_record_type_follows_the_dicom_audit_message(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text("[node]\n")
    audit = trail(tmp_path)
    one_of_each(audit, cfg)
    audit.close()
    lines = audit.path.read_text().splitlines()
    assert audit.path == tmp_path / "audit" / "audit.jsonl"
    records = [json.loads(line) for line in lines]
    expected = [
        ("application_started", "110100", "E", 0, "110120"),
        ("association_started", "110114", "E", 0, "110122"),
        ("association_rejected", "110114", "E", 4, "110122"),
        ("instances_received", "110104", "C", 0, None),
        ("association_ended", "110114", "E", 0, "110123"),
        ("query", "110112", "E", 0, None),
        ("exported", "110106", "R", 0, None),
        ("config_reloaded", "110113", "E", 0, "110131"),
        ("config_reload_refused", "110113", "E", 4, "110131"),
        ("auth_failed", "110114", "E", 4, "110122"),
        ("application_stopped", "110100", "E", 0, "110121"),
    ]
    assert [r["event"] for r in records] == [e[0] for e in expected]
    for record, (_, event_id, action, outcome, type_code) in zip(records, expected, strict=True):
        ident = record["EventIdentification"]
        assert ident["EventID"]["csd-code"] == event_id and ident["EventID"]["codeSystemName"] == "DCM"
        assert ident["EventActionCode"] == action and ident["EventOutcomeIndicator"] == outcome
        assert dt.datetime.fromisoformat(ident["EventDateTime"]).tzinfo is not None
        assert [c["csd-code"] for c in ident.get("EventTypeCode", [])] == ([type_code] if type_code else [])
        assert record["AuditSourceIdentification"][0]["AuditSourceID"].startswith("PACSNODE@")
        assert any(p["UserIsRequestor"] for p in record["ActiveParticipant"])
    received = records[3]
    source, dest = received["ActiveParticipant"]
    assert (source["UserID"], source["NetworkAccessPointID"], source["NetworkAccessPointTypeCode"]) == \
        ("CT1", "10.0.0.5", "2")
    assert source["RoleIDCode"][0]["csd-code"] == "110153" and dest["RoleIDCode"][0]["csd-code"] == "110152"
    study, patient = received["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == STUDY and study["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"
    assert study["ParticipantObjectDescription"]["SOPClass"] == [{"UID": CT, "NumberOfInstances": 40}]
    assert (patient["ParticipantObjectTypeCode"], patient["ParticipantObjectTypeCodeRole"],
            patient["ParticipantObjectID"]) == ("1", "1", "PID-0001")
    query = records[5]["ParticipantObjectIdentification"][0]
    assert query["ParticipantObjectTypeCodeRole"] == "24"
    import base64

    assert base64.b64decode(query["ParticipantObjectQuery"]).decode() == f"StudyInstanceUID={STUDY}"
    exported = records[6]
    assert exported["ActiveParticipant"][1]["UserID"] == "ORTHANC"
    assert exported["ActiveParticipant"][1]["AlternativeUserID"] == "pacs"
    assert sum(c["NumberOfInstances"] for c in
               exported["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"]["SOPClass"]) == 2
    reload_detail = records[7]["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]
    assert {"type": "NeedsRestart", "value": "port"} in reload_detail
    assert any(d["type"] == "SHA256" and len(d["value"]) == 64 for d in reload_detail)
    # patient identifiers only where ATNA asks for them: receipts and exports
    for record in records:
        has_patient = "PID-0001" in json.dumps(record)
        assert has_patient == (record["event"] in ("instances_received", "exported")), record["event"]


def test_many_threads_append_whole_lines(tmp_path):
    audit = trail(tmp_path)

    def write(n: int) -> None:
        for i in range(150):
            audit.auth_failed(surface="metrics", reason="missing", peer=f"10.0.{n}.{i}", path="/metrics")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audit.close()
    lines = audit.path.read_text().splitlines()
    assert len(lines) == 8 * 150
    peers = {json.loads(line)["ActiveParticipant"][0]["NetworkAccessPointID"] for line in lines}
    assert len(peers) == 8 * 150


def test_rotation_by_size_and_by_day_and_reading_back(tmp_path):
    now = [dt.datetime(2026, 12, 3, 23, 59, 0, tzinfo=dt.UTC).timestamp()]
    audit = trail(tmp_path, clock=lambda: now[0], rotate_bytes=4000, rotate_daily=True)
    for _ in range(12):
        audit.application(started=True)
        now[0] += 1
    before_midnight = len(list(audit.path.parent.glob("audit-*.jsonl")))
    assert before_midnight >= 2  # ~800 bytes a record: several size rotations
    now[0] = dt.datetime(2026, 12, 4, 0, 0, 5, tzinfo=dt.UTC).timestamp()
    audit.application(started=False)
    audit.close()
    assert len(list(audit.path.parent.glob("audit-*.jsonl"))) == before_midnight + 1  # the day changed
    assert len(audit.path.read_text().splitlines()) == 1
    records = list(read_records(audit.path))
    assert [r["event"] for r in records] == ["application_started"] * 12 + ["application_stopped"]
    since = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
    assert [r["event"] for r in read_records(audit.path, since)] == ["application_stopped"]


@pytest.mark.parametrize("keep_days", [0, 30])
def test_rotated_files_older_than_keep_days_are_deleted_at_a_rotation(tmp_path, keep_days):
    """Rotated files were never deleted, so the trail grew until the disk filled; `[audit] keep_days` (0, the
    default: keep for ever) lets a site cap it. A file goes once its newest record is older than keep_days."""
    import os

    day = 86400.0
    now = [dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC).timestamp()]
    audit = trail(tmp_path, clock=lambda: now[0])
    for _ in range(60):  # a record a day: 59 daily rotations, 60 days of records
        audit.application(started=True)
        now[0] += day
    audit.close()
    for f in audit.path.parent.glob("audit-*.jsonl"):  # a file's time is its newest record's, as in real time
        stamp = dt.datetime.strptime(f.stem.split("-")[1][:8], "%Y%m%d").replace(tzinfo=dt.UTC).timestamp()
        os.utime(f, (stamp - 1, stamp - 1))  # rotated at the first record of the next day: written the day before
    os.utime(audit.path, (now[0] - day, now[0] - day))  # the current file: yesterday's record
    export = audit.path.parent / "audit-export.jsonl"  # an admin's `pacsnode audit --json >` beside the trail
    export.write_text('{"event": "not part of the trail"}\n')
    os.utime(export, (0, 0))
    audit = trail(tmp_path, clock=lambda: now[0], keep_days=keep_days)
    audit.application(started=False)  # a new day: one more rotation, and the expiry
    audit.close()
    assert export.exists()  # neither expired nor read as part of the trail
    left = sorted(audit.path.parent.glob("audit-2*.jsonl"))
    assert len(left) == (60 if keep_days == 0 else 30), [f.name for f in left]  # records of the last 30 days
    assert len(list(read_records(audit.path))) == (61 if keep_days == 0 else 31)


def test_a_failing_write_is_logged_and_counted_never_raised(tmp_path):
    metrics = Metrics()
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "audit.jsonl").mkdir()  # the file's place is taken: every open fails
    audit = trail(tmp_path, metrics=metrics)
    audit.association_started(assoc_id="a", calling_ae="CT1", called_ae="PACSNODE", peer="10.0.0.1:1")
    audit.auth_failed(surface="admin", reason="missing", peer="10.0.0.1", path="/admin/retry")
    text = metrics.render()[0].decode()
    assert 'pacsnode_audit_failures_total{sink="file"} 2.0' in text
    audit.close()


def test_a_record_cut_short_by_a_full_disk_does_not_take_the_next_one_with_it(tmp_path):
    """A write cut short (ENOSPC: found by review on a full tmpfs; or a writer killed mid-line) left a partial line,
    and the next record, reported written once space came back, was appended to it: unreadable by `pacsnode audit`.
    Each record now starts on a line of its own; a short write is counted as a failure."""
    failures: list[str] = []
    audit = trail(tmp_path)
    audit._on_failure = failures.append
    audit.application(started=True)

    class Full:  # what write(2) does on a file system with a few bytes left: writes them, reports the count
        def __init__(self, real: Any) -> None:
            self.real = real

        def write(self, data: bytes) -> int:
            return self.real.write(data[:20])

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    audit._file = Full(audit._file)  # type: ignore[assignment]
    audit.auth_failed(surface="admin", reason="missing", peer="10.0.0.1", path="/admin/retry")
    assert failures == ["file"]  # the cut-short record is lost and counted
    audit.application(started=False)  # space is back (the file was reopened after the failure)
    assert [r["event"] for r in read_records(audit.path)] == ["application_started", "application_stopped"]
    with audit.path.open("ab") as other:  # another process's record cut short
        other.write(b'{"event": "assoc')
    audit.auth_failed(surface="admin", reason="missing", peer="10.0.0.1", path="/admin/retry")
    assert [r["event"] for r in read_records(audit.path)][-1] == "auth_failed"
    assert failures == ["file"]
    audit.close()


def test_disabled_trail_writes_nothing(tmp_path):
    audit = trail(tmp_path, enabled=False)
    audit.application(started=True)
    assert audit.emit("x", {"EventID": {"csd-code": "1"}}, []) is None
    assert not audit.path.exists()


def test_rfc5424_message_parses_back():
    when = dt.datetime(2026, 12, 3, 10, 0, 0, 123456, tzinfo=dt.UTC)
    msg = format_message('{"a":"é"}', facility=10, severity=5, timestamp=when, hostname="node 1",
                         msgid="instances_received", params={"eventID": "110104", "note": 'a"b]c\\'})
    m = RFC5424.match(msg)
    assert m is not None, msg
    assert int(m["pri"]) == 85  # authpriv.notice, as IHE ATNA's examples use
    assert m["ts"] == b"2026-12-03T10:00:00.123456Z" and m["host"] == b"node1" and m["app"] == b"pacsnode"
    assert m["msgid"] == b"instances_received"
    assert m["sd"] == b'[pacsnode@32473 eventID="110104" note="a\\"b\\]c\\\\"]'
    assert m["msg"].startswith(BOM) and json.loads(m["msg"][len(BOM):]) == {"a": "é"}
    with pytest.raises(ValueError):
        format_message("x", facility=24, severity=5, timestamp=when, hostname="h", msgid="m")


def test_records_go_to_syslog_over_udp(tmp_path):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)
    try:
        audit = trail(tmp_path, syslog_host="127.0.0.1", syslog_port=sock.getsockname()[1], syslog_protocol="udp")
        audit.auth_failed(surface="dicomweb", reason="missing", peer="10.0.0.8", path="/dicomweb/studies")
        audit.application(started=True)
        got = [sock.recvfrom(65535)[0] for _ in range(2)]
        audit.close()
    finally:
        sock.close()
    file_lines = audit.path.read_text().splitlines()
    for datagram, line, severity in zip(got, file_lines, (4, 5), strict=True):
        m = RFC5424.match(datagram)
        assert m is not None, datagram
        assert int(m["pri"]) == 10 * 8 + severity
        assert m["msg"][len(BOM):].decode() == line  # the same record as the file's
    assert RFC5424.match(got[0])["sd"] == b'[pacsnode@32473 eventID="110114" outcome="4"]'


def test_records_go_to_syslog_over_tcp_with_octet_counting(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    try:
        audit = trail(tmp_path, syslog_host="127.0.0.1", syslog_port=server.getsockname()[1], syslog_protocol="tcp")
        audit.application(started=True)
        audit.application(started=False)
        conn, _ = server.accept()
        conn.settimeout(10)
        buf = b""
        messages: list[bytes] = []
        while len(messages) < 2:
            buf += conn.recv(65536)
            while b" " in buf:
                length, _, rest = buf.partition(b" ")
                if len(rest) < int(length):
                    break
                messages.append(rest[: int(length)])
                buf = rest[int(length):]
        conn.close()
        audit.close()
    finally:
        server.close()
    events = [json.loads(RFC5424.match(m)["msg"][len(BOM):])["event"] for m in messages]
    assert events == ["application_started", "application_stopped"]


def test_syslog_down_costs_a_counted_failure_not_the_caller(tmp_path):
    metrics = Metrics()
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    audit = trail(tmp_path, metrics=metrics, syslog_host="127.0.0.1", syslog_port=port, syslog_protocol="tcp")
    audit.application(started=True)
    audit.close()  # drains the sender's queue
    assert 'pacsnode_audit_failures_total{sink="syslog"} 1.0' in metrics.render()[0].decode()
    assert len(audit.path.read_text().splitlines()) == 1  # the file still has it


def test_parse_since():
    now = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
    assert parse_since("1h", now) == dt.datetime(2026, 12, 3, 11, 0, tzinfo=dt.UTC)
    assert parse_since("90s", now) == dt.datetime(2026, 12, 3, 11, 58, 30, tzinfo=dt.UTC)
    assert parse_since("2026-12-03T10:00", now) == dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.UTC)
    assert parse_since("2026-12-03T10:00+01:00", now).utcoffset() == dt.timedelta(hours=1)
    with pytest.raises(ValueError):
        parse_since("yesterday", now)


def test_pacsnode_audit_prints_records_since(tmp_path, capsys, monkeypatch):
    for name in [k for k in __import__("os").environ if k.startswith("PACSNODE_")]:
        monkeypatch.delenv(name)
    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data}"\n')
    old = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()
    trail(data, clock=lambda: old).application(started=True)
    audit = trail(data)
    one_of_each(audit, config)
    audit.close()
    assert main(["audit", "--config", str(config), "--since", "1h", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    # each reading is itself recorded first (110101 Audit Log Used), so each shows one more record
    assert len(out) == 12 and json.loads(out[0])["event"] == "application_started"
    assert json.loads(out[-1])["event"] == "audit_log_used"
    assert main(["audit", "--config", str(config), "--since", "2025-12-31T00:00"]) == 0
    text = capsys.readouterr()
    assert len(text.out.splitlines()) == 14 and "14 records" in text.err
    assert "instances_received" in text.out and "PID-0001" in text.out and "40 instances" in text.out
    assert main(["audit", "--config", str(config), "--event", "query"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["audit", "--config", str(config), "--since", "someday"]) == 2


def test_pacsnode_audit_escapes_control_characters_peers_put_in_records(tmp_path, capsys, monkeypatch):
    """Found by review: an unauthenticated request to /dicomweb/studies/%1B%5B1G%1B%5B2K<forged line>... left its
    decoded path in a 401's record, and `pacsnode audit` wrote the escape sequences to the admin's terminal, which
    erased the line and showed a forged one (and set the window title). Every control and format character
    (C0, DEL, C1, bidi overrides) is shown escaped; JSON output is JSON."""
    for name in [k for k in __import__("os").environ if k.startswith("PACSNODE_")]:
        monkeypatch.delenv(name)
    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data}"\n')
    audit = trail(data)
    hostile = "/dicomweb/studies/\x1b[1G\x1b[2Kquery outcome=0\x1b]0;pwned\x07\x9b8m\u202eevil/series"
    audit.auth_failed(surface="dicomweb", reason="missing", peer="10.0.0.9", path=hostile)
    audit.close()
    assert main(["audit", "--config", str(config), "--since", "1h"]) == 0
    out = capsys.readouterr().out
    assert "auth_failed" in out and "pwned" in out  # shown, harmlessly
    assert not any(not c.isprintable() and c not in " \n" for c in out), repr(out)
    assert "\\x1b[1G" in out and "\\u202e" in out
    assert main(["audit", "--config", str(config), "--since", "1h", "--json"]) == 0
    out = capsys.readouterr().out
    assert not any(not c.isprintable() and c != "\n" for c in out), repr(out)  # C1 and bidi too (ASCII JSON)
    assert [json.loads(line)["event"] for line in out.splitlines()] == ["auth_failed", *["audit_log_used"] * 2]


def test_received_studies_from_a_real_index(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    index = Index(engine)
    ingestor = Ingestor(Spool(tmp_path / "spool"), index)
    a = write_ct_series(tmp_path / "a", slices=3, size=16, seed=1, patient_id="PID-A")
    b = write_ct_series(tmp_path / "b", slices=2, size=16, seed=2, patient_id="PID-B")
    from pydicom import dcmread

    for series, assoc in ((a, "assoc-1"), (b, "assoc-1"), (a, "assoc-2")):
        for path in series.paths[: 1 if assoc == "assoc-2" else None]:
            ds = dcmread(path)
            raw = path.read_bytes()
            ingestor.accept(raw[raw.index(b"DICM") + 4 + _meta_length(raw):], str(ds.file_meta.TransferSyntaxUID),
                            Origin(calling_ae="CT1", association_id=assoc))
    studies = {s.study_uid: s for s in received_studies(engine, "assoc-1")}
    # the one instance of a re-sent in assoc-2 is now that association's
    assert studies[a.study_uid].counts == {CT: 2} and studies[a.study_uid].patient_ids == {"PID-A"}
    assert studies[b.study_uid].counts == {CT: 2} and studies[b.study_uid].patient_ids == {"PID-B"}
    (again,) = received_studies(engine, "assoc-2")
    assert again.instances == 1
    engine.dispose()


def _meta_length(raw: bytes) -> int:
    """Bytes of the file meta group after 'DICM' (its group length element plus the value it announces)."""
    start = raw.index(b"DICM") + 4
    assert raw[start:start + 4] == b"\x02\x00\x00\x00"
    return 12 + int.from_bytes(raw[start + 8:start + 12], "little")


def test_the_trail_is_readable_by_owner_and_group_only_whatever_the_umask(tmp_path):
    """The trail holds patient IDs: under the usual umask 022 it was world-readable (0644), rotated files too."""
    old = os.umask(0o022)
    try:
        audit = trail(tmp_path / "fresh", rotate_bytes=1500)
        for _ in range(4):
            audit.application(started=True)
        audit.close()
    finally:
        os.umask(old)
    files = list(audit.path.parent.glob("audit*.jsonl"))
    assert len(files) >= 2  # rotated at least once
    for path in files:
        assert path.stat().st_mode & 0o077 == path.stat().st_mode & 0o070 & ~0o020, oct(path.stat().st_mode)
        assert path.stat().st_mode & 0o007 == 0
    assert audit.path.parent.stat().st_mode & 0o007 == 0
