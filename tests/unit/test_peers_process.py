"""peers.process, the harness's waiting and process helpers: real sockets and child processes, no mocks."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from peers.process import (
    PeerError,
    PeerMissingError,
    PeerTimeoutError,
    _ephemeral_range,
    find_tool,
    free_port,
    port_open,
    stop_process,
    wait_for_port,
    wait_until,
)


def test_wait_until_returns_the_first_truthy_value():
    calls = []

    def third_time() -> str:
        calls.append(1)
        return "ready" if len(calls) >= 3 else ""

    assert wait_until(third_time, 5, "the third call", interval=0.01) == "ready"
    assert len(calls) == 3


def test_wait_until_times_out_naming_what_and_the_diagnostics():
    t0 = time.monotonic()
    with pytest.raises(PeerTimeoutError, match=r"(?s)waiting for the moon.*log tail here"):
        wait_until(lambda: False, 0.2, "the moon", lambda: "log tail here", interval=0.01)
    assert 0.2 <= time.monotonic() - t0 < 5
    assert issubclass(PeerTimeoutError, TimeoutError) and issubclass(PeerTimeoutError, PeerError)


def test_wait_until_gives_up_at_once_when_the_process_exits():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    t0 = time.monotonic()
    with pytest.raises(PeerError, match="exited with 3") as err:
        wait_until(lambda: False, 60, "a port", process=proc)
    assert not isinstance(err.value, PeerTimeoutError)
    assert time.monotonic() - t0 < 30


def test_free_port_and_wait_for_port_on_a_real_listener():
    port = free_port()
    assert not port_open(port)
    low, _ = _ephemeral_range()
    assert port < low  # never a port the kernel may give an outgoing connection meanwhile
    with socket.create_server(("127.0.0.1", port)):
        wait_for_port(port, timeout=5)
        assert port_open(port)
    with pytest.raises(PeerTimeoutError, match=f"port {port}"):
        wait_for_port(port, timeout=0.2)


def test_stop_process_terminates_by_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop_process(proc, timeout=10)
    assert proc.poll() is not None
    stop_process(proc)  # already ended: nothing to do


def test_a_missing_tool_is_peer_missing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PeerMissingError, match="no-such-peer-tool is not installed"):
        find_tool("no-such-peer-tool")


def test_free_port_never_repeats_and_keeps_to_its_xdist_workers_share(monkeypatch: pytest.MonkeyPatch):
    for workers in (2, 3):  # 2: Linux gives bind(0) even ports only, so the odd worker needs its own pick
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(workers))
        for index in range(workers):
            monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
            ports = [free_port() for _ in range(30)]
            assert len(set(ports)) == len(ports)
            assert {port % workers for port in ports} == {index}
            with socket.socket() as s:  # and each is really free
                s.bind(("127.0.0.1", ports[-1]))
