"""A reload under the supervisor of role processes (the default process model), with the file saved again before a
child handled its SIGHUP: the supervisor validated the good file and forwarded SIGHUP, but each child re-read the
file itself — a second save with a typo in between (an admin fixing one more thing) made that listener refuse it
and stay on the old config, refusing the scanner the reload had just allowed, while the supervisor's log and the
audit trail said the new config was applied. Children now reload to what the supervisor accepted
(node.config.snapshot). The listener is held with SIGSTOP across the second save so the order is certain; DCMTK
echoscu is the scanner."""

from __future__ import annotations

import json
import os
import signal
import stat

import pytest

from node.config.snapshot import RELOAD_FILE
from tests.conftest import require_tool, wait_until
from tests.integration.test_review_ops_reload import LEAN, echo_ok, events

pytestmark = [pytest.mark.integration, pytest.mark.one_backend]


def test_children_reload_to_what_the_supervisor_accepted_not_to_a_later_save(start_node):
    require_tool("echoscu")
    node = start_node(allowed=["ECHOSCU"], extra_toml=LEAN)
    table = json.loads((node.config_path.parent / "data" / "processes.json").read_text())
    (listener,) = [p["pid"] for p in table["processes"] if p["role"] == "listener"]
    good = node.config_path.read_text()
    allowed = good.replace('["ECHOSCU"]', '["ECHOSCU", "SCANNER-B"]')
    assert allowed != good and not echo_ok(node, "SCANNER-B")

    os.kill(listener, signal.SIGSTOP)  # the listener takes its SIGHUP only once the file has been saved again
    try:
        node.config_path.write_text(allowed)
        forwarded = len(events(node, "config_reload_forwarded"))
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(events(node, "config_reload_forwarded")) > forwarded, 30,
                   "the supervisor to accept the file and forward SIGHUP", node.log_tail)
        node.config_path.write_text(allowed + "\n[nonsense\n")  # saved again, with a typo
    finally:
        os.kill(listener, signal.SIGCONT)
    wait_until(lambda: echo_ok(node, "SCANNER-B"), 30, "the listener on the config the supervisor accepted",
               node.log_tail)
    assert echo_ok(node) and not echo_ok(node, "INTRUDER")
    snapshot = node.config_path.parent / "data" / RELOAD_FILE
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600  # it holds the config's secrets
