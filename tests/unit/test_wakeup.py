"""node.wakeup: datagram wake-ups between processes sharing a data directory."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from node.wakeup import DISPATCHER, WORKER, Wakeups, _host


def test_a_listener_is_woken_and_another_kind_is_not(tmp_path: Path) -> None:
    run = tmp_path / ("a-long-folder-name-" * 8) / "run"  # beyond the 108-byte socket address limit
    assert len(str(run / "worker-4194304.sock")) > 108 - len(socket.gethostname())
    consumer, producer = Wakeups(run), Wakeups(run)
    woken = threading.Event()
    try:
        assert consumer.listen(WORKER, woken.set)
        assert producer.notify(DISPATCHER) == 0 and not woken.wait(0.3)
        assert producer.notify(WORKER) == 1
        assert woken.wait(5)
    finally:
        consumer.close()
        producer.close()
    assert list(run.iterdir()) == []  # close removes its socket


def test_a_socket_left_by_a_dead_process_is_removed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale_path = run / f"worker-{_host()}-999999.sock"
    stale.bind(str(stale_path))
    stale.close()  # the file stays, nobody receives: as after kill -9
    other_host = run / "worker-another-host-12345.sock"  # a data directory several hosts mount: not ours to judge
    other_host.touch()
    producer = Wakeups(run)
    try:
        assert producer.notify(WORKER) == 0
        assert not stale_path.exists() and other_host.exists()
    finally:
        producer.close()


_CHILD = """
import sys, threading
from pathlib import Path
from node.wakeup import Wakeups
woken = threading.Event()
w = Wakeups(Path(sys.argv[1]))
assert w.listen("worker", woken.set)
print("listening", flush=True)
sys.exit(0 if woken.wait(20) else 3)
"""


def test_another_process_is_woken(tmp_path: Path) -> None:
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(run)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    producer = Wakeups(run)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "listening"
        t0 = time.monotonic()
        assert producer.notify(WORKER) == 1
        assert child.wait(20) == 0
        assert time.monotonic() - t0 < 5
    finally:
        child.kill()
        producer.close()


def test_without_a_usable_folder_nothing_raises_and_the_poll_remains(tmp_path: Path) -> None:
    blocked = tmp_path / "run"
    blocked.write_text("a file where the folder should be")
    wakeups = Wakeups(blocked)
    try:
        assert wakeups.listen(WORKER, lambda: None) is False
        assert wakeups.notify(WORKER) == 0
    finally:
        wakeups.close()
