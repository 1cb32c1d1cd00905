"""Starting a role child of the process supervisor (node.processes): by ``fork`` or by ``exec``, and what a child
asks of the kernel.

Children start by ``fork`` (``[node] child_start = "fork"``, the default where the platform has it): the supervisor
has imported the stages' modules (`PRELOAD`, never TensorFlow) before the first child, so a child starts with them
instead of spending ~1.5 s of CPU importing them again (restarts too), shares their memory pages until it writes
to them, and runs the same code as its supervisor even after the package was upgraded on disk. Fork safety: the
supervisor forks from its main thread, holding a lock (`ProcessSupervisor._fork_lock`) that its SIGHUP reload
thread also holds while it works, and the log streams' write locks (another thread, e.g. the audit trail's syslog
sender, may be inside a log line; a child would inherit that lock held and hang at its first line); the stop
signals are blocked across the fork and set back to their defaults in the child before it runs ``pacsnode serve
--role R`` as the exec'd child would (`fork_child`), ending with ``os._exit``, never returning into the
supervisor's code. ``child_start = "exec"`` runs each child as a fresh ``python -m node.cli serve --role R`` instead.

A child asks the kernel for SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``, `die_with_parent`) and also
stops when its parent pid changes, so a supervisor killed with SIGKILL leaves no orphan listening on the ports.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn, Protocol

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
# What the supervisor imports before forking children: every role's stages (node.service pulls in the front doors,
# the worker's loop without its models, the dispatcher's senders). TensorFlow is never imported here: the worker's
# model runner imports it in the worker alone.
PRELOAD = ("node.service", "node.acceptor", "node.http", "node.dicomweb", "node.admin", "node.prefetch")


class ChildProcess(Protocol):
    """What the supervisor needs of a child process: `subprocess.Popen`'s methods of these names."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


class ForkedChild:
    """A child started by `fork_child`, with the `subprocess.Popen` methods the supervisor uses (``returncode``:
    the exit status, or minus the signal that ended it, as Popen reports it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: it has ended, its status is lost
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def preload(modules: Sequence[str] = PRELOAD) -> None:
    """Import ``modules`` here, then move every object made so far out of the garbage collector's reach
    (`gc.freeze`), so children forked after it neither import them again nor copy their pages by collecting."""
    for name in modules:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()


def fork_child(run: Callable[[], int], env: Mapping[str, str], name: str = "") -> ForkedChild:
    """Fork a child that runs ``run()`` (its exit status) with ``env`` added to its environment, in its own process
    group; ``name`` (e.g. ``listener-0``) becomes its thread name in ``ps -o comm``/``top``, where a forked child's
    command line is its supervisor's. The stop signals are blocked across the fork, so neither side runs a handler
    on the other's state, and the log streams' write locks are held across it (`_fork_holding`)."""
    for stream in (sys.stdout, sys.stderr):  # nothing buffered here is written twice
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        pid = _fork_holding(_log_write_locks())
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid == 0:
        _run_forked(run, env, mask, name)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return ForkedChild(pid)


def _log_write_locks() -> list[Any]:
    """structlog's write locks, one per stream it writes log lines to: a thread of the supervisor inside a log line
    at the fork would leave the child a copy of that lock held, and the child would hang at its first log line
    (structlog keeps them in a module dict; none if a later structlog keeps them elsewhere)."""
    try:
        from structlog._output import WRITE_LOCKS
    except ImportError:
        return []
    return list({id(lock): lock for lock in list(WRITE_LOCKS.values())}.values())


def _fork_holding(locks: Sequence[Any]) -> int:
    """`os.fork` with ``locks`` held across it (no other thread is inside them when the memory is copied), released
    afterwards in both processes."""
    for lock in locks:
        lock.acquire()
    try:
        return os.fork()
    finally:
        for lock in reversed(locks):
            lock.release()


def _run_forked(run: Callable[[], int], env: Mapping[str, str], mask: Iterable[int], name: str) -> NoReturn:
    """The forked child: what a fresh interpreter would start with (default stop signals, its own process group,
    ``env``, prometheus_client's value class for that environment), then ``run``; ends the process whatever
    happens, never unwinding into the supervisor's frames."""
    code = 1
    try:
        os.setpgid(0, 0)
        if name:
            _set_name(f"pacs-{name}")
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.environ.update(env)
        from prometheus_client import values  # its value class was chosen by the environment at its import

        values.ValueClass = values.get_value_class()
        code = run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - whatever it is, this process ends here
        traceback.print_exc()
    finally:
        from node.service import exit_now

        exit_now(code)


def _prctl(option: int, argument: Any) -> None:
    """Linux ``prctl(option, argument)`` for this process (a no-op elsewhere, or where libc does not have it)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, argument, 0, 0, 0)


def _set_name(name: str) -> None:
    """This process's name as ``ps -o comm`` shows it (Linux: its first 15 bytes)."""
    _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))


def die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent ends (a no-op elsewhere)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


__all__ = ["PRELOAD", "ChildProcess", "ForkedChild", "die_with_parent", "fork_child", "preload"]
