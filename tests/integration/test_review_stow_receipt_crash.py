"""Review: a STOW-RS receipt (110104) must survive the listener dying while it is written. The request is recorded
in the index like an association; a DIMSE association left open by a dead listener is closed at the restart and
audited then (tests/integration/test_audit_trail.py). The STOW handler closed its request's row *before* writing
the receipt, so a listener killed (kill -9, the OOM killer) in between left the instances stored and indexed (they
go on to be processed; the sender saw no answer), a closed row, and no record of who sent them: the restart found
nothing open to audit.

The window is held open honestly: the audit "file" is a FIFO whose pipe the test fills, so the listener's write of
the receipt blocks in write(2) (as on a hung network volume); the test then SIGKILLs that listener, drains the pipe
and reads what the trail received."""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_until
from tests.ctgen import write_ct_series
from tests.integration.test_audit_trail import LEAN_PROCESSES, listener_process

pytestmark = pytest.mark.integration

PATIENT = "STOW-CRASH-PID-42"
BOUNDARY = "stow-crash"


class _Pipe:
    """The audit FIFO's other end: drained in a thread while ``draining`` is set; `fill` stops draining and fills
    the pipe so the node's next record blocks."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self.received = bytearray()
        self.draining = threading.Event()
        self.draining.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            if not self.draining.wait(0.1) or not select.select([self.fd], [], [], 0.1)[0]:
                continue
            with self._lock, contextlib.suppress(BlockingIOError):
                if self.draining.is_set():
                    self.received += os.read(self.fd, 1 << 20)

    def fill(self) -> None:
        with self._lock:  # no read of the drain thread's after this
            self.draining.clear()
            with contextlib.suppress(BlockingIOError):
                self.received += os.read(self.fd, 1 << 20)  # what the node wrote so far
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(self.fd, b"\n")  # one byte at a time: the pipe ends up full to its last byte

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in bytes(self.received).splitlines() if line.strip()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.fd)


def _blocked_writing(pid: int, fifo: Path) -> bool:
    """Whether a thread of ``pid`` waits in write(2) on ``fifo`` (not on another pipe: its log stream)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if not (task / "wchan").read_text().endswith("pipe_write"):
                continue
            fd = int((task / "syscall").read_text().split()[1], 16)  # the blocked call's first argument
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(fifo):
                return True
    return False


def _gone(pid: int) -> bool:
    """Whether every thread of ``pid`` has ended (each a zombie, or the process reaped): after SIGKILL a thread
    blocked writing to the pipe still writes its record if the pipe has room before it runs again (pipe_write looks
    for room before it looks for a signal), and the group leader shows "Z" while such a thread has not run yet."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return True
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return False
    return True


def fifo_audit(fifo: Path) -> str:
    """The [audit] section that sends the trail to ``fifo`` (a `_Pipe`), never rotated."""
    return f'[audit]\npath = {json.dumps(str(fifo))}\nrotate_daily = false\nrotate_bytes = 0\n'


def stow_body(paths: Any) -> bytes:
    """A multipart/related STOW-RS body (boundary `BOUNDARY`) of the files ``paths``."""
    body = io.BytesIO()
    for path in paths:
        body.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    body.write(f"--{BOUNDARY}--\r\n".encode())
    return body.getvalue()


def receipts_after_killing(node: Any, pipe: _Pipe, fifo: Path, pid: int, what: str) -> list[dict[str, Any]]:
    """Wait for listener ``pid`` to block writing ``what`` to the full ``fifo``, SIGKILL it, drain the pipe once it
    is dead (before, its blocked write may still land), wait for its restart, and return the 110104 receipts
    (``instances_received``) the trail then holds."""
    wait_until(lambda: _blocked_writing(pid, fifo), 30, f"the listener blocked writing {what}",
               diagnostics=lambda: node.log_text()[-3000:])
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _gone(pid), 30, "the listener dead")
    pipe.draining.set()
    wait_until(lambda: (p := listener_process(node))["restarts"] == 1 and p["alive"], 60, "the listener restarted",
               diagnostics=lambda: node.log_text()[-3000:])
    return wait_until(lambda: [r for r in pipe.records() if r["event"] == "instances_received"], 30,
                      f"{what} in the audit trail", diagnostics=lambda: node.log_text()[-3000:])


def test_a_listener_killed_while_writing_a_stow_receipt_still_leaves_the_receipt(start_node, tmp_path):
    fifo = tmp_path / "audit.fifo"
    pipe = _Pipe(fifo)
    node = start_node(extra_toml=LEAN_PROCESSES + fifo_audit(fifo))
    series = write_ct_series(tmp_path / "s", slices=2, size=16, seed=11, patient_id=PATIENT)
    body = stow_body(series.paths)
    answers: list[Any] = []

    def post() -> None:
        try:
            answers.append(httpx.post(f"http://127.0.0.1:{node.http_port}/dicomweb/studies", content=body,
                                      timeout=120, headers={"Content-Type": f'multipart/related; type="application/'
                                                            f'dicom"; boundary={BOUNDARY}'}).status_code)
        except httpx.HTTPError as exc:
            answers.append(type(exc).__name__)

    ready = f"http://127.0.0.1:{node.http_port}/readyz"  # every process up: none still writing its start-up rows
    wait_until(lambda: httpx.get(ready, timeout=10).status_code == 200, 60, "the node ready")
    pid = listener_process(node)["pid"]
    sender = threading.Thread(target=post, daemon=True)
    try:
        pipe.fill()
        sender.start()
        received = receipts_after_killing(node, pipe, fifo, pid, "the STOW receipt")
    finally:
        pipe.draining.set()
        sender.join(30)
        node.stop()
        pipe.close()
    assert answers and answers[0] != 200  # the listener died before it answered
    (record,) = received
    study, patient = record["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == series.study_uid
    assert study["ParticipantObjectDescription"]["SOPClass"] == [
        {"UID": "1.2.840.10008.5.1.4.1.1.2", "NumberOfInstances": 2}]
    assert patient["ParticipantObjectID"] == PATIENT
    assert PATIENT not in node.log_text()
