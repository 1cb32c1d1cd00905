"""Proof of delivery and destination checks with a real node process and real Orthancs.

One node (worker off: the test queues a result set straight into the node's database, as the worker would) with
five destinations: ``pacs`` — an Orthanc that knows the node in ``DicomModalities``, Storage Commitment on;
``forgetful`` — an Orthanc that knows the node's AE title but at a port where nothing listens, so it accepts the
N-ACTION and can never report back (commitment on, short timeout); ``web`` — that second Orthanc's DICOMweb,
proven through QIDO-RS; ``plain`` — DCMTK storescp, which stores but has no Storage Commitment at all; ``gone`` —
a closed port. Waits poll `pacsnode status --json` and ``/metrics``; no fixed sleeps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from node.config import load_config
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher
from node.reachability import destination_report
from peers.dcmtk import StoreScp
from tests.conftest import REPO, free_port, wait_until

pytestmark = pytest.mark.integration

FORGETFUL_TIMEOUT = 3


def _results(out: Path, n: int = 2) -> tuple[str, list[Path], list[str]]:
    """``n`` CT instances of one new series standing in for a result set (SOP class and UIDs are what count)."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    study = generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    paths, uids = [], []
    for i in range(n):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = out / f"r{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append(str(ds.SOPInstanceUID))
    return series, paths, uids


