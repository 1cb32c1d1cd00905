"""Destination checks: is each configured destination reachable, and how is its delivery doing?

`Reachability.check_all()` C-ECHOes every DIMSE destination (as the node's AE title) and sends an HTTP GET to
every DICOMweb one (QIDO-RS ``{url}/studies?limit=1``, with its token), in parallel, each bounded by
``[reachability] timeout_seconds``, and records the outcome per destination in ``destination_checks``
(reachable, when checked, last success, the reason when not) so other processes (`pacsnode status`) can read it.
`ReachabilityLoop` runs it at start, at each config reload (`apply_config`) and every ``interval_seconds``, as the
supervised loop ``reachability``. `destination_report(config, engine)` joins this with the deliveries: per
destination its reachability, backlog (pending + sending), dead letters and uncommitted deliveries.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from node.commitment import UNCOMMITTED_STATES, commit_counts
from node.config import Destination, DestinationKind, NodeConfig
from node.db import insert_for, reading, transaction
from node.errors import ConfigError, SendError
from node.logs import get_logger
from node.loops import LoopThread
from node.schema import deliveries, destination_checks
from node.scu import Peer, echo
from node.senders import redirect_target
from node.states import DeliveryState
from node.supervise import Heartbeats, failure
from node.tls import destination_tls_args, requests_tls

LOOP = "reachability"
TICK_SECONDS = 1.0

Check = Callable[[Destination, str, float], None]  # (destination, calling AE, timeout); raises SendError


def check_destination(destination: Destination, calling_ae: str, timeout: float) -> None:
    """Return when ``destination`` answers: C-ECHO status 0x0000 (DIMSE), HTTP 2xx to QIDO-RS ``/studies?limit=1``
    (DICOMweb) that is not an HTML page. A redirect is not followed: it is an answer from something other than the
    DICOMweb service (a login page, a moved URL), so not reachable, its target in the reason. Raises `SendError`
    naming why not."""
    if destination.kind is DestinationKind.DIMSE:
        assert destination.host and destination.port and destination.ae_title
        try:
            tls_args = destination_tls_args(destination)
        except ConfigError as exc:
            raise SendError(str(exc)) from exc
        status = echo(Peer(destination.host, destination.port, called_ae=destination.ae_title,
                           calling_ae=calling_ae, timeout=timeout, tls_args=tls_args))
        if status != 0:
            raise SendError(f"C-ECHO status 0x{status:04X}")
        return
    assert destination.url is not None
    headers = {"Accept": "application/dicom+json"}
    if destination.token is not None:
        headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
    try:
        verify, cert = requests_tls(destination)
        response = requests.get(f"{destination.url.rstrip('/')}/studies", params={"limit": "1"}, headers=headers,
                                timeout=timeout, verify=verify, cert=cert, allow_redirects=False)
    except requests.RequestException as exc:
        raise SendError(f"unreachable: {type(exc).__name__}") from exc
    code = response.status_code
    if 300 <= code < 400:
        location = response.headers.get("Location")
        to = f" to {redirect_target(response.url, location)}" if location else ""
        raise SendError(f"HTTP {code}, a redirect{to} (not followed): not the DICOMweb service")
    if not 200 <= code < 300:
        raise SendError(f"HTTP {code}")
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media_type == "text/html":
        raise SendError(f"HTTP {code} with an HTML page, not a QIDO-RS answer")


class Reachability:
    """Checks the configured destinations and records the outcome; ``clock`` returns epoch seconds and ``check``
    is `check_destination` (both injected in unit tests)."""

    def __init__(self, config: NodeConfig, engine: Engine, *, check: Check = check_destination,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.engine = engine
        self.check = check
        self.clock = clock
        self.log = get_logger(component="reachability")
        self._insert = insert_for(engine)
        self._last: dict[str, bool] = {}  # last outcome per destination in this process: log changes only

    def apply_config(self, config: NodeConfig) -> None:
        """Swap the config (hot reload): the next `check_all` checks the destinations it lists."""
        self.config = config

    def check_all(self) -> dict[str, bool]:
        """Check every configured destination now (in parallel); record and return name → reachable. Rows of
        destinations no longer configured are removed."""
        config = self.config
        dests = list(config.destinations)
        outcomes: list[tuple[Destination, bool, str | None, float]] = []
        if dests:
            with ThreadPoolExecutor(max_workers=min(8, len(dests)), thread_name_prefix="pacsnode-check") as pool:
                outcomes = list(pool.map(lambda d: self._one(d, config), dests))
        now = self.clock()
        t = destination_checks.c
        with transaction(self.engine, "destination_checks") as conn:
            conn.execute(destination_checks.delete().where(t.destination.not_in([d.name for d in dests])))
            for dest, ok, reason, seconds in outcomes:
                values: dict[str, Any] = dict(kind=dest.kind.value, reachable=ok, checked_at=now, seconds=seconds,
                                              reason=reason)
                if ok:
                    values["last_success_at"] = now
                ins = self._insert(destination_checks).values(destination=dest.name, **values)
                conn.execute(ins.on_conflict_do_update(index_elements=["destination"], set_=values))
        for dest, ok, reason, seconds in outcomes:
            if self._last.get(dest.name) != ok:
                log = self.log.info if ok else self.log.error
                log("destination_reachable" if ok else "destination_unreachable", destination=dest.name,
                    kind=dest.kind.value, reason=reason, seconds=round(seconds, 3))
            self._last[dest.name] = ok
        return {dest.name: ok for dest, ok, _, _ in outcomes}

    def _one(self, dest: Destination, config: NodeConfig) -> tuple[Destination, bool, str | None, float]:
        started = time.monotonic()
        try:
            self.check(dest, config.node.ae_title, config.reachability.timeout_seconds)
            ok, reason = True, None
        except SendError as exc:
            ok, reason = False, str(exc)[:500]
        except Exception as exc:  # noqa: BLE001 - a check's bug reports the destination, never ends the round
            ok, reason = False, failure(exc)
        return dest, ok, reason, time.monotonic() - started

    def up(self) -> dict[str, bool]:
        """Destination → reachable at its last check (configured destinations that were checked)."""
        names = {d.name for d in self.config.destinations}
        t = destination_checks.c
        with reading(self.engine, "destination_checks") as conn:
            return {r.destination: bool(r.reachable) for r in conn.execute(sa.select(t.destination, t.reachable))
                    if r.destination in names}


class ReachabilityLoop:
    """`Reachability.check_all` at start, on `apply_config` (a reload) and every ``interval_seconds``; a supervised
    loop that survives any failure of one round."""

    def __init__(self, reachability: Reachability, heartbeats: Heartbeats) -> None:
        self.reachability = reachability
        self.heartbeats = heartbeats
        self._loop_thread = LoopThread(heartbeats, LOOP, "pacsnode-reachability", self._run)

    def start(self) -> None:
        self._loop_thread.wake.set()  # check at once
        self._loop_thread.start(TICK_SECONDS, restart=self.start)

    def stop(self, timeout: float = 10.0) -> None:
        self._loop_thread.stop(timeout)

    def apply_config(self, config: NodeConfig) -> None:
        """Swap the config (hot reload) and check the destinations again now."""
        self.reachability.apply_config(config)
        self._loop_thread.wake.set()

    def _run(self) -> None:
        loop = self._loop_thread
        next_at = time.monotonic()
        while not loop.stopping.is_set():
            loop.beat()
            if loop.wake.is_set() or time.monotonic() >= next_at:
                loop.wake.clear()
                # Checks run in parallel, each bounded by the timeout (a C-ECHO: connect, associate, echo, release).
                loop.beat(busy_for=4 * self.reachability.config.reachability.timeout_seconds + 5)
                try:
                    self.reachability.check_all()
                except Exception as exc:  # noqa: BLE001 - one failed round must not end the loop
                    self.reachability.log.error("reachability_failed", error=failure(exc))
                next_at = time.monotonic() + self.reachability.config.reachability.interval_seconds
                loop.beat()
            loop.wake.wait(TICK_SECONDS)


def destination_report(config: NodeConfig, engine: Engine) -> list[dict[str, Any]]:
    """Per destination (configured ones first, in config order, then any with rows left): kind, reachable (None:
    never checked), checked_at, last_success_at, reason, backlog (pending + sending), dead, delivered, commitment
    (on/off), committed and uncommitted (delivered but not committed: awaiting, failed or timed out)."""
    d = deliveries.c
    with reading(engine, "destination report") as conn:
        states = {(str(r[0]), str(r[1])): int(r[2]) for r in conn.execute(
            sa.select(d.destination, d.state, sa.func.count()).group_by(d.destination, d.state))}
        checks = {r.destination: r for r in conn.execute(sa.select(destination_checks))}
    commits = commit_counts(engine)
    configured = {x.name: x for x in config.destinations}
    names = list(configured) + sorted({n for n, _ in states} - set(configured))
    out = []
    for name in names:
        dest = configured.get(name)
        check = checks.get(name)
        out.append({
            "destination": name,
            "configured": dest is not None,
            "kind": dest.kind.value if dest is not None else (check.kind if check is not None else None),
            "reachable": None if check is None else bool(check.reachable),
            "checked_at": None if check is None else check.checked_at,
            "last_success_at": None if check is None else check.last_success_at,
            "reason": None if check is None else check.reason,
            "backlog": states.get((name, DeliveryState.PENDING.value), 0)
            + states.get((name, DeliveryState.SENDING.value), 0),
            "dead": states.get((name, DeliveryState.DEAD.value), 0),
            "delivered": states.get((name, DeliveryState.DELIVERED.value), 0),
            "commitment": bool(dest is not None and dest.commitment),
            "committed": commits.get((name, "committed"), 0),
            "uncommitted": sum(n for (dn, s), n in commits.items() if dn == name and s in UNCOMMITTED_STATES),
            "commit_states": {s: n for (dn, s), n in commits.items() if dn == name},
        })
    return out
