"""deploy/pacsnode.service: systemd itself accepts it (``systemd-analyze verify``, every line parsed, with the
``ExecStart`` binary pointed at this checkout's ``pacsnode``), and what it says fits the node: ``Type=notify``
(node.sdnotify), a stop that outlasts the supervisor's own, no restart loop on a config error (exit 2), SIGTERM to
the supervisor alone."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

from node.processes import EXIT_CONFIG_ERROR, ProcessSupervisor
from node.service import DIMSE_DRAIN_SECONDS, Service
from node.supervise import EXIT_LOOP_FAILED
from tests.conftest import REPO, require_tool

UNIT = REPO / "deploy" / "pacsnode.service"
INSTALLED_BIN = "/opt/pacsnode/.venv/bin/pacsnode"


def settings(text: str) -> dict[str, list[str]]:
    """``Section.Key`` → its values in order (a key may repeat, e.g. ``Environment=``)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(unit: dict[str, list[str]], key: str) -> str:
    values = unit[key]
    assert len(values) == 1, f"{key} is set {len(values)} times"
    return values[0]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|min)?", value)
    assert match, f"not a simple time span: {value}"
    return float(match[1]) * (60 if match[2] == "min" else 1)


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    pacsnode = Path(sys.executable).parent / "pacsnode"  # verify insists that ExecStart= names an executable
    assert pacsnode.exists(), f"{pacsnode}: the checkout's entry point (pip install -e .)"
    text = UNIT.read_text()
    assert INSTALLED_BIN in text
    unit = tmp_path / "pacsnode.service"
    unit.write_text(text.replace(INSTALLED_BIN, str(pacsnode)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    # verify exits 0 on a key it does not know or a value it cannot parse ("…, ignoring"): its output says so
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def test_the_unit_fits_the_node() -> None:
    unit = settings(UNIT.read_text())
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.NotifyAccess") == "main"  # the supervisor notifies; its children never see the socket
    config = "/etc/pacsnode/node.toml"
    assert one(unit, "Service.ExecStart") == f"{INSTALLED_BIN} serve --config {config}"
    assert one(unit, "Service.ExecReload") == f"{INSTALLED_BIN} config reload --config {config}"  # validates, SIGHUPs
    # the supervisor stops its children itself: systemd's SIGTERM to each child too would be their second signal
    assert one(unit, "Service.KillMode") == "mixed"
    assert one(unit, "Service.Restart") == "on-failure"
    prevented = one(unit, "Service.RestartPreventExitStatus").split()
    assert str(EXIT_CONFIG_ERROR) in prevented and str(EXIT_LOOP_FAILED) not in prevented
    # longer than the node's own stop: the supervisor waits this long for its children before it kills them; one
    # process drains DIMSE, then waits for the worker's job, then the dispatcher (measured: README)
    supervisor = inspect.signature(ProcessSupervisor.stop).parameters["timeout"].default
    one_process = DIMSE_DRAIN_SECONDS + inspect.signature(Service.stop).parameters["timeout"].default
    assert seconds(one(unit, "Service.TimeoutStopSec")) >= max(supervisor, one_process) + 15
    assert seconds(one(unit, "Service.WatchdogSec")) > 0
    state = "/var/lib/" + one(unit, "Service.StateDirectory")
    assert one(unit, "Service.ProtectSystem") == "strict" and state in one(unit, "Service.ReadWritePaths").split()
    assert one(unit, "Service.CapabilityBoundingSet") == ""  # ports >= 1024 need none
    assert one(unit, "Service.NoNewPrivileges") == "yes"
    assert "PYTHONUNBUFFERED=1" in unit["Service.Environment"]  # journald gets each log line as it is written
    assert int(one(unit, "Service.LimitNOFILE")) >= 4096
