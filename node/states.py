"""Closed sets, a leaf module: series, association, job, delivery and commitment states; admission reasons, client
certificate modes, authentication failures and peer refusals; the inference device; schema states; the node's
Manufacturer value."""

from __future__ import annotations

from enum import StrEnum


class SeriesState(StrEnum):
    RECEIVING = "receiving"    # instances may still arrive
    COMPLETE = "complete"      # judged whole; a job was queued
    REOPENED = "reopened"      # an instance arrived after completion; a new result version will follow
    IGNORED = "ignored"        # judged whole, but no route chose a pipeline (or a built-in rule excluded it)


class AssociationState(StrEnum):
    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"


class JobState(StrEnum):
    QUEUED = "queued"        # waiting to be claimed (or to be retried after a failure)
    RUNNING = "running"      # claimed by a worker holding a lease
    DONE = "done"            # results built and handed to dispatch
    SKIPPED = "skipped"      # the validity gate refused the series; a "not processed" SR was made
    DEAD = "dead"            # failed max_attempts times; error kept


class DeliveryState(StrEnum):
    PENDING = "pending"      # due at due_at
    SENDING = "sending"      # a sender is working on it
    DELIVERED = "delivered"
    DEAD = "dead"            # gave up after give_up_after_seconds; replay with `pacsnode retry`


class CommitState(StrEnum):
    """Proof of delivery of a delivered result set (node.commitment); only for destinations with commitment on."""

    PENDING = "pending"        # stored; the commitment request (N-ACTION) or the QIDO-RS check is due
    REQUESTED = "requested"    # N-ACTION accepted; waiting for the PACS's N-EVENT-REPORT
    COMMITTED = "committed"    # the PACS reported (or QIDO-RS showed) that it holds every object
    FAILED = "failed"          # the PACS reported failures, or QIDO-RS still missed objects at the deadline
    TIMED_OUT = "timed_out"    # no report (no successful request) within commit_timeout_seconds


class AdmissionReason(StrEnum):
    """Why admission control refuses data (`node.admission`)."""

    DISK_FLOOR = "disk_floor"          # free space below the floor: new series refused, series in progress go on
    QUEUE_CEILING = "queue_ceiling"    # jobs waiting at the ceiling: new series refused, series in progress go on
    DISK_RESERVE = "disk_reserve"      # free space below the hard reserve: everything refused


# The Manufacturer the node writes into every object it makes (SR, SEG, KOS): routing recognises its own output
# by it and never processes it again.
NODE_MANUFACTURER = "pacs-ai-node"


class ClientCertificates(StrEnum):
    """Whether the node's TLS listeners (DIMSE and HTTPS) ask peers for a certificate signed by ``[tls] ca_file``."""

    REQUIRED = "required"  # no valid client certificate: the handshake fails
    OPTIONAL = "optional"  # asked for; one that is sent must verify, none is accepted too
    NONE = "none"          # not asked for


class AuthFailure(StrEnum):
    """Why an HTTP request was refused 401 (node.auth): metric label, log and audit text; never the value shown."""

    MISSING = "missing"            # no Authorization header (nor a form token)
    WRONG_SCHEME = "wrong_scheme"  # an Authorization header that is not Bearer
    MISMATCH = "mismatch"          # a token that is not the node's


class PeerRefusal(StrEnum):
    """Why a peer's connection was refused or cut off by a front door's guard (also the log event's name)."""

    CONNECTION_REFUSED = "connection_refused"          # DIMSE: max_associations worth of connections open
    PEER_LIMIT_REACHED = "peer_connection_refused"     # DIMSE: max_associations_per_peer open from this address
    ASSOCIATION_REJECTED = "association_rejected"      # DIMSE: A-ASSOCIATE-RJ (calling/called AE, slots)
    PDU_TOO_LARGE = "pdu_too_large"                    # DIMSE: declared PDU length over max_pdu_bytes
    ASSOCIATE_RQ_MALFORMED = "associate_rq_malformed"  # DIMSE: an A-ASSOCIATE-RQ pynetdicom cannot decode
    PEER_STALLED = "peer_stalled"                      # DIMSE: a read missed its deadline
    COMMAND_SET_TOO_LARGE = "command_set_too_large"    # DIMSE
    DIMSE_MESSAGE_MALFORMED = "dimse_message_malformed"  # DIMSE
    REQUESTS_PIPELINED = "requests_pipelined"          # DIMSE: a request begun with another one still unanswered
    COMMITMENT_REPORT_REFUSED = "commitment_report_refused"  # DIMSE: an N-EVENT-REPORT malformed or of a wrong type
    COMMITMENT_REPORT_UNKNOWN = "commitment_report_unknown"  # DIMSE: an N-EVENT-REPORT for no transaction of ours
    COMMITMENT_REPORT_FOREIGN = "commitment_report_foreign"  # DIMSE: ... for one of ours, not from its destination
    HTTP_HEADER_TIMEOUT = "http_header_timeout"        # HTTP: request head not complete within its deadline
    HTTP_BODY_TIMEOUT = "http_body_timeout"            # HTTP: no body bytes within the read timeout
    HTTP_HEADER_TOO_LARGE = "http_header_too_large"    # HTTP: request head over http_max_header_bytes (431)
    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"      # DICOM TLS: no, a wrong or a timed-out handshake
    ASSOCIATION_RECLAIMED = "association_reclaimed"    # DIMSE: an idle peer's slot taken back at a cap (node.slots)


class InferenceDevice(StrEnum):
    """``[worker] device``: where the models run (models.device.select_device)."""

    AUTO = "auto"  # the GPU when TensorFlow sees one, else the CPU
    CPU = "cpu"    # the CPU; GPUs are hidden from TensorFlow
    GPU = "gpu"    # the GPU; none visible: the CPU, with the gpu_unavailable_falling_back warning (never a refusal)


class SchemaState(StrEnum):
    """Where a database's schema stands against this release's migrations (node.migrate)."""

    EMPTY = "empty"                # no tables: created at the newest revision
    CURRENT = "current"            # at this release's newest revision
    BEHIND = "behind"              # at an older revision this release knows: `pacsnode db upgrade`
    UNVERSIONED = "unversioned"    # tables from a release before migrations (no alembic_version): adopted by upgrade
    UNKNOWN = "unknown"            # at a revision this release does not know (a newer release wrote it): refused


class Role(StrEnum):
    """What one node process runs (`pacsnode serve --role`; node.roles says which stages each one starts)."""

    ALL = "all"                # every stage: threads in one process, or a supervisor of role processes
    LISTENER = "listener"      # DIMSE + HTTP front doors, ingest, completion sweep
    WORKER = "worker"          # job claiming, models, result building (enqueues deliveries)
    DISPATCHER = "dispatcher"  # delivery threads, storage commitment, reachability, retention


class ChildStart(StrEnum):
    """How the supervisor starts a role child: ``[node] child_start`` (node.processes)."""

    FORK = "fork"  # a copy of the supervisor, which has imported the stages' modules (the default on Linux)
    EXEC = "exec"  # a fresh interpreter running ``python -m node.cli serve --role R``


class ProcessModel(StrEnum):
    """How ``pacsnode serve`` (role all) runs the roles: ``[node] process_model``."""

    THREADS = "threads"      # one process, every stage a thread (the embedded default)
    PROCESSES = "processes"  # a supervisor process and one child per role (listener_processes listeners)
