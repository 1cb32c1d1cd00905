"""One accept queue for the listener processes: the supervisor binds the DIMSE ports, its listener children accept.

With ``[node] process_model = "processes"``, `node.processes.ProcessSupervisor` binds the DICOM port (and the DICOM
TLS port) itself before it starts any child (`bind`) and hands the listening sockets to its listener
children (inherited through fork, or ``pass_fds`` through exec; their numbers in `ENV`). Every listener waits on
the same socket, and the one that gets to ``accept`` first — an idle one, since a busy one's acceptor thread first
needs its GIL — takes the connection. With a socket each (``SO_REUSEPORT``) the kernel hashed every connection to a
listener however busy: four senders over two listeners split 3 : 1 or 4 : 0 in six runs of eight (README,
"Benchmarks"). The queue also outlives a listener: connections waiting in it when a listener dies, or while it is
restarted, are taken by another listener or by its successor instead of being reset.

A listener started without a supervisor (``pacsnode serve --role listener``, or the threads model) binds its own
socket as before (`inherited` returns None); so does one whose config names another port than the one inherited
(a reload changed it: ports need a restart). The HTTP port keeps ``SO_REUSEPORT``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

ENV = "PACS_AI_NODE_LISTEN_FDS"  # "dimse=5,dimse_tls=6": the inherited listening sockets' descriptors
DIMSE, DIMSE_TLS = "dimse", "dimse_tls"


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on (host, port) for the listener children to share (non-blocking: a listener that
    loses the race for a connection gets EAGAIN, which socketserver ignores, instead of blocking its loop)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog)
    sock.setblocking(False)
    return sock


def env_value(sockets: Mapping[str, socket.socket]) -> str:
    return ",".join(f"{name}={sock.fileno()}" for name, sock in sockets.items())


def inherited(name: str, port: int, environ: Mapping[str, str] | None = None) -> socket.socket | None:
    """The listening socket named ``name`` this process inherited, when its port is ``port`` (or ``port`` is 0);
    a new descriptor for it (closing it leaves the others open). None when there is none."""
    value = (os.environ if environ is None else environ).get(ENV, "")
    fds = dict(item.split("=", 1) for item in value.split(",") if "=" in item)
    if name not in fds:
        return None
    try:
        sock = socket.socket(fileno=os.dup(int(fds[name])))
    except (OSError, ValueError):
        return None  # not open here (a stale variable): bind as without a supervisor
    if port not in (0, sock.getsockname()[1]):
        sock.close()
        return None
    sock.setblocking(False)
    return sock


__all__ = ["DIMSE", "DIMSE_TLS", "ENV", "bind", "env_value", "inherited"]
