"""Read deadlines and connection caps for the HTTP side: uvicorn's h11 protocol with a header deadline, a body
read timeout and a per-address connection cap.

What uvicorn 0.55 (h11 0.16, no httptools installed) does by itself, and the gaps this module closes:

- ``timeout_keep_alive`` is armed only *after a response* (``on_response_complete``) and cancelled by the first
  byte of the next request. A fresh connection that sends nothing, or a head dribbled a byte at a time
  (slowloris), has no timer at all; neither has a request body that stalls halfway (the app's ``receive()``
  waits forever). Here a request head must be complete within ``header_timeout`` of its first byte (of the
  connection's opening, for the first request), and while a body is being received and the app is ready for
  more (reading not paused by flow control), some of it must arrive every ``body_timeout`` — nginx's
  ``client_header_timeout`` / ``client_body_timeout``. A client past either is disconnected (the app sees
  ``http.disconnect``; a STOW request then stores nothing).
- ``h11_max_incomplete_event_size`` (16 KiB by default) bounds the request line plus headers only while they
  are *incomplete*: a head that arrives whole in one read (asyncio reads up to 256 KiB) is parsed whatever its
  size (measured: a 5 KiB head passes a 4 KiB limit). So the head's size is also counted here as it arrives,
  and one over ``max_header_bytes`` is answered 431 and closed before h11 parses it — also a pipelined head,
  which arrives while the request before it is in progress and waits in h11's buffer until that one is answered
  (``on_response_complete``, where uvicorn has h11 parse it). Bodies are not bounded by
  either (h11 hands them out as they arrive; the STOW handler counts them).
- ``limit_concurrency`` answers *requests* with 503 while that many connections or tasks exist; connections are
  still accepted. So one address is also capped here at ``max_connections_per_peer`` open connections, closed
  at once beyond it, which keeps one slowloris client from holding every slot of ``limit_concurrency``.
- A request answered before its body was read (a 4xx refusal, ``/healthz`` with a declared body) leaves h11
  waiting for the rest of the body with the response sent: neither deadline above applies any more, and uvicorn's
  keep-alive timer, armed after the response, is cancelled by the next byte and never armed again, so one byte at
  a time held the connection for good. Such a connection is not kept alive: its write side is shut (FIN after the
  response) and what the client still sends is read and dropped (closing with it unread would reset the
  connection, and the client could lose the answer) until the client closes, has sent nothing for
  `LINGER_QUIET_SECONDS`, or ``body_timeout`` after the response at the latest, when it is closed (nginx's lingering
  close; over TLS, where there is no FIN, the quiet close is what tells a pooled client the connection is done).

- Over HTTPS, asyncio (given ``ssl=``) completes the TLS handshake before uvicorn's protocol sees the connection,
  with a 60 s timeout of its own and no cap: a client that opened TCP and sent no ClientHello, or dribbled one,
  held a socket that long, as many as it opened. So the server gets no ``ssl`` and `TlsHandshake` does it: the
  connection is counted against ``max_connections_per_peer`` at the accept, the handshake must end within
  ``header_timeout`` (a failed one is refused as ``tls_handshake_failed``), and the head's deadline runs from the
  accept.

Drops and refusals go through `node.refusals.Refusals` (counted, logged a few times per address and minute).

uvicorn internals this relies on (hence pyproject pins uvicorn 0.55.x and h11 0.16.x; tests/unit/test_hostile_http.py
fails if one changes): `H11Protocol`'s ``conn`` (the h11 connection, its public ``trailing_data``),
``on_response_complete``, ``_unset_keepalive_if_required``, ``flow.read_paused``, ``cycle.response_started``,
``client``, ``loop`` and ``transport``, and ``Config(http=<protocol class>)`` being used as given (so installing
httptools does not swap the protocol out).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from node.refusals import Refusals
from node.states import PeerRefusal
from node.tls import describe_tls_error, presented_itself

if TYPE_CHECKING:
    from node.audit import AuditTrail
    from node.config import NodeSection

_MIN_TICK, _MAX_TICK = 0.05, 1.0
# A connection answered before its body was read is closed once the client has sent nothing for this long: over TLS
# there is no half-close (FIN) to tell a pooled client the connection is done, so until then its next request on
# it went unanswered (for up to body_timeout, 60 s)
LINGER_QUIET_SECONDS = 1.0


@dataclass(frozen=True)
class HttpLimits:
    """The bounds each HTTP connection works within (see the module docstring)."""

    header_timeout: float
    body_timeout: float
    max_connections: int  # uvicorn's limit_concurrency: requests beyond it get 503
    max_connections_per_peer: int
    max_header_bytes: int  # h11_max_incomplete_event_size

    def __post_init__(self) -> None:
        if self.header_timeout <= 0 or self.body_timeout <= 0:
            raise ValueError(
                f"header_timeout and body_timeout must be > 0, not {self.header_timeout}, {self.body_timeout}"
            )
        if self.max_connections < 1 or self.max_connections_per_peer < 1 or self.max_header_bytes < 1024:
            raise ValueError(
                "max_connections and max_connections_per_peer must be >= 1 and max_header_bytes >= 1024, not "
                f"{self.max_connections}, {self.max_connections_per_peer}, {self.max_header_bytes}"
            )

    @classmethod
    def from_config(cls, node: NodeSection) -> HttpLimits:
        return cls(
            header_timeout=node.http_header_timeout_seconds,
            body_timeout=node.http_body_timeout_seconds,
            max_connections=node.http_max_connections,
            max_connections_per_peer=node.http_max_connections_per_peer,
            max_header_bytes=node.http_max_header_bytes,
        )

    @property
    def tick(self) -> float:
        """How often each connection's deadlines are checked."""
        return min(max(min(self.header_timeout, self.body_timeout) / 4, _MIN_TICK), _MAX_TICK)

    def uvicorn_settings(self) -> dict[str, Any]:
        """The `uvicorn.Config` keywords for these limits."""
        return {"limit_concurrency": self.max_connections, "h11_max_incomplete_event_size": self.max_header_bytes}


