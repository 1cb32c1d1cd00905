"""A node systemd aborts (``WatchdogSec`` passed without a ping: ``WatchdogSignal`` is SIGABRT by default;
deploy/pacsnode.service) leaves every thread's stack in its log (the journal): Python's faulthandler, enabled by
``pacsnode serve``. Without it the wedged node died with nothing said of where it hung. The dump names code
locations only, never a value."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.one_backend]  # the process's own handler: not the database

LEAN = 'process_model = "threads"\n[worker]\nenabled = false\n'


def test_an_aborted_node_logs_every_thread_s_stack(start_node):
    node = start_node(extra_toml=LEAN)
    assert node.proc is not None
    wait_until(lambda: "dimse_listening" in node.log_text(), 60, "the node listening", node.log_tail)
    node.proc.send_signal(signal.SIGABRT)
    assert node.proc.wait(30) == -signal.SIGABRT
    log = node.log_text()
    assert "Fatal Python error: Aborted" in log, node.log_tail()
    assert log.count("Thread 0x") >= 3 and 'File "' in log and "node/" in log, node.log_tail()
