"""Config hot reload on SIGHUP / `pacsnode config reload`: a new allow-list applies to the next association while
one in flight finishes; an invalid file is refused and the running config kept."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.conftest import REPO, wait_until
from tests.ctgen import write_ct_series

pytestmark = pytest.mark.integration


def wait_for_log(node, text: str, timeout: float = 30.0) -> None:
    wait_until(lambda: text in node.log_text(), timeout, f"{text!r} in the node's log", lambda: node.log_text()[-2000:])


def associate(node, calling: str):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)


def test_sighup_allow_list_applies_to_next_association_while_one_in_flight_finishes(start_node, tmp_path):
    node = start_node(allowed=["SCANNER-A", "SCANNER-B"], extra_toml="[worker]\nenabled = false\n")
    series = write_ct_series(tmp_path / "in", slices=2, size=16)
    in_flight = associate(node, "SCANNER-B")
    assert in_flight.is_established
    assert in_flight.send_c_store(pydicom.dcmread(series.paths[0])).Status == 0

    text = node.config_path.read_text().replace('["SCANNER-A", "SCANNER-B"]', '["SCANNER-A"]')
    node.config_path.write_text(text)
    node.proc.send_signal(signal.SIGHUP)
    wait_for_log(node, "config_reloaded")

    def refused() -> bool:  # the listener child may log its reload after another child did (a loaded machine)
        assoc = associate(node, "SCANNER-B")
        if assoc.is_established:
            assoc.release()
        return assoc.is_rejected

    wait_until(refused, 30, "SCANNER-B refused by the reloaded listener", lambda: node.log_text()[-2000:])
    # the association opened before the reload still works and releases cleanly
    assert in_flight.send_c_store(pydicom.dcmread(series.paths[1])).Status == 0
    in_flight.release()
    allowed = associate(node, "SCANNER-A")
    assert allowed.is_established
    assert allowed.send_c_echo().Status == 0
    allowed.release()


def test_invalid_config_is_refused_and_the_old_one_kept(start_node):
    node = start_node(allowed=["SCANNER-A"], extra_toml="[worker]\nenabled = false\n")
    good = node.config_path.read_text()
    node.config_path.write_text(good.replace('["SCANNER-A"]', '["NOT A VALID AE TITLE, FAR TOO LONG"]'))
    cli = subprocess.run(
        [sys.executable, "-m", "node.cli", "config", "reload", "--config", str(node.config_path)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert cli.returncode == 2 and "allowed_calling_aes" in cli.stderr  # refused before signalling
    node.proc.send_signal(signal.SIGHUP)  # a raw SIGHUP with the bad file: the node refuses it itself
    wait_for_log(node, "config_reload_refused")
    assoc = associate(node, "SCANNER-A")
    assert assoc.is_established
    assoc.release()
    assert associate(node, "SCANNER-Z").is_rejected

    node.config_path.write_text(good.replace('["SCANNER-A"]', '["SCANNER-Z"]'))
    ok = subprocess.run(
        [sys.executable, "-m", "node.cli", "config", "reload", "--config", str(node.config_path)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    wait_for_log(node, "config_reloaded")
    assoc = associate(node, "SCANNER-Z")
    assert assoc.is_established
    assoc.release()


def send_series(node, calling: str, out_dir, seed: int) -> str:
    series = write_ct_series(out_dir, slices=3, size=16, seed=seed)
    assoc = associate(node, calling)
    assert assoc.is_established
    for path in series.paths:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    assoc.release()
    return series.series_uid


def events(node, name: str) -> list[dict]:
    out = []
    for line in node.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == name:
            out.append(record)
    return out


def wait_for_event(node, name: str, series_uid: str, timeout: float = 30.0) -> dict:
    def found() -> dict | None:
        return next((r for r in events(node, name) if r.get("series_uid") == series_uid), None)

    return wait_until(found, timeout, f"{name} for {series_uid}", lambda: node.log_text()[-2000:])


def test_sighup_swaps_the_routes(start_node, tmp_path):
    node = start_node(extra_toml="[completion]\nstable_seconds = 1\nsweep_seconds = 0.2\n[worker]\nenabled = false\n")
    first = send_series(node, "SCANNER-A", tmp_path / "a", seed=1)
    # the default routes send an axial chest CT to the pneumonia pipeline
    assert wait_for_event(node, "series_complete", first)["route"] == "chest-ct"

    node.config_path.write_text(
        node.config_path.read_text() + '\n[[routes]]\nname = "maintenance"\npipeline = "ignore"\n'
    )
    node.proc.send_signal(signal.SIGHUP)
    wait_for_log(node, "config_reloaded")
    second = send_series(node, "SCANNER-A", tmp_path / "b", seed=2)
    assert wait_for_event(node, "series_ignored", second)["route"] == "maintenance"
    assert [e["series_uid"] for e in events(node, "series_complete")] == [first]
