"""The admin status page: a read-only HTML overview of the node and the two replay actions, as Starlette routes.

`admin_routes(...)` returns the routes; the app's owner mounts them, ``Mount("/admin", routes=admin_routes(...))``:

  ``GET  /admin/``       the page (server-rendered, jinja2 with autoescaping; no scripts, no external assets):
                         recent series (the last 50 received: UIDs, route, state, version, counts, times, job and
                         delivery states), the job queue, deliveries per destination by state, dead letters (the
                         newest 100 jobs and deliveries with their error), alerts (dead jobs the PACS heard nothing
                         about), disk use and what retention would purge (the last dry run and its age: computed in the
                         background, `node.adminsummary`, never while a request waits), and the running config with
                         its secrets masked (`NodeConfig.redacted`). ``?refresh=N`` (5-3600) reloads it every N
                         seconds. No patient attribute is ever read: UIDs, AE titles, states, counts and times only.
                         At most ``MAX_RENDERS`` pages are rendered at a time (each in a thread of Starlette's pool,
                         which STOW-RS, QIDO-RS and the probes share); a request beyond that is answered 503 with
                         ``Retry-After`` at once. 503 too when the database does not answer.
  ``POST /admin/retry``  replay dead letters: form fields ``delivery`` and ``job`` (ids, repeatable) and/or ``all``
                         (``deliveries`` | ``jobs``: every dead one) → `Dispatcher.retry` / `JobQueue.retry`.

Who may act: the page is readable without a token; an action needs the node's ``[node] dicomweb_token``, either as
``Authorization: Bearer <token>`` (scripts; answered with JSON ``{"deliveries": n, "jobs": m}``) or as the form
field ``token`` that the page's dead-letter form asks for (browsers; answered 303 back to the page, which says
what was queued again). The token is never kept by the browser (no cookie, no session): a page on another site
can make a browser post here, but not with the token, so cross-site requests are refused (401) — that is the CSRF
defence, and why nothing is accepted from a cookie. Actions are POST only (a GET on ``/admin/retry`` is 405; the
page itself writes nothing), bodies are ``application/x-www-form-urlencoded`` of at most 64 KiB (415, 413), and
bad ids are 400 with nothing retried. Without a configured token the actions are off (403) and the page says so.
Every answer forbids framing and scripts (Content-Security-Policy) and caching.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jinja2
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from node.adminsummary import RetentionPreview
from node.auth import Authenticator, bearer, token_matches
from node.config import NodeConfig
from node.db import reading
from node.dispatch import Dispatcher
from node.errors import NodeError
from node.index import Index
from node.logs import get_logger
from node.queue import JobQueue
from node.reachability import destination_report
from node.retention import Retention, fullest_disk
from node.schema import deliveries, jobs, series
from node.states import AuthFailure, DeliveryState, JobState

RECENT_SERIES = 50  # rows in "recent series"
DEAD_LETTERS_SHOWN = 100  # rows per dead-letter table (the total is shown too)
ALERTS_SHOWN = 50
MAX_RENDERS = 2  # pages rendered at once: the rest of the shared thread pool stays free for the data path
BUSY_RETRY_AFTER_SECONDS = 5
MAX_FORM_BYTES = 64 * 1024
MIN_REFRESH_SECONDS, MAX_REFRESH_SECONDS = 5, 3600
_ALL_CHOICES = frozenset({"deliveries", "jobs"})

# No scripts at all; the inline <style> is the only thing the page loads. Forms may only post back here.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True,  # every value from the database or the config is escaped
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(ts: float | None) -> str:
    """Epoch seconds as the node's local time, e.g. ``2026-12-03 14:02:11 +0100``; ``—`` for none."""
    if ts is None:
        return "—"
    return dt.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def _age(seconds: float | None) -> str:
    """A duration as ``42 s``, ``7 min``, ``3.5 h``, ``2.0 d``."""
    if seconds is None:
        return "—"
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _size(n: int | float | None) -> str:
    if n is None:
        return "—"
    value, unit = float(n), "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"


_templates.filters.update(when=_when, age=_age, size=_size)


