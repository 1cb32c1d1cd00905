"""What the audit trail reads from the node's tables: the studies an association or STOW request stored (also for
associations found open at restart, whose process died), the studies a retention purge deletes, and the objects a
delivery sent — as `StudySummary` (instance counts by SOP class, the patient ID read from one stored
file per study). Read after the fact, off the acknowledgement path; a failure yields no summary, never an error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa
from pydicom import dcmread
from sqlalchemy.engine import Engine

from node.audit import AuditTrail, StudySummary, patient_id_of
from node.config import DestinationKind, NodeConfig
from node.db import reading
from node.index import DanglingAssociation
from node.logs import get_logger
from node.schema import instances
from node.states import AssociationState

log = get_logger(component="audit")


def received_studies(engine: Engine, association_id: str, spool_root: Path | None = None) -> list[StudySummary]:
    """The studies whose instances were last stored by ``association_id`` (an association or STOW request id);
    ``spool_root``: the spool of the process that stored them, which relative index paths are under (node.spools;
    an absolute path from before spool ids stays as it is). The patient is read from one file of each series: a
    study whose series belong to different patients (mis-merged) names each of them."""
    i = instances.c
    with reading(engine, "audit summary") as conn:
        rows = list(conn.execute(
            sa.select(i.study_uid, i.series_uid, i.sop_class_uid, sa.func.count(), sa.func.min(i.path))
            .where(i.association_id == association_id)
            .group_by(i.study_uid, i.series_uid, i.sop_class_uid)
            .order_by(i.study_uid, i.series_uid, i.sop_class_uid)
        ))
    studies: dict[str, StudySummary] = {}
    read: set[str] = set()  # series whose patient was read
    for study_uid, series_uid, sop_class_uid, n, path in rows:
        study = studies.setdefault(study_uid, StudySummary(study_uid))
        study.counts[sop_class_uid] = study.counts.get(sop_class_uid, 0) + int(n)
        if series_uid not in read and path:
            read.add(series_uid)
            patient = patient_id_of(spool_root / path if spool_root is not None else path)
            if patient:
                study.patient_ids.add(patient)
    return list(studies.values())


def delivered_studies(engine: Engine, series_uid: str, version: int, destination: str) -> tuple[list[StudySummary], int]:
    """The studies (with SOP class counts and patients) of the result objects one delivery sent, and the number of
    files it sent. Each file's header is read (never its pixel data)."""
    # Imported here: node.dispatch imports node.dimse (through the senders), which imports this module.
    from node.schema import deliveries

    d = deliveries.c
    with reading(engine, "audit summary") as conn:
        row = conn.execute(
            sa.select(d.files).where(d.series_uid == series_uid, d.version == version, d.destination == destination)
        ).first()
    if row is None:
        return [], 0
    files = [Path(p) for p in json.loads(row.files)]
    studies: dict[str, StudySummary] = {}
    for path in files:
        try:
            ds = dcmread(str(path), stop_before_pixels=True,
                         specific_tags=["SOPClassUID", "StudyInstanceUID", "PatientID"])
        except Exception:  # noqa: BLE001 - a result purged or unreadable: counted under an unknown study
            unknown = studies.setdefault("", StudySummary(""))
            unknown.counts["unknown"] = unknown.counts.get("unknown", 0) + 1
            continue
        study_uid = str(ds.get("StudyInstanceUID", ""))
        study = studies.setdefault(study_uid, StudySummary(study_uid))
        sop_class = str(ds.get("SOPClassUID", "unknown"))
        study.counts[sop_class] = study.counts.get(sop_class, 0) + 1
        patient = str(ds.get("PatientID", "") or "").strip()[:64]
        if patient:
            study.patient_ids.add(patient)
    return list(studies.values()), len(files)




def audit_received(audit: AuditTrail | None, engine: Engine, association_id: str, *, source_user: str, peer: str,
                   context: dict[str, Any]) -> None:
    """Write the 110104 records of what ``association_id`` stored (one per study); never raises."""
    if audit is None or not audit.settings.enabled:
        return
    try:
        studies = received_studies(engine, association_id, getattr(audit, "spool_root", None))
    except Exception:
        log.exception("audit_summary_failed", association_id=association_id)
        audit.emit_failed("file", "received studies not read")
        return
    audit.instances_received(studies=studies, source_user=source_user, peer=peer, context=context)


