"""The audit trail: who sent, queried, exported and reconfigured what, as IHE ATNA-style records (the DICOM
PS3.15 A.5 audit message, written as JSON), appended to their own file and optionally sent to syslog (RFC 5424).

`AuditTrail(settings, data_dir, ae_title=...)` appends one JSON object per line to ``[audit] path`` (default
``<data_dir>/audit/audit.jsonl``), flushed per record under a lock (safe from any thread), rotated by size and by
UTC day to ``audit-<UTC time>.jsonl`` beside it. Several processes may write one trail (each child under
``process_model = "processes"``): before each write a writer whose open file is no longer the one at ``path``
(another rotated it) opens ``path`` afresh. Its event methods build the records (codes and participant builders
in `node.auditevents`):

  ==========================  =========================================  ===========================================
  method                      EventID (EventTypeCode)                    when
  ==========================  =========================================  ===========================================
  `application`               110100 Application Activity (start/stop)   node start and stop
  `association_started` ...   110114 User Authentication (login/logout)  DIMSE association accepted, rejected, closed
  `instances_received`        110104 DICOM Instances Transferred         per study, at association close / per STOW
                                                                         (or at restart, for one left open)
  `query`                     110112 Query                               each QIDO-RS request
  `exported`                  110106 Export                              results delivered to a destination
  `config_changed`            110113 Security Alert (110131 Software     config reload, applied or refused
                              Configuration)
  `auth_failed`               110114 User Authentication (login, 4)      HTTP request refused 401
  `failures_unrecorded`       110114 User Authentication (login, 4)      how many such failures past a burst
  `tls_handshake_failed`      110114 User Authentication (login, 4)      DICOM TLS handshake failed (each one)
  `study_deleted`             110105 DICOM Study Deleted (D; 110103      retention purged a study's instances
                              Instances Accessed, D, when some remain)
  `dead_letters_replayed`     110100 Application Activity                ``pacsnode retry``, ``POST /admin/retry``
  ==========================  =========================================  ===========================================
More, built on `emit`, in `node.auditrecords` (STOW-RS requests that stored nothing; 110101 Audit Log Used).
`emit` never raises: a failing write logs ``audit_write_failed`` and counts ``pacsnode_audit_failures``, and the
data path goes on. This file and its syslog copy are the only places patient identifiers appear (the patient
participant object, as ATNA requires); counts and UIDs are recorded, never pixel data. `read_records(path,
since)` reads the file and its rotated predecessors back (``pacsnode audit``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from node.auditevents import (  # noqa: F401 - Outcome, StudySummary, patient_id_of: their old import path
    Ev,
    Outcome,
    Role,
    StudySummary,
    code,
    local_user,
    open_trail,
    participant,
    patient_id_of,
    study_objects,
    uri_object,
)
from node.config import AuditSection
from node.logs import get_logger
from node.syslog import Severity, SyslogSender, format_message

DEFAULT_FILE = Path("audit") / "audit.jsonl"  # under data_dir


class AuditTrail:
    """The node's audit writer. ``on_failure(sink)`` is told of each lost record (e.g. `Metrics.audit_failure`);
    ``clock`` returns epoch seconds. With ``settings.enabled`` false every method is a no-op."""

    def __init__(self, settings: AuditSection, data_dir: Path, *, ae_title: str,
                 on_failure: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.path = self.file_for(settings, data_dir)
        self.spool_root = Path(data_dir) / "spool"  # where this process's index paths are relative to (node.spools)
        self.ae_title = ae_title
        self.hostname = socket.gethostname()
        self._on_failure = on_failure
        self._clock = clock
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._day: dt.date | None = None
        self._log = get_logger(component="audit")
        self._syslog: SyslogSender | None = None
        if settings.enabled and settings.syslog_host:
            self._syslog = SyslogSender.from_settings(settings, on_error=lambda reason: self._failed("syslog", reason))

    @staticmethod
    def file_for(settings: AuditSection, data_dir: Path) -> Path:
        """The audit file: ``[audit] path`` (relative to ``data_dir``), default ``<data_dir>/audit/audit.jsonl``."""
        path = settings.path or DEFAULT_FILE
        return path if path.is_absolute() else Path(data_dir) / path

    # -- writing ------------------------------------------------------------------------------------------------
    def emit(self, event: str, ident: dict[str, Any], participants: list[dict[str, Any]],
             objects: list[dict[str, Any]] | None = None, context: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Build, append and (if configured) send one record; returns it (None when disabled). Never raises."""
        if not self.settings.enabled:
            return None
        try:
            now = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
            record: dict[str, Any] = {
                "event": event,
                "EventIdentification": {"EventDateTime": now.isoformat(timespec="microseconds"), **ident},
                "ActiveParticipant": participants,
                "AuditSourceIdentification": [{
                    "AuditSourceID": f"{self.ae_title}@{self.hostname}",
                    **({"AuditEnterpriseSiteID": self.settings.site_id} if self.settings.site_id else {}),
                    "AuditSourceTypeCode": [code("4", "DCM", "Application Server")],
                }],
            }
            if objects:
                record["ParticipantObjectIdentification"] = objects
            if context:
                record["pacsnode"] = context  # ids that join the record to the node's log (no PHI)
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
        except Exception as exc:  # noqa: BLE001 - a bad value in a record must not reach the caller
            self._failed("file", f"record not built: {type(exc).__name__}")
            return None
        self._write(line, now)
        if self._syslog is not None:
            outcome = int(ident.get("EventOutcomeIndicator", 0))
            try:
                self._syslog.send(format_message(
                    line, facility=self.settings.syslog_facility,
                    severity=Severity.NOTICE if outcome == 0 else Severity.WARNING, timestamp=now,
                    hostname=self.hostname, msgid=event,
                    params={"eventID": ident["EventID"]["csd-code"], "outcome": str(outcome)},
                ))
            except Exception as exc:  # noqa: BLE001 - a syslog failure is counted, never raised to the audited action
                self._failed("syslog", type(exc).__name__)
        return record

    def _write(self, line: str, now: dt.datetime) -> None:
        with self._lock:
            try:
                self._drop_if_replaced()
                self._rotate_if_due(now, len(line) + 1)
                if self._file is None:
                    self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
                    existing = _file_day(self.path)  # a file left by an earlier run keeps its day; a new one: now's
                    fd = open_trail(self.path)  # 0640, the trail owner's, never through a symbolic link
                    self._file = os.fdopen(fd, "ab", buffering=0)  # one write(2) per record, shared with others
                    self._day = existing or now.date()
                data = (line + "\n").encode("utf-8")
                if _torn(self._file.fileno()):  # a write cut short (ENOSPC) left a partial line: end it first
                    data = b"\n" + data
                if self._file.write(data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as exc:
                self._close_file()
                self._failed("file", exc.strerror or type(exc).__name__)

    def _drop_if_replaced(self) -> None:
        """Close the open file when ``path`` no longer names it: another process writing the same trail (each
        child under ``process_model = "processes"``) rotated it, or it was removed. Writing on through the old
        handle would grow the rotated file without bound; the next write opens ``path`` afresh."""
        if self._file is None:
            return
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            self._close_file()
            return
        mine = os.fstat(self._file.fileno())
        if (mine.st_ino, mine.st_dev) != (current.st_ino, current.st_dev):
            self._close_file()

    def _rotate_if_due(self, now: dt.datetime, adding: int) -> None:
        if not self.path.exists():
            self._close_file()
            return
        size = self.path.stat().st_size
        if size == 0:
            return
        day = self._day or _file_day(self.path)
        by_size = self.settings.rotate_bytes and size + adding > self.settings.rotate_bytes
        by_day = self.settings.rotate_daily and day is not None and day != now.date()
        if not (by_size or by_day):
            return
        self._close_file()
        stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path.with_name(f"{self.path.stem}-{stamp}{self.path.suffix}")
        n = 0
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.stem}-{stamp}-{n}{self.path.suffix}")
        with contextlib.suppress(FileNotFoundError):  # another writer of this trail rotated it a moment ago
            os.replace(self.path, target)
        if self.settings.keep_days:
            self._expire(now)

    def _expire(self, now: dt.datetime) -> None:
        """Delete rotated files whose newest record is older than ``keep_days`` (their modification time)."""
        cutoff = now.timestamp() - self.settings.keep_days * 86400
        for old in audit_files(self.path):
            if old == self.path:
                continue
            with contextlib.suppress(FileNotFoundError):  # another writer of this trail expired it a moment ago
                if old.stat().st_mtime < cutoff:
                    old.unlink()
                    self._log.info("audit_file_expired", file=old.name, keep_days=self.settings.keep_days)

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            self._day = None

    def _failed(self, sink: str, reason: str) -> None:
        self._log.error("audit_write_failed", sink=sink, reason=reason)
        if self._on_failure is not None:
            try:
                self._on_failure(sink)
            except Exception:  # noqa: BLE001 - the failure counter must not break auditing
                self._log.exception("audit_failure_counter_failed")

    def emit_failed(self, sink: str, reason: str) -> None:
        """A record that could not even be built (its inputs failed): logged and counted like a lost write."""
        self._failed(sink, reason)

    def close(self) -> None:
        with self._lock:
            self._close_file()
        if self._syslog is not None:
            self._syslog.close()

    # -- the events -----------------------------------------------------------------------------------------------
    def _node(self, role: dict[str, str], requestor: bool = False) -> dict[str, Any]:
        return participant(self.ae_title, role=role, requestor=requestor, alternative=str(os.getpid()))

    def _from_peer(self, user: str, peer: str) -> list[dict[str, Any]]:
        """The active participants of a request a peer made of the node: ``user`` at ``peer`` (the requesting
        source), then the node (the destination)."""
        return [participant(user, role=Role.SOURCE, requestor=True, address=peer), self._node(Role.DESTINATION)]

    def _launched_locally(self) -> list[dict[str, Any]]:
        """The active participants of something done to the node itself: the node (the application), then the
        local user this process runs as (the launcher, the requestor)."""
        return [self._node(Role.APPLICATION), participant(local_user(), role=Role.LAUNCHER, requestor=True)]

    def application(self, started: bool) -> None:
        """110100 Application Activity: the node started or stopped."""
        self.emit(
            "application_started" if started else "application_stopped",
            {"EventID": Ev.APPLICATION_ACTIVITY, "EventActionCode": "E", "EventOutcomeIndicator": Outcome.SUCCESS,
             "EventTypeCode": [Ev.APPLICATION_START if started else Ev.APPLICATION_STOP]},
            self._launched_locally(),
        )

    def association_started(self, *, assoc_id: str, calling_ae: str, called_ae: str, peer: str) -> None:
        """110114 User Authentication / Login: a DIMSE association was accepted (the AE is the user)."""
        self._association("association_started", Ev.LOGIN, Outcome.SUCCESS, "association accepted",
                          assoc_id, calling_ae, called_ae, peer)

    def association_rejected(self, *, calling_ae: str, called_ae: str, peer: str, why: str | None = None) -> None:
        """110114 User Authentication / Login, minor failure: an association was refused (AE not allowed; ``why``:
        another reason, a certificate that does not match the calling AE title, node.tls.calling_ae_refusal)."""
        why = (why or "calling or called AE title not accepted")[:200]
        self._association("association_rejected", Ev.LOGIN, Outcome.MINOR_FAILURE, f"association rejected ({why})",
                          None, calling_ae, called_ae, peer)

    def tls_handshake_failed(self, *, peer: str, reason: str, over: str = "DICOM TLS") -> None:
        """110114 User Authentication / Login, minor failure: a DICOM TLS peer's handshake failed (no client
        certificate, one that does not verify, an outdated protocol; ``over`` "HTTPS": node.httpguard's)."""
        self.emit(
            "tls_handshake_failed",
            {"EventID": Ev.USER_AUTHENTICATION, "EventActionCode": "E", "EventOutcomeIndicator": Outcome.MINOR_FAILURE,
             "EventOutcomeDescription": f"{over} handshake failed: {reason}"[:500], "EventTypeCode": [Ev.LOGIN]},
            self._from_peer("unknown", peer),
        )

    def association_ended(self, *, assoc_id: str, calling_ae: str, called_ae: str, peer: str, state: str) -> None:
        """110114 User Authentication / Logout: an association was released or aborted."""
        self._association("association_ended", Ev.LOGOUT, Outcome.SUCCESS, f"association {state}",
                          assoc_id, calling_ae, called_ae, peer)

    def _association(self, event: str, kind: dict[str, str], outcome: int, text: str, assoc_id: str | None,
                     calling_ae: str, called_ae: str, peer: str) -> None:
        self.emit(
            event,
            {"EventID": Ev.USER_AUTHENTICATION, "EventActionCode": "E", "EventOutcomeIndicator": outcome,
             "EventOutcomeDescription": text, "EventTypeCode": [kind]},
            [participant(calling_ae, role=Role.SOURCE, requestor=True, address=peer),
             participant(called_ae, role=Role.DESTINATION, requestor=False)],
            context={"association_id": assoc_id} if assoc_id else None,
        )

    def instances_received(self, *, studies: Sequence[StudySummary], source_user: str, peer: str,
                           context: dict[str, Any], outcome: int = Outcome.SUCCESS) -> None:
        """110104 DICOM Instances Transferred (action C): one record per study a sender stored."""
        for study in studies:
            self.emit(
                "instances_received",
                {"EventID": Ev.INSTANCES_TRANSFERRED, "EventActionCode": "C", "EventOutcomeIndicator": outcome},
                self._from_peer(source_user, peer),
                study_objects([study]),
                context={**context, "instances": study.instances},
            )

    def study_deleted(self, *, study: StudySummary, whole: bool, scheduled: bool, context: dict[str, Any]) -> None:
        """110105 DICOM Study Deleted (action D): the node deleted ``study``'s received instances (retention), one
        record per study with its study and patient objects (PS3.15 A.5.3.8). ``whole`` false: instances of it
        remain, so 110103 DICOM Instances Accessed (action D), as A.5.3.6 asks for a partial deletion.
        ``scheduled``: the node's own retention loop did it (the node is the requestor); otherwise someone ran it,
        and the OS user this process runs as is recorded as the requestor."""
        self.emit(
            "study_deleted" if whole else "instances_deleted",
            {"EventID": Ev.STUDY_DELETED if whole else Ev.INSTANCES_ACCESSED, "EventActionCode": "D",
             "EventOutcomeIndicator": Outcome.SUCCESS},
            [self._node(Role.APPLICATION, requestor=True)] if scheduled else self._launched_locally(),
            study_objects([study]),
            context={**context, "instances": study.instances},
        )

    def dead_letters_replayed(self, *, via: str, deliveries: int, jobs: int, context: dict[str, Any],
                              user: str | None = None, peer: str | None = None) -> None:
        """110100 Application Activity (action E): dead deliveries and jobs queued again (a data replay) — by
        ``user`` at ``peer`` (``POST /admin/retry``: the token's holder), or by the OS user (``pacsnode retry``)."""
        who = ([self._node(Role.APPLICATION), participant(user, role=Role.LAUNCHER, requestor=True, address=peer)]
               if user is not None else self._launched_locally())
        self.emit(
            "dead_letters_replayed",
            {"EventID": Ev.APPLICATION_ACTIVITY, "EventActionCode": "E", "EventOutcomeIndicator": Outcome.SUCCESS,
             "EventOutcomeDescription": f"{via}: {deliveries} deliveries and {jobs} jobs queued again"},
            who, context=context,
        )

    def query(self, *, user: str, peer: str, path: str, query_string: str, matches: int | None,
              outcome: int) -> None:
        """110112 Query (action E): a QIDO-RS request, its query string kept base64 as the schema asks."""
        detail = [{"type": "QueryEncoding", "value": "UTF-8"}]
        if matches is not None:
            detail.append({"type": "NumberOfMatches", "value": str(matches)})
        self.emit(
            "query",
            {"EventID": Ev.QUERY, "EventActionCode": "E", "EventOutcomeIndicator": outcome},
            self._from_peer(user, peer),
            [uri_object("24", path[:256],
                         ParticipantObjectQuery=base64.b64encode(query_string.encode("utf-8")).decode("ascii"),
                         ParticipantObjectDetail=detail)],
        )

    def exported(self, *, destination: str, destination_user: str, destination_address: str | None,
                 studies: Sequence[StudySummary], context: dict[str, Any]) -> None:
        """110106 Export (action R): result objects delivered to a destination."""
        self.emit(
            "exported",
            {"EventID": Ev.EXPORT, "EventActionCode": "R", "EventOutcomeIndicator": Outcome.SUCCESS},
            [self._node(Role.SOURCE, requestor=True),
             participant(destination_user, role=Role.DESTINATION, requestor=False, address=destination_address,
                          alternative=destination)],
            study_objects(studies),
            context=context,
        )

    def config_changed(self, *, source: str | None, applied: bool, reason: str, needs_restart: Sequence[str] = ()) -> None:
        """110113 Security Alert / Software Configuration: a config reload, applied (0) or refused (4)."""
        detail = [{"type": "NeedsRestart", "value": ",".join(needs_restart)}] if needs_restart else []
        digest = _sha256(source)
        if digest:
            detail.append({"type": "SHA256", "value": digest})
        self.emit(
            "config_reloaded" if applied else "config_reload_refused",
            {"EventID": Ev.SECURITY_ALERT, "EventActionCode": "E",
             "EventOutcomeIndicator": Outcome.SUCCESS if applied else Outcome.MINOR_FAILURE,
             "EventOutcomeDescription": reason[:500], "EventTypeCode": [Ev.SOFTWARE_CONFIGURATION]},
            self._launched_locally(),
            [uri_object("13", source or "(unknown)", ParticipantObjectDetail=detail)],
        )

    def failures_unrecorded(self, *, what: str, peer: str, count: int) -> None:
        """110114 Login, minor failure: ``count`` more ``what`` from ``peer``, past a burst (node.refusals, node.auth)."""
        self.emit(
            "failures_unrecorded",
            {"EventID": Ev.USER_AUTHENTICATION, "EventActionCode": "E", "EventOutcomeIndicator": Outcome.MINOR_FAILURE,
             "EventOutcomeDescription": f"{count} more {what}, not recorded one by one", "EventTypeCode": [Ev.LOGIN]},
            self._from_peer("unknown", peer))

    def auth_failed(self, *, surface: str, reason: str, peer: str, path: str) -> None:
        """110114 User Authentication / Login, minor failure: an HTTP request without the right token."""
        self.emit(
            "auth_failed",
            {"EventID": Ev.USER_AUTHENTICATION, "EventActionCode": "E", "EventOutcomeIndicator": Outcome.MINOR_FAILURE,
             "EventOutcomeDescription": f"{surface}: bearer token {reason}", "EventTypeCode": [Ev.LOGIN]},
            self._from_peer("unknown", peer),
            [uri_object("13", path[:256])],
        )


