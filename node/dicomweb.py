"""The DICOMweb front door: STOW-RS ingest and a minimal QIDO-RS over the index, in the node's one HTTP app.

`create_app(...)` returns the Starlette app: STOW-RS here, QIDO-RS queries in `node.qido`, and ``/healthz``,
``/readyz`` and ``/metrics`` from `node.http.probe_routes`; `node.http.HttpServer` runs it with uvicorn in a thread.

STOW-RS (``POST /dicomweb/studies[/{study}]``, ``multipart/related; type="application/dicom"``) streams the body
through python-multipart (`node.stow`, which also builds the answer) into one temporary file (spilled to disk past
1 MiB) and only then stores the parts, one at a time, so memory holds at most one part and a request refused as a
whole stores nothing. Each part is a Part 10 file; the dataset after its file meta goes to `Ingestor.accept` —
Success only after the spool fsync and the index commit, as for C-STORE. HTTP statuses: 200 all stored, 202 some
failed, 409 none stored (FailedSOPSequence carries each FailureReason: the `ReceiveError` DIMSE status, 0xA900 for a
study other than the URL's, 0xC122 for a transfer syntax the node cannot decode, 0x0122 for a non-storage SOP class,
0xA700 for a Deflated data set that inflates past ``[node] max_inflated_bytes``); 400 malformed request or body, 401
missing/wrong bearer token, 413 body over ``stow_max_request_bytes``, a part over ``max_instance_bytes`` or more
than `node.stow.MAX_PARTS` parts (refused as soon as the body shows it, before the rest is read), 415 not
``multipart/related`` of ``application/dicom``. Admission control (`node.admission`, through the `Ingestor`): 503
with ``Retry-After`` before the body is read while free space is below the hard reserve, and as soon as it falls
below it while the body arrives (re-read every `BODY_CHECK_BYTES`; the body is dropped); otherwise each part of a
new series is refused with 0xA700 while the node is paused, and a request whose every part was so refused is
answered 503 with ``Retry-After`` (the header also comes with a 202/409 that contains such refusals).

A STOW request is recorded in the index like an association (calling AE "STOW-RS", released when the request is
answered) so completion can judge a series sent in one request as it does one sent in one association. A request
that stores nothing (answered 4xx or 5xx past the token check) is audited too (`node.auditrecords.StowRefusals`).
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import IO, Any

from pynetdicom import AllStoragePresentationContexts
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.admission import below_reserve
from node.audit import AuditTrail, Outcome
from node.auditdb import audit_received
from node.auditrecords import StowRefusals
from node.auth import Authenticator, client_host
from node.config import NodeConfig
from node.errors import AdmissionRefusedError, DatabaseError, ReceiveError
from node.http import HealthProbe, probe_routes
from node.index import Index
from node.ingest import ACCEPTED_TRANSFER_SYNTAXES, EncodedDataset, Ingestor, Origin
from node.logs import get_logger
from node.metrics import Metrics
from node.qido import SERIES_KEYS, STUDY_KEYS, Found, Query, find_series, find_studies
from node.states import AdmissionReason, AssociationState
from node.stow import (
    BodyReader,
    Part,
    PartFailed,
    PartOutcome,
    Refused,
    StowFailure,
    part_data,
    split_part10,
    store_response,
    stow_boundary,
)
from node.uids import check_uid

STOW_CALLING_AE = "STOW-RS"  # the "calling AE" of instances that came in over STOW-RS (index, file meta)
DICOM_JSON = "application/dicom+json"
# PS3.18 8.3.4.4: said (Warning 299) when a QIDO-RS answer leaves matches out
MORE_RESULTS = "There are additional results that can be requested"
IN_MEMORY_BODY_BYTES = 1 << 20  # request bodies beyond this go to a temp file on the data disk
BODY_CHECK_BYTES = 64 << 20  # a body re-checks the data disk's free space each time this much more arrived
LOGGED_PART_REFUSALS = 20  # parts of one request whose refusal gets a log line of its own

_STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
_ACCEPTED_TS = frozenset(str(ts) for ts in ACCEPTED_TRANSFER_SYNTAXES)


class _DicomWeb:
    """Request handlers; `create_app` turns the bound methods into routes."""

    def __init__(
        self,
        config: NodeConfig,
        ingestor: Ingestor,
        index: Index,
        health: HealthProbe,
        metrics: Metrics,
        token: str | None,
        on_released: Callable[[], None] | None,
        max_request_bytes: int | None,
        authenticator: Authenticator | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        self.auth = authenticator or Authenticator(token, metrics=metrics, audit=audit)  # ValueError: empty token
        self.audit = audit
        self._refusals = StowRefusals(audit)  # requests that stored nothing, recorded up to a burst per address
        if max_request_bytes is not None and max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1 or None, not {max_request_bytes}")
        self.config = config
        self.ingestor = ingestor
        self.index = index
        self.metrics = metrics
        self.token = token
        self.on_released = on_released
        self.max_request_bytes = max_request_bytes
        self.tmp_dir = config.node.data_dir / "incoming"
        self._retry_after = config.admission.retry_after_seconds
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.log = get_logger(component="dicomweb")

    # -- auth (node.auth) -----------------------------------------------------------------------------------
    async def _unauthorized(self, request: Request) -> Response | None:
        """None when the request may proceed, else the 401 answer (counted, logged, audited)."""
        return await self.auth.check(request, "dicomweb")

    # -- STOW-RS ----------------------------------------------------------------------------------------------
    async def stow(self, request: Request) -> Response:
        denied = await self._unauthorized(request)
        if denied is not None:
            self.metrics.stow_request(denied.status_code)
            return _closing(denied)
        request_id = uuid.uuid4().hex
        log = self.log.bind(request_id=request_id, client=_client(request))
        study: str | None = None
        if "study" in request.path_params:
            try:
                study = check_uid(request.path_params["study"], "StudyInstanceUID")
            except ReceiveError as exc:  # the message shows at most 80 escaped characters of the value
                log.warning("stow_refused", http_status=400, reason=str(exc))
                self.metrics.stow_request(400)
                response = _closing(JSONResponse({"error": f"the URL's study is not a UID: {exc}"}, status_code=400))
                await self._audit_refused(request, response, None)
                return response
            log = log.bind(url_study_uid=study)
        response = await self._stow(request, request_id, study, log)
        if response.status_code >= 300:  # nothing stored (a 202 stored some: their receipt is the record)
            await self._audit_refused(request, response, study)
        return response

    async def _audit_refused(self, request: Request, response: Response, study: str | None) -> None:
        """The record of a request that stored nothing (`node.auditrecords`), written off the event loop."""
        write = self._refusals.record(status=response.status_code, answer=bytes(response.body), user=self.auth.user,
                                      peer=client_host(request), path=request.url.path, study=study)
        if write is not None:
            await run_in_threadpool(write)

    async def _stow(self, request: Request, request_id: str, study: str | None, log: Any) -> Response:
        too_large = self._declared_too_large(request)
        if too_large is not None:  # refused before a byte of the body is read
            log.warning("stow_refused", http_status=413, reason=too_large)
            self.metrics.stow_request(413)
            return _closing(JSONResponse({"error": too_large}, status_code=413))
        admission = self.ingestor.admission
        refusal = await run_in_threadpool(admission.refuses_all) if admission is not None else None
        if refusal is not None:  # node.admission logs it, rate-limited; the body is never read
            self.metrics.admission_refused(refusal.reason, "stow")
            self.metrics.stow_request(503)
            return _closing(JSONResponse({"error": str(refusal), "reason": refusal.reason}, status_code=503,
                                         headers={"Retry-After": str(refusal.retry_after)}))
        t0 = time.monotonic()
        with tempfile.SpooledTemporaryFile(max_size=IN_MEMORY_BODY_BYTES, mode="w+b", dir=str(self.tmp_dir)) as body:
            try:
                parts, received = await self._read_body(request, body)
            except Refused as exc:
                log.warning("stow_refused", http_status=exc.http_status, reason=exc.reason)
                return self._refused_body(exc)
            except ClientDisconnect:
                log.warning("stow_client_disconnected")
                self.metrics.stow_request(400)
                return JSONResponse({"error": "client disconnected"}, status_code=400)
            log.info("stow_received", parts=len(parts), bytes=received)
            try:
                outcomes = await run_in_threadpool(self._store_parts, body, parts, request_id, study, _client(request))
            except DatabaseError as exc:
                log.error("stow_index_unavailable", error=str(exc))
                self.metrics.stow_request(503)
                return JSONResponse({"error": "the index database is unavailable"}, status_code=503)
        stored = sum(1 for o in outcomes if o.stored)
        paused = [o.retry_after for o in outcomes if o.retry_after is not None]
        status = 200 if stored == len(outcomes) else 202 if stored else 503 if len(paused) == len(outcomes) else 409
        headers = {"Retry-After": str(max(paused))} if paused else None
        self.metrics.stow_request(status)
        log.info(
            "stow_answered", http_status=status, stored=stored, failed=len(outcomes) - stored, bytes=received,
            seconds=round(time.monotonic() - t0, 3),
        )
        answer = await run_in_threadpool(lambda: json.dumps(store_response(outcomes).to_json_dict()))  # off the loop
        return Response(answer, status_code=status, media_type=DICOM_JSON, headers=headers)

    async def _read_body(self, request: Request, body: IO[bytes]) -> tuple[list[Part], int]:
        """The request body streamed into ``body``: its parts and its length. Raises `Refused` as soon as the body
        shows a reason, and `ClientDisconnect`."""
        reader = BodyReader(stow_boundary(request.headers.get("content-type")), body,
                            self.config.node.max_instance_bytes)
        received = checked = 0
        async for chunk in request.stream():
            received += len(chunk)
            if self.max_request_bytes is not None and received > self.max_request_bytes:
                raise Refused(413, f"request body exceeds {self.max_request_bytes} bytes")
            if received - checked >= BODY_CHECK_BYTES:
                checked = received
                self._check_room()
            reader.write(chunk)
        return reader.finish(), received

    def _refused_body(self, exc: Refused) -> Response:
        """The answer to a request refused while its body was read (counted; the caller logs it)."""
        self.metrics.stow_request(exc.http_status)
        if exc.http_status != 503:
            return JSONResponse({"error": exc.reason}, status_code=exc.http_status)
        # the disk reached its reserve while the body arrived: refused as admission refuses, the rest left unread
        self.metrics.admission_refused(AdmissionReason.DISK_RESERVE.value, "stow")
        return _closing(JSONResponse({"error": exc.reason, "reason": AdmissionReason.DISK_RESERVE.value},
                                     status_code=503, headers={"Retry-After": str(self._retry_after)}))

    def _check_room(self) -> None:
        """Raise `Refused` (503) once the data disk is down to ``[admission]``'s hard reserve: admission judges a
        request before its body and each part once the body is in, so bodies of up to ``stow_max_request_bytes``
        on many connections could otherwise fill the disk under the spool and the index while they arrive (as a
        spilling C-STORE, `node.guard.BoundedDataset`)."""
        try:
            full = below_reserve(self.tmp_dir, self.config.admission, self.config.node.spool_dir)
        except OSError as exc:
            raise Refused(503, f"the data disk's free space cannot be read: {exc.strerror}") from exc
        if full:
            raise Refused(503, "the data disk is down to its reserve; the request body was dropped")

    def _declared_too_large(self, request: Request) -> str | None:
        """Why the request's Content-Length is over ``max_request_bytes`` (None when it is not, or not given)."""
        declared = request.headers.get("content-length", "")
        digits = declared.isascii() and declared.isdigit()  # not '²', which int() refuses
        if self.max_request_bytes is None or not digits or int(declared) <= self.max_request_bytes:
            return None
        return f"request body of {declared[:20]} bytes exceeds {self.max_request_bytes} bytes"

    def _store_parts(
        self, body: IO[bytes], parts: list[Part], request_id: str, study: str | None, client: str
    ) -> list[PartOutcome]:
        """Store each part in turn (one in memory at a time, a large one not at all); the request is the
        "association" of its parts."""
        self.index.association_opened(request_id, STOW_CALLING_AE, self.config.node.ae_title, client[:64])
        state = AssociationState.ABORTED
        try:
            origin = Origin(calling_ae=STOW_CALLING_AE, association_id=request_id)
            outcomes = []
            for n, part in enumerate(parts):
                outcomes.append(self._store_one(part_data(body, part), n, origin, study))
            state = AssociationState.RELEASED
            return outcomes
        finally:
            # The receipt before the row's close: a process killed in between leaves the row open, and the restart
            # audits it (node.auditdb.audit_dangling_closed) - once, or twice, never lost with the process.
            audit_received(self.audit, self.index.engine, request_id, source_user=self.auth.user, peer=client,
                           context={"request_id": request_id, "front_door": "STOW-RS"})
            with contextlib.suppress(DatabaseError):  # bookkeeping only; the instances' rows are already committed
                self.index.association_closed(request_id, state)
            if state is AssociationState.RELEASED and self.on_released is not None:
                try:
                    self.on_released()  # lets completion judge the series now instead of at the next sweep
                except Exception:  # a hook's failure must not turn stored instances into a failed request
                    self.log.exception("on_released_failed", request_id=request_id)

    def _store_one(self, data: EncodedDataset, n: int, origin: Origin, study: str | None) -> PartOutcome:
        out = PartOutcome()
        log = self.log.bind(request_id=origin.association_id, part=n, size=len(data))
        try:
            meta, offset = split_part10(data)
            ts = str(meta.TransferSyntaxUID)
            out.sop_class_uid = str(meta.MediaStorageSOPClassUID)
            out.sop_uid = str(meta.MediaStorageSOPInstanceUID)
            if ts not in _ACCEPTED_TS:
                raise PartFailed(StowFailure.TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {ts} is not accepted")
            if out.sop_class_uid not in _STORAGE_SOP_CLASSES:
                raise PartFailed(StowFailure.SOP_CLASS_NOT_SUPPORTED, f"SOP class {out.sop_class_uid} is not a storage class")
            accepted = self.ingestor.accept(
                data[offset:] if isinstance(data, bytes) else data.sub(offset), ts, origin,
                sop_class_uid=out.sop_class_uid, sop_instance_uid=out.sop_uid,
                study_uid=study, max_inflated_bytes=self.config.node.max_inflated_bytes,
            )
        except AdmissionRefusedError as exc:  # node.admission logs these, rate-limited: not one line per part
            out.failure, out.reason, out.retry_after = int(exc.status), str(exc), exc.retry_after
            self.metrics.admission_refused(exc.reason, "stow")
            self.metrics.rejected(type(exc).__name__, "stow")
            return out
        except (ReceiveError, PartFailed) as exc:
            out.failure, out.reason = int(exc.status), str(exc)
            self.metrics.rejected(type(exc).__name__ if isinstance(exc, ReceiveError) else exc.status.name, "stow")
            if n < LOGGED_PART_REFUSALS:  # not one line per part of 100,000 (the answer and stow_answered count all)
                log.warning("instance_refused", sop_uid=out.sop_uid or None, status=f"0x{out.failure:04X}",
                            reason=out.reason)
            return out
        except DatabaseError:
            raise  # the index is down: the whole request fails (503), as later parts would
        except Exception:
            # The boundary: an unexpected failure fails this part, and the request goes on.
            out.failure, out.reason = int(StowFailure.PROCESSING_FAILURE), "processing failure"
            self.metrics.rejected("ProcessingFailure", "stow")
            log.exception("instance_failed", sop_uid=out.sop_uid or None)
            return out
        rec = accepted.record
        out.stored = True
        self.metrics.instance_received(rec.sop_class_uid, rec.transfer_syntax_uid, len(data), "stow")
        log.info(
            "instance_stored", study_uid=rec.study_uid, series_uid=rec.series_uid, sop_uid=rec.sop_uid,
            transfer_syntax=rec.transfer_syntax_uid, outcome=str(accepted.outcome),
        )
        return out

    # -- QIDO-RS ----------------------------------------------------------------------------------------------
    async def _not_acceptable(self, request: Request) -> Response | None:
        """The 406 answer (audited) when the request's Accept admits no DICOM JSON, the only form answered here."""
        if _accepts_json(request.headers.get("accept", "")):
            return None
        await self._audit_query(request, None, Outcome.MINOR_FAILURE)
        return JSONResponse({"error": f"the Accept header admits no {DICOM_JSON}, the only media type answered"},
                            status_code=406)

    async def search_studies(self, request: Request) -> Response:
        denied = await self._unauthorized(request) or await self._not_acceptable(request)
        if denied is not None:
            return denied
        try:
            query = Query(request.query_params, STUDY_KEYS)
        except ValueError as exc:
            await self._audit_query(request, None, Outcome.MINOR_FAILURE)
            return JSONResponse({"error": str(exc)}, status_code=400)
        return await self._answer(request, query, lambda q: find_studies(self.index.engine, q))

    async def search_series(self, request: Request) -> Response:
        denied = await self._unauthorized(request) or await self._not_acceptable(request)
        if denied is not None:
            return denied
        try:
            study = check_uid(request.path_params["study"], "StudyInstanceUID")
            query = Query(request.query_params, SERIES_KEYS)
        except (ReceiveError, ValueError) as exc:
            await self._audit_query(request, None, Outcome.MINOR_FAILURE)
            return JSONResponse({"error": str(exc)}, status_code=400)
        return await self._answer(request, query, lambda q: find_series(self.index.engine, study, q))

    async def _answer(self, request: Request, query: Query, find: Callable[[Query], Found]) -> Response:
        """The QIDO-RS answer; a Warning names ignored keys, and says when more matches follow than were returned
        (the ``limit``, the client's or `node.qido.QIDO_MAX_RESULTS`, cut them off: PS3.18 8.3.4.4)."""
        try:
            found, more = await run_in_threadpool(find, query)
        except SQLAlchemyError as exc:
            self.log.error("qido_index_unavailable", error=type(exc).__name__)
            await self._audit_query(request, None, Outcome.SERIOUS_FAILURE)
            return JSONResponse({"error": "the index database is unavailable"}, status_code=503)
        await self._audit_query(request, len(found), Outcome.SUCCESS)
        warnings = []
        if query.ignored:  # the names as the client sent them: only printable ASCII, no quotes, may go in a header
            names = ", ".join(re.sub(r'[^\x20-\x7e]|["\\]', "?", n)[:64] for n in sorted(query.ignored)[:20])
            warnings.append(f'299 pacsnode "query keys not supported, ignored: {names}"')
        if more:
            warnings.append(f'299 pacsnode "{MORE_RESULTS}"')
        body = json.dumps([ds.to_json_dict() for ds in found])
        response = Response(body, media_type=DICOM_JSON)
        for warning in warnings:
            response.headers.append("Warning", warning)
        return response

    async def _audit_query(self, request: Request, matches: int | None, outcome: int) -> None:
        """The query's 110112 record, written off the event loop: an audit file that stalls (a hung network
        volume) holds up this request, never the server's other requests and probes."""
        if self.audit is not None:
            await run_in_threadpool(
                self.audit.query, user=self.auth.user, peer=client_host(request), path=request.url.path,
                query_string=request.url.query, matches=matches, outcome=outcome,
            )



def _closing(response: Response) -> Response:
    """``response`` with ``Connection: close``: for a STOW-RS request answered before its body was read, so the
    server closes the connection at once instead of holding it (with the unread body) until keep-alive ends."""
    response.headers["Connection"] = "close"
    return response


def _accepts_json(accept: str) -> bool:
    """Whether an Accept header admits ``application/dicom+json`` or ``application/json`` (RFC 9110 12.5.1: the most
    specific media range that matches decides, ``q=0`` refuses); none, or an empty one, admits anything."""
    if not accept.strip():
        return True
    ranges: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                with contextlib.suppress(ValueError):  # a malformed weight is ignored (the range admitted)
                    q = float(value)
        ranges[media] = max(q, ranges.get(media, 0.0))
    for media in (DICOM_JSON, "application/json"):
        q = next((ranges[r] for r in (media, "application/*", "*/*") if r in ranges), 0.0)
        if q > 0:
            return True
    return False


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def create_app(
    config: NodeConfig,
    ingestor: Ingestor,
    index: Index,
    *,
    health: HealthProbe,
    metrics: Metrics,
    token: str | None,
    on_released: Callable[[], None] | None = None,
    max_request_bytes: int | None = None,
    authenticator: Authenticator | None = None,
    audit: AuditTrail | None = None,
) -> Starlette:
    """The node's HTTP app. ``token``: bearer token required for ``/dicomweb/*`` (None: open).
    ``on_released``: called after each STOW request that was processed (e.g. the completion sweeper's nudge).
    ``max_request_bytes``: STOW bodies over this are refused with 413 (None: no limit). ``authenticator``: the
    node's one `node.auth.Authenticator` (default: one for ``token``); it also guards ``/metrics`` when ``[node]
    metrics_require_token``. ``audit``: STOW-RS receipts and QIDO-RS queries go to this trail. Raises ValueError
    for an empty token or a limit < 1."""
    web = _DicomWeb(config, ingestor, index, health, metrics, token, on_released, max_request_bytes,
                    authenticator, audit)
    routes = [
        Route("/dicomweb/studies", web.stow, methods=["POST"]),
        Route("/dicomweb/studies/{study}", web.stow, methods=["POST"]),
        Route("/dicomweb/studies", web.search_studies, methods=["GET"]),
        Route("/dicomweb/studies/{study}/series", web.search_series, methods=["GET"]),
        *probe_routes(health, metrics, web.auth, metrics_require_token=config.node.metrics_require_token),
    ]
    return Starlette(routes=routes)


__all__ = ["StowFailure", "create_app"]
