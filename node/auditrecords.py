"""Audit records built on `node.audit.AuditTrail.emit` beyond the trail's own event methods: a STOW-RS request
that stored nothing, and the audit log read back (``pacsnode audit``).

  ==========================  =========================================  ===========================================
  function                    EventID (EventTypeCode)                    when
  ==========================  =========================================  ===========================================
  `StowRefusals.record`       110104 DICOM Instances Transferred (C,     a STOW-RS request answered 4xx/5xx (a 401:
                              outcome 4; 8 for a 5xx)                    `node.auth`), and how many past a burst
  `audit_log_used`            110101 Audit Log Used (R)                  ``pacsnode audit`` read the trail
  ==========================  =========================================  ===========================================

A refused C-STORE leaves its association's login and logout in the trail (who sent, from where); a STOW-RS request
refused as a whole (409 every part refused, 400, 413, 415, 503) left nothing, so a client probing or flooding the
node over HTTP was invisible there. Its record names who (the token's holder, or "anonymous") at which address,
the HTTP status and reason, the URL's study and the SOP classes of the refused parts. An address's first
`node.auth.RECORD_BURST` such requests per `node.auth.RECORD_WINDOW_SECONDS` are recorded one by one (the 401s'
`node.auth.Bursts`); past that they are counted, and the address's next one after the window first records how
many were not: ~1 KB a record, kept for good by default, must not grow without bound under a flood.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.auditevents import STUDY_UID, Ev, Outcome, Role, code, local_user, participant, uri_object
from node.auth import Bursts

if TYPE_CHECKING:
    from node.audit import AuditTrail

AUDIT_LOG_USED = code("110101", "DCM", "Audit Log Used")
SECURITY_AUDIT_LOG = "Security Audit Log"
_FAILED_SOP_SEQUENCE, _SOP_CLASS, _FAILURE_REASON = "00081198", "00081150", "00081197"


def refused_parts(answer: bytes) -> tuple[dict[str, int], list[str]]:
    """The SOP classes (with counts) and the distinct failure reasons (``0xA900``) a Store Instances Response in
    DICOM JSON names in its FailedSOPSequence; nothing for any other body."""
    try:
        items = json.loads(answer)[_FAILED_SOP_SEQUENCE]["Value"]
    except (ValueError, KeyError, TypeError):
        return {}, []
    classes: dict[str, int] = {}
    reasons: list[str] = []
    for item in items if isinstance(items, list) else []:
        try:
            sop_class = str(item.get(_SOP_CLASS, {}).get("Value", ["unknown"])[0] or "unknown")
            reason = f"0x{int(item[_FAILURE_REASON]['Value'][0]):04X}"
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            continue
        classes[sop_class] = classes.get(sop_class, 0) + 1
        reasons += [reason] if reason not in reasons else []
    return classes, reasons


def error_of(answer: bytes) -> str | None:
    """The ``error`` text of a JSON refusal (``{"error": ...}``), None for another body."""
    try:
        error = json.loads(answer).get("error")
    except (ValueError, AttributeError):
        return None
    return str(error) if error is not None else None


class StowRefusals:
    """The audit records of STOW-RS requests that stored nothing, one by one up to a burst per address."""

    def __init__(self, audit: AuditTrail | None) -> None:
        self.audit = audit
        self._bursts = Bursts()

    def record(self, *, status: int, answer: bytes, user: str, peer: str, path: str,
               study: str | None) -> Callable[[], None] | None:
        """What to write for a request answered ``status`` with body ``answer`` (what the client was told) from
        ``peer`` (its address, without the port): a blocking write (run it off the event loop; it never raises),
        or None when nothing is to be written (past the burst, the trail off). Cheap."""
        if self.audit is None or not self.audit.settings.enabled:
            return None
        one_by_one, unrecorded = self._bursts.take(peer, "stow-refused")
        if not (one_by_one or unrecorded):
            return None
        audit = self.audit
        return lambda: self._write(audit, status=status, answer=answer, user=user, peer=peer, path=path,
                                   study=study, one_by_one=one_by_one, unrecorded=unrecorded)

    @staticmethod
    def _write(audit: AuditTrail, *, status: int, answer: bytes, user: str, peer: str, path: str,
               study: str | None, one_by_one: bool, unrecorded: int) -> None:
        who = [participant(user, role=Role.SOURCE, requestor=True, address=peer), _node(audit)]
        if unrecorded:
            audit.emit(
                "stow_refusals_unrecorded",
                {"EventID": Ev.INSTANCES_TRANSFERRED, "EventActionCode": "C",
                 "EventOutcomeIndicator": Outcome.MINOR_FAILURE,
                 "EventOutcomeDescription": f"{unrecorded} more STOW-RS requests that stored nothing, "
                                            "not recorded one by one"},
                who, [uri_object("3", path[:256])])
        if not one_by_one:
            return
        classes, reasons = refused_parts(answer)
        why = f"{sum(classes.values())} instances refused ({', '.join(reasons)})" if classes else \
            error_of(answer) or "refused"
        sop_classes = {"ParticipantObjectDescription": {"SOPClass": [
            {"UID": uid, "NumberOfInstances": n} for uid, n in sorted(classes.items())]}} if classes else {}
        objects = [uri_object("3", path[:256], **sop_classes)]  # the request's path; the refused parts' classes
        if study is not None:  # the URL's study (a 409's parts may name others: their UIDs were never trusted)
            objects.insert(0, {"ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3",
                               "ParticipantObjectIDTypeCode": STUDY_UID, "ParticipantObjectID": study})
        audit.emit(
            "stow_refused",
            {"EventID": Ev.INSTANCES_TRANSFERRED, "EventActionCode": "C",
             "EventOutcomeIndicator": Outcome.SERIOUS_FAILURE if status >= 500 else Outcome.MINOR_FAILURE,
             "EventOutcomeDescription": f"STOW-RS answered {status}: {why}"[:500]},
            who, objects,
        )


def audit_log_used(audit: AuditTrail, *, query: dict[str, Any]) -> None:
    """110101 Audit Log Used (action R, PS3.15 A.5.3.2): the trail (its URI) read back by the OS user this process
    runs as (``pacsnode audit``; `local_user`, its uid as the alternative ID); ``query``: what was asked (since,
    events). Never raises."""
    audit.emit(
        "audit_log_used",
        {"EventID": AUDIT_LOG_USED, "EventActionCode": "R", "EventOutcomeIndicator": Outcome.SUCCESS},
        [_node(audit, Role.APPLICATION),
         participant(local_user(), role=Role.LAUNCHER, requestor=True, alternative=str(os.getuid()))],
        [uri_object("13", Path(os.path.abspath(audit.path)).as_uri(), ParticipantObjectName=SECURITY_AUDIT_LOG)],
        context=query,
    )


def _node(audit: AuditTrail, role: dict[str, str] = Role.DESTINATION) -> dict[str, Any]:
    return participant(audit.ae_title, role=role, requestor=False, alternative=str(os.getpid()))


__all__ = ["AUDIT_LOG_USED", "StowRefusals", "audit_log_used", "error_of", "refused_parts"]