def audit_association_closed(audit: AuditTrail | None, engine: Engine, association_id: str, *, calling_ae: str,
                             called_ae: str, peer: str, state: str) -> None:
    """At a DIMSE association's end: what it stored (110104 per study), then its logout (110114); never raises."""
    if audit is None:
        return
    audit_received(audit, engine, association_id, source_user=calling_ae, peer=peer,
                   context={"association_id": association_id, "called_ae": called_ae})
    audit.association_ended(assoc_id=association_id, calling_ae=calling_ae, called_ae=called_ae, peer=peer,
                            state=state)


def audit_dangling_closed(audit: AuditTrail | None, engine: Engine, closed: Sequence[DanglingAssociation], *,
                          stow_user: str | None = None) -> None:
    """At start-up, for each association a process left open when it died (`Index.abort_dangling_associations`):
    the records its close would have written — what it stored (110104 per study, so instances acknowledged before
    the crash have their receipt) and its logout (110114, "aborted (found open at restart)"). A STOW-RS request's
    row gets the receipt its request would have written, naming ``stow_user`` (the token's holder,
    `node.auth.Authenticator.user`), and no logout: an HTTP request has none. Never raises."""
    for assoc in closed:
        if assoc.stow:
            audit_received(audit, engine, assoc.id, source_user=stow_user or assoc.calling_ae, peer=assoc.peer,
                           context={"request_id": assoc.id, "front_door": "STOW-RS", "found_open_at_restart": True})
            continue
        audit_association_closed(audit, engine, assoc.id, calling_ae=assoc.calling_ae, called_ae=assoc.called_ae,
                                 peer=assoc.peer, state=f"{AssociationState.ABORTED} (found open at restart)")


def audit_purged(audit: AuditTrail | None, engine: Engine, studies: Sequence[StudySummary],
                 series_of: dict[str, list[str]], *, scheduled: bool) -> None:
    """After a retention purge: one record per study whose received instances it deleted — 110105 DICOM Study
    Deleted, or 110103 (action D) where instances of the study remain in the index; ``series_of``: the series
    purged of each study (joins the record to the ``retention_purged`` log). Never raises."""
    if audit is None or not audit.settings.enabled or not studies:
        return
    i = instances.c
    uids = [s.study_uid for s in studies]
    remaining: set[str] = set()
    try:
        with reading(engine, "audit summary") as conn:
            for start in range(0, len(uids), 500):
                remaining.update(str(uid) for (uid,) in conn.execute(
                    sa.select(i.study_uid).where(i.study_uid.in_(uids[start:start + 500])).distinct()))
    except Exception:  # noqa: BLE001 - the deletion happened: record it as a study deleted rather than not at all
        log.exception("audit_summary_failed", studies=len(uids))
    for study in studies:
        audit.study_deleted(study=study, whole=study.study_uid not in remaining, scheduled=scheduled,
                            context={"series": series_of.get(study.study_uid, [])})


def audit_export(audit: AuditTrail | None, engine: Engine, config: NodeConfig, series_uid: str, version: int,
                 destination: str) -> None:
    """The 110106 record of one delivered result set (`Dispatcher`'s ``on_delivered``); never raises."""
    if audit is None or not audit.settings.enabled:
        return
    try:
        studies, files = delivered_studies(engine, series_uid, version, destination)
    except Exception:
        log.exception("audit_summary_failed", series_uid=series_uid, destination=destination)
        audit.emit_failed("file", "delivered objects not read")
        return
    dest = next((d for d in config.destinations if d.name == destination), None)
    address: str | None
    if dest is not None and dest.kind is DestinationKind.DIMSE:
        user, address = str(dest.ae_title), dest.host
    elif dest is not None:
        user, address = _strip_credentials(str(dest.url)), urlsplit(str(dest.url)).hostname
    else:
        user, address = destination, None
    audit.exported(destination=destination, destination_user=user, destination_address=address, studies=studies,
                   context={"series_uid": series_uid, "version": version, "objects": files})


def _strip_credentials(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


__all__ = ["audit_association_closed", "audit_dangling_closed", "audit_export", "audit_purged", "audit_received", "delivered_studies", "received_studies"]