def _cli_status(node) -> dict:
    """`pacsnode status --json`, the separate process an admin runs."""
    done = subprocess.run([sys.executable, "-m", "node.cli", "status", "--json", "--config", str(node.config_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def _metrics(node) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10) as r:
        return r.read().decode()


@pytest.fixture
def storescp(tmp_path) -> Iterator[StoreScp]:
    """DCMTK storescp on a free port (stores anything, knows nothing of Storage Commitment); stopped by PID."""
    with StoreScp(tmp_path / "storescp", aet="PLAIN") as scp:
        yield scp


def test_commitment_and_reachability_against_orthanc(start_node, orthanc_factory, storescp, tmp_path):
    node_port = free_port()
    closed = free_port()
    pacs = orthanc_factory(modalities={"node": ("PACSNODE", "127.0.0.1", node_port)})
    # Knows the node's AE title (so it takes the N-ACTION) but at an address where nothing listens.
    forgetful = orthanc_factory(modalities={"node": ("PACSNODE", "127.0.0.1", closed)})
    toml = f"""
[worker]
enabled = false
[dispatch]
initial_backoff_seconds = 0.5
max_backoff_seconds = 2
poll_seconds = 0.2
[reachability]
interval_seconds = 1
timeout_seconds = 3
{pacs.destination_toml("pacs")}commitment = true
commit_timeout_seconds = 30
{forgetful.destination_toml("forgetful")}commitment = true
commit_timeout_seconds = {FORGETFUL_TIMEOUT}
[[destinations]]
name = "web"
kind = "dicomweb"
url = "{forgetful.url}/dicom-web"
commitment = true
commit_timeout_seconds = 30
[[destinations]]
name = "plain"
kind = "dimse"
ae_title = "PLAIN"
host = "127.0.0.1"
port = {storescp.port}
commitment = true
[[destinations]]
name = "gone"
kind = "dimse"
ae_title = "NOBODY"
host = "127.0.0.1"
port = {closed}
"""
    node = start_node(port=node_port, extra_toml=toml)
    config = load_config(node.config_path)
    engine = create_engine_for(config.database_url)
    init_schema(engine)

    def _status(_node: object) -> dict:  # what `pacsnode status` reports, read in-process while polling (cheaper)
        return {d["destination"]: d for d in destination_report(config, engine)}

    def diagnostics() -> str:  # the status rows, and the node's log without the `gone` destination's retries
        lines = [ln for ln in node.log_text().splitlines() if '"destination": "gone"' not in ln and "NOBODY" not in ln
                 and "unable to connect" not in ln and "Connection refused" not in ln]
        return (f"\nstatus: {_status(node)}\n" + "\n".join(lines)[-6000:] + "\n" + forgetful.log_text()[-2000:])

    # (c) reachability, before anything is sent: the Orthancs answer C-ECHO / HTTP, the closed port does not.
    status = wait_until(lambda: (s := _status(node)) and all(s[n]["reachable"] is not None for n in s) and s,
                        20, "every destination checked", diagnostics)
    assert status["pacs"]["reachable"] is True and status["pacs"]["last_success_at"]
    assert status["forgetful"]["reachable"] is True and status["web"]["reachable"] is True
    assert status["gone"]["reachable"] is False and status["gone"]["last_success_at"] is None
    assert "refused" in status["gone"]["reason"] or "failed" in status["gone"]["reason"], status["gone"]

    # A result set queued in the node's database, as its worker does: the node's dispatcher sends it everywhere.
    series, paths, uids = _results(tmp_path / "results")
    Dispatcher(config, engine, {}).enqueue(series, 1, paths, uids)

    # (a) Orthanc answers the N-ACTION, then reports on a new association to the node's DIMSE port: committed.
    status = wait_until(lambda: (s := _status(node))["pacs"]["committed"] == 1 and s, 30,
                        "the pacs destination to commit the delivery", diagnostics)
    assert status["pacs"]["uncommitted"] == 0 and status["pacs"]["delivered"] == 1
    assert sorted(pacs.sop_instance_uids()) == sorted(uids)
    # The web destination's proof: QIDO-RS lists every stored instance.
    status = wait_until(lambda: (s := _status(node))["web"]["committed"] == 1 and s, 30,
                        "the QIDO-RS check to commit the DICOMweb delivery", diagnostics)

    # (b) stored, N-ACTION accepted, never reported: uncommitted (timed_out) once its timeout has passed.
    status = wait_until(lambda: (s := _status(node))["forgetful"]["commit_states"].get("timed_out") == 1 and s,
                        FORGETFUL_TIMEOUT + 20, "the forgetful destination's commitment to time out", diagnostics)
    assert status["forgetful"]["delivered"] == 1 and status["forgetful"]["uncommitted"] == 1
    assert status["forgetful"]["committed"] == 0
    assert sorted(forgetful.sop_instance_uids()) == sorted(uids)  # it does hold them: only the proof is missing
    # ... and a destination without Storage Commitment at all: stored, and its commitment failed on the first
    # N-ACTION, without retries (the commitment row is written just after the delivery is marked delivered, so
    # under load it can be missing or still pending here; its delivery may also still be in its first back-off).
    def plain_settled(s: dict) -> bool:
        states = set(s["plain"]["commit_states"])
        return s["plain"]["delivered"] == 1 and bool(states) and not states & {"pending", "requested"}
    status = wait_until(lambda: plain_settled(s := _status(node)) and s, 30,
                        "the plain destination's delivery and commitment request", diagnostics)
    assert status["plain"]["commit_states"] == {"failed": 1}
    assert len(list(storescp.out_dir.iterdir())) == 2
    cli = _cli_status(node)
    stable = ("reachable", "backlog", "dead", "delivered", "committed", "uncommitted", "commit_states")
    assert {d["destination"]: [d[k] for k in stable] for d in cli["destinations"]} == {
        name: [d[k] for k in stable] for name, d in status.items()}
    problems = {p["destination"]: p for p in cli["commitment_problems"]}
    assert problems["forgetful"]["state"] == "timed_out"
    assert f"no N-EVENT-REPORT within {FORGETFUL_TIMEOUT} s" in problems["forgetful"]["last_error"]
    assert "does not accept Storage Commitment" in problems["plain"]["last_error"]

    assert status["gone"]["backlog"] == 1 and status["gone"]["delivered"] == 0
    metrics = _metrics(node)
    assert 'pacsnode_destination_up{destination="pacs"} 1.0' in metrics
    assert 'pacsnode_destination_up{destination="gone"} 0.0' in metrics
    assert 'pacsnode_deliveries_uncommitted{destination="forgetful"} 1.0' in metrics
    assert 'pacsnode_deliveries_uncommitted{destination="pacs"} 0.0' in metrics

    text = subprocess.run([sys.executable, "-m", "node.cli", "status", "--config", str(node.config_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    assert "destination gone (dimse): UNREACHABLE" in text, text
    assert "NOT COMMITTED (timed_out)" in text, text
