"""The vocabulary of the audit records (DICOM PS3.15 A.5, codes from PS3.16 CID 400-403): coded values, event and
role codes, outcomes, and the builders of active participants and participant objects that `node.audit`'s event
methods put together. No I/O here beyond reading one stored file's PatientID (`patient_id_of`) and giving a trail
file root made to the trail's owner (`open_trail`, `give_to_trail_owner`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PATIENT_ID_MAX = 64


def code(value: str, system: str, text: str) -> dict[str, str]:
    """A coded value as the DICOM audit schema spells it (csd-code, codeSystemName, originalText)."""
    return {"csd-code": value, "codeSystemName": system, "originalText": text}


class Ev:
    """Event IDs and type codes (PS3.16 CID 400-403)."""

    APPLICATION_ACTIVITY = code("110100", "DCM", "Application Activity")
    INSTANCES_ACCESSED = code("110103", "DCM", "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = code("110104", "DCM", "DICOM Instances Transferred")
    STUDY_DELETED = code("110105", "DCM", "DICOM Study Deleted")
    EXPORT = code("110106", "DCM", "Export")
    QUERY = code("110112", "DCM", "Query")
    SECURITY_ALERT = code("110113", "DCM", "Security Alert")
    USER_AUTHENTICATION = code("110114", "DCM", "User Authentication")
    APPLICATION_START = code("110120", "DCM", "Application Start")
    APPLICATION_STOP = code("110121", "DCM", "Application Stop")
    LOGIN = code("110122", "DCM", "Login")
    LOGOUT = code("110123", "DCM", "Logout")
    SOFTWARE_CONFIGURATION = code("110131", "DCM", "Software Configuration")


class Role:
    APPLICATION = code("110150", "DCM", "Application")
    LAUNCHER = code("110151", "DCM", "Application Launcher")
    DESTINATION = code("110152", "DCM", "Destination Role ID")
    SOURCE = code("110153", "DCM", "Source Role ID")


STUDY_UID = code("110180", "DCM", "Study Instance UID")
PATIENT_NUMBER = code("2", "RFC-3881", "Patient Number")
URI = code("12", "RFC-3881", "URI")


class Outcome:
    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8


@dataclass
class StudySummary:
    """What one sender sent of one study (or what one purge deleted of it): instance counts by SOP class, and the
    patient it belongs to."""

    study_uid: str
    counts: dict[str, int] = field(default_factory=dict)  # SOP class UID -> instances
    patient_ids: set[str] = field(default_factory=set)

    @property
    def instances(self) -> int:
        return sum(self.counts.values())


def patient_id_of(path: str | Path) -> str | None:
    """The PatientID of a stored Part 10 file (header only); None when absent or unreadable."""
    from pydicom import dcmread

    try:
        ds = dcmread(str(path), stop_before_pixels=True, specific_tags=["PatientID"])
        value = str(ds.get("PatientID", "") or "").strip()
    except Exception:  # noqa: BLE001 - an unreadable file costs the audit record its patient object, nothing else
        return None
    return value[:PATIENT_ID_MAX] or None


def participant(user: str, *, role: dict[str, str], requestor: bool, address: str | None = None,
                alternative: str | None = None) -> dict[str, Any]:
    """An ActiveParticipant; ``address`` ("host" or "host:port") becomes its network access point (host only)."""
    out: dict[str, Any] = {"UserID": user, "UserIsRequestor": requestor, "RoleIDCode": [role]}
    if alternative:
        out["AlternativeUserID"] = alternative
    if address:
        host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
        out["NetworkAccessPointTypeCode"] = "2" if _is_ip(host) else "1"
        out["NetworkAccessPointID"] = host
    return out


def uri_object(role: str, uri: str, **more: Any) -> dict[str, Any]:
    """A participant object that is a URI (an HTTP path, a config file) in ``role`` (RFC 3881 object role code);
    ``more``: further fields, after the four."""
    return {"ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": role,
            "ParticipantObjectIDTypeCode": URI, "ParticipantObjectID": uri, **more}


def local_user() -> str:
    """The OS user this process runs as: its uid's name, or the uid where it has none (containers). Not
    `getpass.getuser`, which believes ``LOGNAME``/``USER``: anyone could be recorded as anyone else."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # no name for this uid (containers)
        return str(os.getuid())


def open_trail(path: Path) -> int:
    """Open (or create) the trail file ``path`` for appending, mode 0640 whatever the umask (it holds patient IDs),
    given to the trail's owner when root made it (`give_to_trail_owner`); returns the descriptor. Never through a
    symbolic link: the node's own user owns the audit folder (and the data folder above it), and root (``sudo
    pacsnode audit``, ``retry``, ``purge``) would append to, or create, whatever file a link planted there names.
    The folder itself is a link only root does not follow (the node's user may have moved its trail). Raises
    OSError (ELOOP: the message names the link)."""
    root = os.geteuid() == 0
    try:
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | (os.O_NOFOLLOW if root else 0))
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and path.parent.is_symlink():
            raise OSError(errno.ELOOP, f"the audit folder {path.parent} is a symbolic link: root does not follow "
                                       "it") from exc
        raise
    try:
        fd = os.open(path.name, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640, dir_fd=folder)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"the audit file {path} is a symbolic link: not followed") from exc
        raise
    finally:
        os.close(folder)
    try:
        os.fchmod(fd, 0o640)
        give_to_trail_owner(fd, path.parent)  # root's (sudo pacsnode audit) would lock the node out
    except OSError:
        os.close(fd)
        raise
    return fd


def give_to_trail_owner(fd: int, directory: Path) -> None:
    """Give the trail file open on ``fd`` in ``directory`` (and ``directory``) to the owner of the folder above,
    when this process is root and made them: ``sudo pacsnode audit`` (or ``retry``, ``purge``) rotating the trail
    created a root-owned ``audit.jsonl``, mode 0640, and every record the node, running as its own user, wrote
    after that failed (EACCES). By descriptor, and without following links: never another file. Best effort."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        owner = os.stat(directory.parent)
        if owner.st_uid == 0:
            return  # a trail under a root-owned folder is root's to keep
        if os.stat(directory, follow_symlinks=False).st_uid == 0:
            os.chown(directory, owner.st_uid, owner.st_gid, follow_symlinks=False)
        mine = os.fstat(fd)
        if mine.st_uid == 0:
            folder = os.stat(directory)
            os.fchown(fd, folder.st_uid, folder.st_gid)


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def study_objects(studies: Sequence[StudySummary]) -> list[dict[str, Any]]:
    """The participant objects of ``studies``: one per study (Study Instance UID, SOP classes with their counts),
    then one per distinct patient."""
    objects: list[dict[str, Any]] = []
    patients: list[str] = []
    for study in studies:
        objects.append({
            "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3",
            "ParticipantObjectIDTypeCode": STUDY_UID, "ParticipantObjectID": study.study_uid,
            "ParticipantObjectDescription": {"SOPClass": [
                {"UID": uid, "NumberOfInstances": n} for uid, n in sorted(study.counts.items())]},
        })
        patients += [p for p in sorted(study.patient_ids) if p not in patients]
    for patient in patients:
        objects.append({
            "ParticipantObjectTypeCode": "1", "ParticipantObjectTypeCodeRole": "1",
            "ParticipantObjectIDTypeCode": PATIENT_NUMBER, "ParticipantObjectID": patient,
        })
    return objects


__all__ = ["Ev", "Outcome", "Role", "StudySummary", "code", "give_to_trail_owner", "local_user", "open_trail", "participant", "patient_id_of",
           "study_objects", "uri_object"]