class _Refused(Exception):  # noqa: N818 - a control-flow signal answered in this module, not an error
    """An action refused before anything changed; answered with ``status`` (never leaves this module)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class _Selection:
    """What one retry request asks for."""

    deliveries: list[int] = field(default_factory=list)
    jobs: list[int] = field(default_factory=list)
    all_deliveries: bool = False
    all_jobs: bool = False


class _Admin:
    admission: Callable[[], dict[str, Any]] | None = None  # `Admission.report`; None: not shown

    def __init__(self, config_getter: Callable[[], NodeConfig], engine: Engine, token: str | None,
                 dispatcher: Dispatcher, queue: JobQueue, index: Index, clock: Callable[[], float],
                 authenticator: Authenticator | None = None) -> None:
        self.config_getter = config_getter
        self.engine = engine
        self.token = token
        self.auth = authenticator or Authenticator(token)  # counts, logs and audits failures (node.auth)
        self.dispatcher = dispatcher
        self.queue = queue
        self.index = index
        self.clock = clock
        self.log = get_logger(component="admin")
        self._renders = threading.BoundedSemaphore(MAX_RENDERS)  # only ever tried without blocking
        self.retention = RetentionPreview(lambda config: Retention(config, engine).purge(dry_run=True).as_dict(),
                                          clock)

    # -- the page ---------------------------------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        """200 the page; 503 with Retry-After when MAX_RENDERS pages are being rendered already (decided before any
        thread is taken) or when the database does not answer."""
        if not self._renders.acquire(blocking=False):
            return _busy("the status page is busy; try again shortly")
        try:
            # The thread renders too; anyio waits for it even when the request is cancelled, so the slot is freed
            # only once the thread is.
            html = await run_in_threadpool(self._render, request.scope.get("root_path", ""),
                                           _refresh(request.query_params.get("refresh")), _notice(request.query_params))
        except (NodeError, SQLAlchemyError) as exc:
            self.log.error("admin_page_failed", error=type(exc).__name__)
            return _busy(f"the node's database does not answer ({type(exc).__name__}); try again shortly")
        finally:
            self._renders.release()
        return HTMLResponse(html, headers=SECURITY_HEADERS)

    def _render(self, base: str, refresh: int | None, notice: dict[str, int] | None) -> str:
        return _templates.get_template("admin.html").render(base=base, refresh=refresh, notice=notice,
                                                            actions=self.token is not None, **self.collect())

    def collect(self) -> dict[str, Any]:
        """Everything the page shows, read in the caller's thread (blocking)."""
        config = self.config_getter()
        now = self.clock()
        with reading(self.engine, "admin page") as conn:
            recent = self._recent_series(conn)
            dead_deliveries = list(conn.execute(
                sa.select(deliveries.c.id, deliveries.c.series_uid, deliveries.c.version, deliveries.c.destination,
                          deliveries.c.kind, deliveries.c.attempts, deliveries.c.created_at,
                          deliveries.c.last_attempt_at, deliveries.c.last_error)
                .where(deliveries.c.state == DeliveryState.DEAD.value)
                .order_by(deliveries.c.id.desc())  # newest first, read off ix_deliveries_state
                .limit(DEAD_LETTERS_SHOWN)
            ))
            dead_jobs = list(conn.execute(
                sa.select(jobs.c.id, jobs.c.series_uid, jobs.c.version, jobs.c.pipeline, jobs.c.attempts,
                          jobs.c.finished_at, jobs.c.last_error)
                .where(jobs.c.state == JobState.DEAD.value)
                .order_by(jobs.c.id.desc())
                .limit(DEAD_LETTERS_SHOWN)
            ))
        job_counts = self.queue.counts()
        delivery_counts = self.dispatcher.counts()
        destinations: dict[str, dict[str, int]] = {d.name: {} for d in config.destinations}
        for (destination, state), n in sorted(delivery_counts.items()):
            destinations.setdefault(destination, {})[state] = n
        return {
            "now": now,
            "ae_title": config.node.ae_title,
            "series_counts": self.index.series_counts(),
            "route_counts": self.index.route_counts(),
            "recent": recent,
            "job_states": [s.value for s in JobState],
            "job_counts": job_counts,
            "depth": job_counts.get(JobState.QUEUED, 0) + job_counts.get(JobState.RUNNING, 0),
            "delivery_states": [s.value for s in DeliveryState],
            "destinations": destinations,
            "configured": {d.name for d in config.destinations},
            "checks": {d["destination"]: d for d in destination_report(config, self.engine)},
            "dead_deliveries": dead_deliveries,
            "dead_delivery_total": sum(n for (_, s), n in delivery_counts.items() if s == DeliveryState.DEAD.value),
            "dead_jobs": dead_jobs,
            "dead_job_total": job_counts.get(JobState.DEAD, 0),
            "alerts": self.queue.unreported(ALERTS_SHOWN),
            "disk": self._disk(config),
            "retention": self.retention.view(config),
            "admission": self._admission(),
            "config_json": json.dumps(config.redacted(), indent=2),
        }

    def _recent_series(self, conn: sa.Connection) -> list[dict[str, Any]]:
        """The last received series with the job and deliveries of their current version."""
        s = series.c
        rows = list(conn.execute(
            sa.select(s.series_uid, s.modality, s.state, s.instance_count, s.expected_count, s.first_received_at,
                      s.last_received_at, s.calling_ae, s.version, s.state_changed_at, s.route, s.purged_at)
            .order_by(s.last_received_at.desc(), s.series_uid.desc())  # ix_series_recent, read backwards
            .limit(RECENT_SERIES)
        ))
        uids = [r.series_uid for r in rows]
        job_of: dict[tuple[str, int], Any] = {}
        sent: dict[tuple[str, int], list[Any]] = {}
        if uids:
            for j in conn.execute(
                sa.select(jobs.c.series_uid, jobs.c.version, jobs.c.state, jobs.c.pipeline, jobs.c.skip_reason)
                .where(jobs.c.series_uid.in_(uids)).order_by(jobs.c.id)
            ):
                job_of[(j.series_uid, j.version)] = j  # the newest job of a version wins
            for d in conn.execute(
                sa.select(deliveries.c.series_uid, deliveries.c.version, deliveries.c.destination,
                          deliveries.c.state)
                .where(deliveries.c.series_uid.in_(uids)).order_by(deliveries.c.destination)
            ):
                sent.setdefault((d.series_uid, d.version), []).append(d)
        return [
            {"row": r, "job": job_of.get((r.series_uid, r.version)), "deliveries": sent.get((r.series_uid, r.version), [])}
            for r in rows
        ]

    @staticmethod
    def _disk(config: NodeConfig) -> dict[str, Any]:
        ceiling = config.retention.max_disk_percent
        try:
            used, total, path = fullest_disk(config)  # the file system retention judges (node.disks)
        except OSError as exc:
            return {"error": exc.strerror or type(exc).__name__, "ceiling": ceiling}
        percent = 100.0 * used / total if total else 0.0
        return {"used": used, "total": total, "percent": percent, "ceiling": ceiling, "error": None, "path": str(path),
                "over": ceiling is not None and percent > ceiling}

    def _admission(self) -> dict[str, Any] | None:
        if self.admission is None:
            return None
        try:
            return self.admission()
        except Exception as exc:  # noqa: BLE001 - the page still renders
            return {"error": type(exc).__name__}

    # -- the action -------------------------------------------------------------------------------------------------
    async def retry(self, request: Request) -> Response:
        """Replay dead letters. 303 back to the page (form) or 200 JSON (bearer); 400 bad ids, 401 no or wrong
        token, 403 actions off (no token configured), 413 body too large, 415 not a urlencoded form."""
        api = bearer(request) is not None
        client = request.client.host if request.client else None
        try:
            if self.token is None:
                raise _Refused(403, "actions are off: this node has no [node] dicomweb_token")
            form = await _read_form(request)
            failure = self._authorized(request, form)
            if failure is not None:
                await self.auth.failed(request, "admin", failure)
                raise _Refused(401, "a valid token is required")
            selection = _selection(form)
        except _Refused as refused:
            return self._refusal(refused, api, request)
        try:
            n_deliveries, n_jobs = await run_in_threadpool(self._replay, selection)
        except (NodeError, SQLAlchemyError) as exc:
            self.log.error("admin_retry_failed", error=type(exc).__name__)
            return self._refusal(_Refused(503, f"the node's database does not answer ({type(exc).__name__})"),
                                 api, request)
        self.log.info("admin_retry", client=client, delivery_ids=selection.deliveries, job_ids=selection.jobs,
                      all_deliveries=selection.all_deliveries, all_jobs=selection.all_jobs,
                      deliveries=n_deliveries, jobs=n_jobs)
        if self.auth.audit is not None:
            self.auth.audit.dead_letters_replayed(via="POST /admin/retry", deliveries=n_deliveries, jobs=n_jobs,
                                                  user=self.auth.user, peer=client, context={
                                                      "delivery_ids": selection.deliveries, "job_ids": selection.jobs,
                                                      "all_deliveries": selection.all_deliveries,
                                                      "all_jobs": selection.all_jobs})
        if api:
            return JSONResponse({"deliveries": n_deliveries, "jobs": n_jobs}, headers=SECURITY_HEADERS)
        base = request.scope.get("root_path", "")
        return RedirectResponse(f"{base}/?deliveries_retried={n_deliveries}&jobs_retried={n_jobs}#dead-letters",
                                status_code=303, headers=SECURITY_HEADERS)

    def _authorized(self, request: Request, form: dict[str, list[str]]) -> AuthFailure | None:
        """None when the bearer header or the form's token is the node's, else why not."""
        assert self.token is not None
        presented = bearer(request)
        if presented is not None:
            return None if token_matches(presented, self.token) else AuthFailure.MISMATCH
        # Not a bearer client: a browser, which may carry a proxy's Basic credentials; the form's token decides.
        values = form.get("token", [])
        if not values or not values[0].strip():
            return AuthFailure.MISSING
        return None if len(values) == 1 and token_matches(values[0].strip(), self.token) else AuthFailure.MISMATCH

    def _replay(self, selection: _Selection) -> tuple[int, int]:
        """Call the stages' own retry; never with an empty id list (`JobQueue.retry` reads that as "all")."""
        delivery_ids = list(selection.deliveries)
        if selection.all_deliveries:
            with reading(self.engine, "admin retry") as conn:
                delivery_ids += [int(i) for i in conn.scalars(
                    sa.select(deliveries.c.id).where(deliveries.c.state == DeliveryState.DEAD.value))]
        n_deliveries = self.dispatcher.retry(sorted(set(delivery_ids))) if delivery_ids else 0
        if selection.all_jobs:
            n_jobs = self.queue.retry(None)
        elif selection.jobs:
            n_jobs = self.queue.retry(sorted(set(selection.jobs)))
        else:
            n_jobs = 0
        return n_deliveries, n_jobs

    @staticmethod
    def _refusal(refused: _Refused, api: bool, request: Request) -> Response:
        headers = dict(SECURITY_HEADERS)
        if refused.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="pacsnode"'
        if api:
            return JSONResponse({"error": refused.reason}, status_code=refused.status, headers=headers)
        html = _templates.get_template("admin_refused.html").render(
            status=refused.status, reason=refused.reason, base=request.scope.get("root_path", ""))
        return HTMLResponse(html, status_code=refused.status, headers=headers)