def _sha256(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _torn(fd: int) -> bool:
    """Whether the file open on ``fd`` ends inside a line: a record whose write was cut short (disk full). The next
    record then starts on a new line, or it would be glued to the fragment and unreadable too."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"

def _file_day(path: Path) -> dt.date | None:
    try:
        return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).date()
    except OSError:
        return None


# -- reading back ----------------------------------------------------------------------------------------------------
def record_time(record: dict[str, Any]) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(record["EventIdentification"]["EventDateTime"])
    except (KeyError, TypeError, ValueError):
        return None


def audit_files(path: Path) -> list[Path]:
    """The current audit file and its rotated predecessors, oldest first."""
    # Only names `_rotate_if_due` gives (stem-YYYYMMDDTHHMMSSffffffZ[-n]): an export an admin left beside the trail
    # (audit-export.jsonl) is neither read as part of it nor expired by keep_days.
    rotated = re.compile(re.escape(path.stem) + r"-\d{8}T\d{12}Z(-\d+)?" + re.escape(path.suffix))
    found = path.parent.glob(f"{path.stem}-*{path.suffix}") if path.parent.is_dir() else []
    rotated_files = sorted(p for p in found if rotated.fullmatch(p.name) and not p.is_symlink())  # never followed
    return [*rotated_files, *([path] if path.exists() and not path.is_symlink() else [])]


def read_records(path: Path, since: dt.datetime | None = None) -> Iterator[dict[str, Any]]:
    """Records at or after ``since`` (aware datetime), oldest first; lines that do not parse are skipped."""
    for file in audit_files(path):
        if since is not None and file != path:
            mtime = dt.datetime.fromtimestamp(file.stat().st_mtime, dt.UTC)
            if mtime < since:
                continue  # last written before the window
        with file.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                when = record_time(record)
                if since is None or (when is not None and when >= since):
                    yield record


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``--since``: a span back from now (``90s``, ``15m``, ``1h``, ``2d``) or an ISO date/time (UTC unless it
    says otherwise). Raises ValueError."""
    now = now or dt.datetime.now(dt.UTC)
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return now - dt.timedelta(seconds=float(text[:-1]) * units[text[-1]])
    when = dt.datetime.fromisoformat(text)
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _printable(text: str) -> str:
    """``text`` for a terminal: control characters (C0, DEL, C1), and the bidirectional and other format controls
    that reorder or hide text, as ``\\xNN``/``\\uNNNN``. A record's values come from peers (a request path, an AE
    title): an escape sequence in one rewrote what ``pacsnode audit`` showed (found by review)."""
    return "".join(c if c.isprintable() or c == " " else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   for c in text)


def summary_line(record: dict[str, Any]) -> str:
    """One human line per record for ``pacsnode audit``, every control character in it escaped (`_printable`)."""
    return _printable(_summary(record))


def _summary(record: dict[str, Any]) -> str:
    ident = record.get("EventIdentification", {})
    who = [f"{p.get('UserID')}@{p.get('NetworkAccessPointID')}" if p.get("NetworkAccessPointID") else p.get("UserID")
           for p in record.get("ActiveParticipant", [])]
    objects = [
        f"{'patient' if o.get('ParticipantObjectTypeCode') == '1' else 'object'} {o.get('ParticipantObjectID')}"
        + (f" ({sum(c.get('NumberOfInstances', 0) for c in o['ParticipantObjectDescription'].get('SOPClass', []))} instances)"
           if "ParticipantObjectDescription" in o else "")
        for o in record.get("ParticipantObjectIdentification", [])
    ]
    return (f"{ident.get('EventDateTime', '?')}  {record.get('event', '?'):<22} "
            f"{ident.get('EventID', {}).get('csd-code', '?')} outcome={ident.get('EventOutcomeIndicator', '?')} "
            f"{' -> '.join(str(w) for w in who)}"
            + (f"  [{ident['EventOutcomeDescription']}]" if ident.get("EventOutcomeDescription") else "")
            + (f"  {'; '.join(objects)}" if objects else ""))


__all__ = ["AuditTrail", "StudySummary", "parse_since", "read_records"]
