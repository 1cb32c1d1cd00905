"""Process roles: which stages one node process runs, who it is on a shared database, how its stages learn of work
made in another process.

``pacsnode serve --role R`` starts the stages of `STAGES[R]` (node.service builds them for the role):

  ===========  =================================================================================================
  role         stages
  ===========  =================================================================================================
  listener     DIMSE + HTTP front doors (STOW-RS, QIDO-RS, /healthz, /readyz, /metrics, /admin), ingest
               (spool + index), admission, and the completion sweep — it is nudged by association release in the
               same process, and its guarded updates let any number of listeners sweep the same database
  worker       job claiming, the models (TensorFlow loads here and only here), result building; it enqueues
               the deliveries in the job's transaction
  dispatcher   delivery threads, storage commitment (requests after delivery, timeouts; the N-EVENT-REPORTs
               themselves arrive at a listener, which records them), destination reachability, retention
               (one per deployment: it deletes spool files by database state)
  all          every one of the above
  ===========  =================================================================================================

A listener never imports TensorFlow: the worker's model runner is built by a factory that only the worker role
calls. In one process the stages wake each other with events; across processes on one host a datagram wakes the
consumer (`node.wakeup`), and in any case the consumer polls the database: the worker's claim loop and the
dispatcher's destination threads look every ``[node] wake_poll_seconds`` (`worker_poll_seconds`, `role_config`),
so a job completed by a listener on another host is claimed within about that interval.

`Identity` names the process on a shared database — ``<instance_id>:<role>-<index>``; ``instance_id`` defaults to
the host name — and is recorded on the rows the process owns (``associations.node_id``); crash cleanup at start
touches only its own rows.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from node.config import NodeConfig
from node.states import Role


class Stage:
    """Stage names for `STAGES` (the heartbeat loop names differ: a stage may run several loops)."""

    FRONT_DOORS = "front_doors"  # DIMSE + HTTP, ingest, admission
    COMPLETION = "completion"
    WORKER = "worker"
    DISPATCH = "dispatch"
    COMMITMENT = "commitment"
    REACHABILITY = "reachability"
    RETENTION = "retention"


STAGES: dict[Role, frozenset[str]] = {
    Role.LISTENER: frozenset({Stage.FRONT_DOORS, Stage.COMPLETION}),
    Role.WORKER: frozenset({Stage.WORKER}),
    Role.DISPATCHER: frozenset({Stage.DISPATCH, Stage.COMMITMENT, Stage.REACHABILITY, Stage.RETENTION}),
}
STAGES[Role.ALL] = frozenset().union(*STAGES.values())


@dataclass(frozen=True)
class Identity:
    """One node process: its instance (``[node] instance_id`` or the host name), role and index among its role's
    processes of that instance (0 unless several listeners run)."""

    instance_id: str
    role: Role = Role.ALL
    index: int = 0

    @classmethod
    def of(cls, config: NodeConfig, role: Role = Role.ALL, index: int = 0) -> Identity:
        if index < 0:
            raise ValueError(f"index must be >= 0, not {index}")
        return cls(instance_id(config), role, index)

    @property
    def node_id(self) -> str:
        """``<instance_id>:<role>-<index>``: the owner recorded on rows (at most 64 characters)."""
        return f"{self.instance_id}:{self.role.value}-{self.index}"[:64]

    @property
    def instance_prefix(self) -> str:
        """What every process of this instance's ``node_id`` starts with."""
        return f"{self.instance_id}:"


def instance_id(config: NodeConfig) -> str:
    """``[node] instance_id``, or the host name's first label (at most 40 characters)."""
    if config.node.instance_id:
        return config.node.instance_id
    return (socket.gethostname().split(".")[0] or "node")[:40]


def runs(role: Role, stage: str) -> bool:
    """Whether a process of ``role`` runs ``stage``."""
    return stage in STAGES[role]


def role_config(config: NodeConfig, role: Role) -> NodeConfig:
    """The config a process of ``role`` runs on: a lone dispatcher polls for deliveries at most every
    ``wake_poll_seconds`` (no worker in its process wakes it); every other role runs ``config`` unchanged."""
    if role is not Role.DISPATCHER or config.dispatch.poll_seconds <= config.node.wake_poll_seconds:
        return config
    dispatch = config.dispatch.model_copy(update={"poll_seconds": config.node.wake_poll_seconds})
    return config.model_copy(update={"dispatch": dispatch})


def worker_poll_seconds(config: NodeConfig, role: Role) -> float:
    """How often the worker looks for a job when nothing woke it: in its own process (no completion sweep beside
    it) every ``wake_poll_seconds``, else every second (completion wakes it at once)."""
    return config.node.wake_poll_seconds if role is Role.WORKER else 1.0


__all__ = ["STAGES", "Identity", "Stage", "instance_id", "role_config", "runs", "worker_poll_seconds"]