def _busy(reason: str) -> Response:
    """503 with Retry-After, plain text."""
    return Response(f"{reason}\n", status_code=503, media_type="text/plain",
                    headers={**SECURITY_HEADERS, "Retry-After": str(BUSY_RETRY_AFTER_SECONDS)})


def _digits(value: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²' and other digits int() refuses (a 500)."""
    return value.isascii() and value.isdigit()


def _refresh(value: str | None) -> int | None:
    """``?refresh=N`` as seconds within bounds; anything else: no auto-refresh."""
    if value is None or not _digits(value) or len(value) > 6:
        return None
    return min(max(int(value), MIN_REFRESH_SECONDS), MAX_REFRESH_SECONDS)


def _notice(params: Any) -> dict[str, int] | None:
    """What the last action queued again (from the redirect's query), only as numbers."""
    out = {}
    for key in ("deliveries_retried", "jobs_retried"):
        value = params.get(key)
        if value is not None and _digits(value) and len(value) < 10:
            out[key] = int(value)
    return out or None


async def _read_form(request: Request) -> dict[str, list[str]]:
    """The urlencoded body, at most MAX_FORM_BYTES (read before the token check, which may be a form field)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise _Refused(415, "send the form as application/x-www-form-urlencoded")
    declared = request.headers.get("content-length")
    if declared is not None and (not _digits(declared) or int(declared) > MAX_FORM_BYTES):
        raise _Refused(413, f"the form is larger than {MAX_FORM_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise _Refused(413, f"the form is larger than {MAX_FORM_BYTES} bytes")
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=1000)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Refused(400, f"the form cannot be read: {type(exc).__name__}") from exc


def _ids(values: Sequence[str], what: str) -> list[int]:
    out = []
    for value in values:
        value = value.strip()
        if not _digits(value) or len(value) > 18:
            raise _Refused(400, f"{what} ids must be positive integers")
        out.append(int(value))
    return out


def _selection(form: dict[str, list[str]]) -> _Selection:
    """The ids and ``all`` choices of a retry form; 400 when it asks for nothing or for something unknown."""
    chosen = set(form.get("all", []))
    unknown = chosen - _ALL_CHOICES
    if unknown:
        raise _Refused(400, "all must be 'deliveries' or 'jobs'")
    selection = _Selection(
        deliveries=_ids(form.get("delivery", []), "delivery"),
        jobs=_ids(form.get("job", []), "job"),
        all_deliveries="deliveries" in chosen,
        all_jobs="jobs" in chosen,
    )
    if not (selection.deliveries or selection.jobs or selection.all_deliveries or selection.all_jobs):
        raise _Refused(400, "nothing to retry: name a delivery or job id, or all=deliveries|jobs")
    return selection


def admin_routes(
    config_getter: Callable[[], NodeConfig],
    engine: Engine,
    *,
    token: str | None,
    dispatcher: Dispatcher,
    queue: JobQueue,
    index: Index,
    clock: Callable[[], float] = time.time,
    authenticator: Authenticator | None = None,
    admission: Callable[[], dict[str, Any]] | None = None,
) -> list[BaseRoute]:
    """The admin page's routes, to mount at ``/admin`` (``Mount("/admin", routes=admin_routes(...))``).

    ``config_getter`` returns the running config at each request (so a hot reload shows); ``token`` is the node's
    ``[node] dicomweb_token`` (None: read-only page, actions refused with 403). ``dispatcher``, ``queue`` and
    ``index`` are the node's own, so a retry wakes its dispatcher at once. ``authenticator`` (the node's
    `node.auth.Authenticator`) counts, logs and audits a wrong token. Raises TypeError/ValueError for a bad
    argument (an empty token, a getter that is not callable). ``admission`` (e.g. `Admission.report`) adds what
    admission control accepts now to the page.
    """
    if not callable(config_getter):
        raise TypeError(f"config_getter must be callable, not {type(config_getter).__name__}")
    if not isinstance(engine, Engine):
        raise TypeError(f"engine must be a SQLAlchemy Engine, not {type(engine).__name__}")
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError("token must be a non-empty string or None (actions off)")
    for name, value, kind in (("dispatcher", dispatcher, Dispatcher), ("queue", queue, JobQueue),
                              ("index", index, Index)):
        if not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__name__}, not {type(value).__name__}")
    admin = _Admin(config_getter, engine, token.strip() if token else None, dispatcher, queue, index, clock,
                   authenticator)
    admin.admission = admission
    return [
        Route("/", admin.page, methods=["GET"], name="admin_page"),
        Route("/retry", admin.retry, methods=["POST"], name="admin_retry"),
    ]


__all__ = ["admin_routes"]
