"""The DIMSE SCU's responses are never taken by pynetdicom's association reactor (node.scu: found as "no C-STORE
response" failures of real-peer dispatch and commitment tests under the parallel suite's load).

pynetdicom's requestor pauses its reactor before sending a request by clearing a checkpoint and waiting until the
reactor says it is paused; the reactor says so just *before* it waits on the checkpoint, so a reactor thread
descheduled between that wait returning and its non-blocking ``get_msg`` still takes the next message — the
response — and drops it as "Received unexpected C-STORE service message"; the sender then waits its whole DIMSE
timeout and the delivery fails. It takes two scheduling delays on a loaded machine: the reactor thread's, and the
sender's thread not yet back in its blocking ``get_msg`` when the response arrives. Here both are made certain (the
reactor sleeps 50 ms after each pass of its checkpoint, the sender 100 ms after handing its request to the DUL),
against DCMTK's storescp as the peer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider

from node.scu import Peer, echo, read_files, send_datasets
from peers.dcmtk import StoreScp
from tests.ctgen import write_ct_series


class _PreemptedCheckpoint(threading.Event):
    """The association reactor's checkpoint, with the reactor thread descheduled right after each wait."""

    def wait(self, timeout: float | None = None) -> bool:
        result = super().wait(timeout)
        time.sleep(0.05)
        return result


@pytest.fixture
def preempted_reactor(monkeypatch: pytest.MonkeyPatch) -> None:
    init = Association.__init__

    def slowed(self: Association, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        self._reactor_checkpoint = _PreemptedCheckpoint()
        self._reactor_checkpoint.set()

    send = DIMSEServiceProvider.send_msg

    def late(self: DIMSEServiceProvider, *args: object, **kwargs: object) -> None:
        send(self, *args, **kwargs)  # type: ignore[arg-type]
        time.sleep(0.1)

    monkeypatch.setattr(Association, "__init__", slowed)
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", late)


def test_responses_reach_the_sender_when_the_reactor_is_descheduled(preempted_reactor: None, tmp_path: Path) -> None:
    made = write_ct_series(tmp_path / "ct", slices=6, size=8, seed=5)
    pacs = StoreScp(tmp_path / "pacs").start()
    try:
        peer = Peer("127.0.0.1", pacs.port, timeout=5.0)
        started = time.monotonic()
        assert echo(peer) == 0
        results = send_datasets(peer, read_files(made.paths))
        took = time.monotonic() - started
    finally:
        pacs.stop()
    assert [r.status for r in results] == [0] * 6, results
    assert took < 4.0, f"a response was lost and waited for ({took:.1f} s)"
    assert len([f for f in (tmp_path / "pacs").iterdir() if f.is_file()]) == 6  # storescp stored each once