def no_delay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on the connection. asyncio sets it only on sockets whose ``proto`` is IPPROTO_TCP, and the
    listening socket the node hands uvicorn (``socket.create_server``, or one inherited from the supervisor) has
    proto 0, as have the connections it accepts: every response after the first on a kept-alive connection waited
    ~40 ms for the client's delayed ACK (Nagle), capping a client that reuses its connection (OHIF's QIDO-RS, a
    STOW-RS sender with a session) at ~23 requests a second."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PeerCount:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: dict[str, int] = {}


class GuardedH11Protocol(H11Protocol):
    """uvicorn's `H11Protocol` with read deadlines and a per-address connection cap; made per server by
    `guarded_protocol`, which sets the class attributes."""

    limits: ClassVar[HttpLimits]
    refusals: ClassVar[Refusals]
    peers: ClassVar[_PeerCount]

    _head_started: float | None = None  # when the current request head began (None: not waiting for one)
    _last_read: float = 0.0
    _timer: asyncio.TimerHandle | None = None
    _counted: str | None = None  # the address this connection is counted under
    _head_seen = 0  # bytes of the current request head received so far
    _head_tail = b""  # its last 3 bytes (a CRLFCRLF may straddle two reads)
    _lingering_since: float | None = None  # when a response went out before its request's body was read
    _opened_at: float | None = None  # over TLS: when the TCP connection was accepted (the head's deadline runs from it)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        no_delay(transport)
        super().connection_made(transport)
        if self._counted is None and not self.admit(transport):  # over TLS, `TlsHandshake` admitted it already
            return
        self._head_started = self._last_read = self._opened_at or self.loop.time()
        self._timer = self.loop.call_later(self.limits.tick, self._check_deadlines)

    def admit(self, transport: asyncio.Transport) -> bool:
        """Count the connection under its address, or refuse and abort it when that address is at its cap."""
        peer = transport.get_extra_info("peername")
        address, port = (str(peer[0]), peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else ("unknown", None)
        with self.peers.lock:
            open_now = self.peers.open.get(address, 0)
            admitted = open_now < self.limits.max_connections_per_peer
            if admitted:
                self.peers.open[address] = open_now + 1
                self._counted = address
        if not admitted:
            self.refusals.record(PeerRefusal.PEER_LIMIT_REACHED, address, port, open=open_now,
                                 limit=self.limits.max_connections_per_peer)
            transport.abort()
        return admitted

    def release(self) -> None:
        """Uncount the connection (once)."""
        if self._counted is not None:
            with self.peers.lock:
                left = self.peers.open.get(self._counted, 0) - 1
                if left > 0:
                    self.peers.open[self._counted] = left
                else:
                    self.peers.open.pop(self._counted, None)
            self._counted = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        self._last_read = now
        if self._lingering_since is not None:
            return  # the rest of a body already answered, or more after it: dropped unparsed
        if self.conn.their_state is h11.IDLE:
            if self._head_started is None:
                self._head_started = now  # the first byte of a further request on a kept-alive connection
            if self._head_too_large(data):
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._head_started = None
            self._head_seen, self._head_tail = 0, b""

    def on_response_complete(self) -> None:
        body_unread = self.conn.their_state is h11.SEND_BODY
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE and not self.transport.is_closing():
            # A pipelined request read together with the one just answered waits in h11's buffer, uncounted (it
            # came while a request was in progress), and uvicorn is about to have h11 parse it whole: count it now.
            self._head_seen, self._head_tail = 0, b""
            buffered = bytes(self.conn.trailing_data[0])
            if buffered:
                self._head_started = self.loop.time()
                if self._head_too_large(buffered):
                    return
        super().on_response_complete()
        if body_unread and not self.transport.is_closing():
            self._linger()
        elif self.conn.their_state is not h11.IDLE:  # the pipelined request was parsed
            self._head_started = None
            self._head_seen, self._head_tail = 0, b""

    def _linger(self) -> None:
        """Close a connection answered before its request body was read (see the module docstring): no keep-alive,
        FIN after the response, the rest read and dropped until the client closes or ``body_timeout`` passes."""
        self._unset_keepalive_if_required()
        self._lingering_since = self.loop.time()
        if self.transport.can_write_eof():  # not over TLS: there the client just sees the close
            self.transport.write_eof()

    def _head_too_large(self, data: bytes) -> bool:
        """Count ``data`` into the request head; answer 431 and close when the head passes ``max_header_bytes``."""
        window = self._head_tail + data
        end = window.find(b"\r\n\r\n")
        size = self._head_seen + len(data) if end < 0 else self._head_seen - len(self._head_tail) + end + 4
        self._head_seen += len(data)
        self._head_tail = window[-3:]
        if size <= self.limits.max_header_bytes:
            return False
        client = self.client or ("unknown", None)
        self.refusals.record(PeerRefusal.HTTP_HEADER_TOO_LARGE, str(client[0]), client[1], size=size,
                             limit=self.limits.max_header_bytes)
        message = b"request header fields too large"
        # h11 cannot answer before it has parsed a request, so the refusal is written as it stands.
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(message), message)
        )
        # Not closed at once: the client is usually still sending the head, and a close with its bytes unread makes
        # the kernel reset the connection, which can discard the 431 before the client reads it (seen over HTTPS:
        # the client's send failed with EOF). The rest is read and dropped as after an early answer (`_linger`).
        self._linger()
        return True

    def _check_deadlines(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        state = self.conn.their_state
        if self._lingering_since is not None:
            quiet = now - max(self._last_read, self._lingering_since)
            if now - self._lingering_since > self.limits.body_timeout or quiet > LINGER_QUIET_SECONDS:
                self.transport.close()
                return
        elif state is h11.IDLE and self._head_started is not None:
            if now - self._head_started > self.limits.header_timeout:
                self._drop(PeerRefusal.HTTP_HEADER_TIMEOUT, self.limits.header_timeout)
                return
        elif state is h11.SEND_BODY and not self.flow.read_paused and self.cycle is not None:
            if not self.cycle.response_started and now - self._last_read > self.limits.body_timeout:
                self._drop(PeerRefusal.HTTP_BODY_TIMEOUT, self.limits.body_timeout)
                return
        else:
            self._last_read = max(self._last_read, now - self.limits.tick)  # paused or answering: no stall yet
        self._timer = self.loop.call_later(self.limits.tick, self._check_deadlines)

    def _drop(self, reason: PeerRefusal, timeout: float) -> None:
        client = self.client or ("unknown", None)
        self.refusals.record(reason, str(client[0]), client[1], timeout=timeout)
        self.transport.close()


class TlsHandshake(asyncio.Protocol):
    """HTTPS under the guard: the protocol of the accepted TCP connection, which counts it against the per-address
    cap at once and completes the TLS handshake (``loop.start_tls``) within ``header_timeout``, then hands the TLS
    transport to its `GuardedH11Protocol`, whose head deadline still runs from the accept. Given ``ssl=`` instead,
    asyncio does the handshake before any protocol of uvicorn's sees the connection, with a 60 s timeout of its own
    and no cap, so silent or dribbling clients each held a socket that long, as many as they opened. Made per server
    by `guarded_protocol` with the context (uvicorn then gets none: the scope still says ``https``)."""

    context: ClassVar[ssl.SSLContext]
    protocol: ClassVar[type[GuardedH11Protocol]]
    audit: ClassVar[AuditTrail | None] = None  # where a failed login handshake is recorded, as DIMSE's are

    def __init__(self, **uvicorn_args: Any) -> None:
        self.http = self.protocol(**uvicorn_args)
        self._task: asyncio.Task[None] | None = None
        self._handed_over = False
        self._early = bytearray()  # application data decrypted before the handover

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        no_delay(transport)  # the handshake's flights too
        if self.http.admit(transport):
            self.http._opened_at = self.http.loop.time()
            self._task = self.http.loop.create_task(self._handshake(transport))

    async def _handshake(self, raw: asyncio.Transport) -> None:
        limits = self.http.limits
        if raw.is_closing():  # gone before its handshake began (connection_lost has uncounted it)
            return
        try:
            tls = await self.http.loop.start_tls(raw, self, self.context, server_side=True,
                                                 ssl_handshake_timeout=limits.header_timeout)
        except (OSError, ValueError) as exc:  # ssl.SSLError; ConnectionAbortedError: the timeout; a reset ...
            peer = raw.get_extra_info("peername") or ("unknown", None)
            why = "timed out" if isinstance(exc, ConnectionAbortedError | TimeoutError) else describe_tls_error(exc)
            logged, unrecorded = self.http.refusals.record_counted(PeerRefusal.TLS_HANDSHAKE_FAILED, str(peer[0]),
                                                                   peer[1], why=why, timeout=limits.header_timeout)
            self._audit(str(peer[0]), f"{peer[0]}:{peer[1]}", logged and presented_itself(exc, why), why, unrecorded)
            raw.abort()
            self.http.release()
            return
        if tls is None or tls.is_closing():
            self.http.release()
            return
        tls.set_protocol(self.http)
        self._handed_over = True
        self.http.connection_made(tls)
        if self._early:
            self.http.data_received(bytes(self._early))

    def _audit(self, address: str, peer: str, login: bool, why: str, unrecorded: int) -> None:
        """A failed client-certificate handshake as a 110114 login failure, one by one as far as the refusal log
        goes, then counted (node.acceptor's rule for DICOM TLS); written off the event loop (a stalled audit file)."""
        audit = self.audit
        if audit is None or not (login or unrecorded):
            return

        def write() -> None:
            if unrecorded:
                audit.failures_unrecorded(what="HTTPS handshakes failed", peer=address, count=unrecorded)
            if login:
                audit.tls_handshake_failed(peer=peer, reason=why, over="HTTPS")

        self.http.loop.run_in_executor(None, write)

    def data_received(self, data: bytes) -> None:
        self._early += data  # only between the handshake's end and the handover (start_tls returning)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handed_over:
            self.http.connection_lost(exc)
        else:
            self.http.release()


def guarded_protocol(limits: HttpLimits, refusals: Refusals, context: ssl.SSLContext | None = None,
                     audit: AuditTrail | None = None) -> type[GuardedH11Protocol] | type[TlsHandshake]:
    """A `GuardedH11Protocol` class for one server (its own per-address counts), for ``uvicorn.Config(http=...)``;
    with a TLS ``context``, a `TlsHandshake` class around it (HTTPS: give uvicorn no ``ssl`` of its own), which
    records failed client-certificate handshakes in ``audit``."""
    protocol = type(
        "GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "refusals": refusals, "peers": _PeerCount()}
    )
    if context is None:
        return protocol
    return type("TlsHandshake", (TlsHandshake,), {"context": context, "protocol": protocol, "audit": audit})


__all__ = ["GuardedH11Protocol", "HttpLimits", "TlsHandshake", "guarded_protocol"]
