"""The node's one tree of errors; receive-side errors carry the DIMSE status they map to.

    NodeError
    ├── ConfigError                     invalid config file or override (names the bad key)
    ├── ReceiveError                    an instance could not be accepted; `.status` is the C-STORE status
    │   ├── InvalidDatasetError         0xC000  cannot understand: the dataset does not parse
    │   ├── InvalidUIDError             0xA900  a required UID is missing or not a UID (never used as a path)
    │   ├── SOPClassMismatchError       0xA900  dataset SOP class/instance differs from the request
    │   ├── SpoolFullError              0xA700  out of resources: disk full
    │   ├── InstanceTooLargeError       0xA700  out of resources: the data set (or its inflated form) is over the limit
    │   ├── AdmissionRefusedError       0xA700  out of resources: admission control paused (disk floor, queue ceiling)
    │   └── StoreFailedError            0xA701  out of resources: the spool or the index could not be written
    ├── DatabaseError                   the database could not be read or written (outside a C-STORE)
    │   └── SchemaError                 its schema is one this release cannot run on (unknown or older revision)
    ├── UnknownSpoolError               (node.spools) an instance is on a spool this process has no mount point for
    ├── SendError                       an SCU operation (echo, send, dispatch, commitment, checks) failed
    │   ├── TransientSendError          (node.senders) retry later: peer down, busy, refused association
    │   ├── PermanentSendError          (node.senders) dead-letter now: the PACS refuses these objects
    │   ├── CommitmentUnsupportedError  (node.scu) the destination has no Storage Commitment: no proof will come
    │   └── NoContextAcceptedError      (node.scu) the peer takes none of the SOP classes sent
    └── ResultsError                    (node.results.errors) an SR/SEG could not be built from the inputs

Every class without a module named lives here. Outside the tree: `models.errors.ModelError` and its subclasses
(``models/`` never imports ``node/``; the worker turns them into job failures), and private control-flow signals
that never leave the stage that raises them (`node.queue.LeaseLost`; `node.stow.Refused` and
`node.stow.PartFailed`, answered in `node.dicomweb`; ``_Refused`` in `node.admin`;
`node.config.running.NotANodeError`, answered in `node.cli`).

Library exceptions (pydicom, SQLAlchemy, OSError) are converted where they are caught, with ``raise ... from exc``.
"""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses the node uses (PS3.4 B.2.3 and PS3.7 C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_STORE = 0xA701
    DATASET_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class NodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError):
    """The configuration is invalid; the message names the key and the reason."""


class ReceiveError(NodeError):
    """An incoming instance was refused; ``status`` is the DIMSE status to answer with."""

    status: StoreStatus = StoreStatus.CANNOT_UNDERSTAND

    def __init__(self, message: str, *, status: StoreStatus | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class InvalidDatasetError(ReceiveError):
    status = StoreStatus.CANNOT_UNDERSTAND


class InvalidUIDError(ReceiveError):
    status = StoreStatus.DATASET_MISMATCH


class SOPClassMismatchError(ReceiveError):
    status = StoreStatus.DATASET_MISMATCH


class SpoolFullError(ReceiveError):
    status = StoreStatus.OUT_OF_RESOURCES


class InstanceTooLargeError(ReceiveError):
    """The data set, or a Deflated one once inflated, exceeds the node's configured limit; nothing was kept."""

    status = StoreStatus.OUT_OF_RESOURCES


class AdmissionRefusedError(ReceiveError):
    """Admission control refused the instance before it was read into the spool (`node.admission`): free space
    below the floor or the hard reserve, or the job queue at its ceiling. ``reason`` is an `AdmissionReason`;
    ``retry_after`` the seconds a client is told to wait (STOW-RS ``Retry-After``)."""

    status = StoreStatus.OUT_OF_RESOURCES

    def __init__(self, message: str, *, reason: str, retry_after: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class StoreFailedError(ReceiveError):
    status = StoreStatus.OUT_OF_RESOURCES_STORE


class DatabaseError(NodeError):
    """The node's database (index, jobs, deliveries, audit) failed outside a receive; SQLAlchemy's error is the
    ``__cause__``."""


class SchemaError(DatabaseError):
    """The database's schema revision is one this release does not know, or an older one it will not upgrade by
    itself; the message names the revision and the command to run (`node.migrate`)."""


class SendError(NodeError):
    """An outgoing DIMSE operation failed (association refused, peer unreachable, failure status)."""
