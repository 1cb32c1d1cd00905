"""The process model (``[node] process_model = "processes"``) with real peers: two listener processes share the
DIMSE port (one accept queue, node.listenfds) while four DCMTK storescu senders send concurrently; one listener child is killed with
SIGKILL in the middle of a transfer. The supervisor restarts it, `/readyz` and `pacsnode status` show the restart,
the restarted child closes only its own dead associations, and every instance acknowledged is on disk and indexed
exactly once (a resend of every series afterwards leaves each series' count at its slice count). A slow test runs
a series through listener, worker and dispatcher processes to Orthanc and checks that only the worker process
maps TensorFlow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
import pytest
import sqlalchemy as sa

from peers import dcmtk
from peers.ctgen import CtSeries, write_ct_series
from peers.pacsnode import REPO, NodeProcess, launch_node, node_env
from peers.process import wait_until
from tests.conftest import free_port, require_tool, require_weights
from tests.dicomfiles import content

pytestmark = pytest.mark.integration

SENDERS = 4
SLICES = 100

NODE_TOML = """process_model = "processes"
listener_processes = 2
[worker]
enabled = false
[supervise]
restart_backoff_seconds = 0.2
[gate]
scope_check = false
"""


def send(node: NodeProcess, series: CtSeries, aet: str) -> dict[str, str]:
    """storescu -v over one association → {file: store response} for the files it got an answer for."""
    return dcmtk.store_responses(node.port, series.paths[0].parent, calling_ae=aet, called_ae=node.ae_title,
                                 timeout=120)


def query(node: NodeProcess, sql: str) -> list[sa.Row]:
    engine = sa.create_engine(node.db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql)))
    finally:
        engine.dispose()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has stopped


def events(node: NodeProcess) -> list[str]:
    return [json.loads(line).get("event", "") for line in node.log_text().splitlines() if line.startswith("{")]


def readyz(node: NodeProcess) -> dict:
    return httpx.get(f"http://127.0.0.1:{node.http_port}/readyz", timeout=10).json()


def process(report: dict, name: str) -> dict:
    return next(p for p in report["processes"]["processes"] if p["name"] == name)


def test_two_listener_processes_share_the_port_and_a_killed_one_loses_nothing(tmp_path, node_database):
    require_tool("storescu")
    node = launch_node(tmp_path / "node", extra_toml=NODE_TOML, database_url=node_database.for_node())
    try:
        _scenario(node, tmp_path)
        # The supervisor killed with SIGKILL: its children stop too (PR_SET_PDEATHSIG), nothing keeps the port.
        children = [p["pid"] for p in readyz(node)["processes"]["processes"]]
        node.kill()
        wait_until(lambda: not any(_running(pid) for pid in children), 30, "the children to stop",
                   lambda: f"still running: {[p for p in children if _running(p)]}\n{node.log_text()[-4000:]}")
    finally:
        node.stop()


def _scenario(node: NodeProcess, tmp_path: Path) -> None:
    wait_until(lambda: (r := readyz(node))["ready"] and r, 60, "both listener processes ready",
               lambda: node.log_tail())
    series = [write_ct_series(tmp_path / f"s{i}", slices=SLICES, size=64, seed=i) for i in range(SENDERS)]
    with ThreadPoolExecutor(SENDERS) as pool:
        sending = [pool.submit(send, node, s, f"CT{i}") for i, s in enumerate(series)]
        # Mid-transfer: instances are arriving and a listener holds an open association; kill that one.
        victim = wait_until(
            lambda: len(query(node, "select sop_uid from instances")) >= 20 and query(
                node, "select node_id from associations where state = 'open' and node_id like '%listener%'"),
            60, "a listener in the middle of a transfer", lambda: node.log_tail())[0].node_id
        name = victim.split(":", 1)[1]
        before = process(readyz(node), name)
        os.kill(before["pid"], signal.SIGKILL)
        first = [f.result() for f in sending]
    acked = [Path(f) for answers in first for f, status in answers.items() if status == "Success"]
    assert len(acked) < SENDERS * SLICES, "the kill cut no transfer short"

    # The supervisor restarts the child; the readiness report and `pacsnode status` say so.
    after = wait_until(lambda: (r := readyz(node))["ready"] and process(r, name)["restarts"] == 1 and r, 60,
                       f"{name} restarted", lambda: node.log_tail())
    restarted = process(after, name)
    assert restarted["alive"] and restarted["pid"] != before["pid"] and restarted["last_exit"] == -signal.SIGKILL
    status = subprocess.run([sys.executable, "-m", "node.cli", "status", "--json", "--config",
                             str(node.config_path)], cwd=REPO, env=node_env(), capture_output=True, text=True,
                            timeout=60, check=True)
    table = {p["name"]: p for p in json.loads(status.stdout)["processes"]["processes"]}
    assert table[name]["restarts"] == 1 and table[name]["pid"] == restarted["pid"]
    assert {"listener-0", "listener-1", "dispatcher-0"} == set(table)

    # Nothing acknowledged lost: each acknowledged file is indexed and spooled byte for byte.
    rows = {r.sop_uid: r for r in query(node, "select sop_uid, path from instances")}
    for path in acked:
        sop_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert content(Path(rows[sop_uid].path)) == content(path)
    # The restarted child closed its own dead associations; none is left open.
    states = {r.state for r in query(node, f"select state from associations where node_id = '{victim}'")}
    assert "aborted" in states
    assert query(node, "select id from associations where state = 'open'") == []

    # Every series sent again (both listeners serve): all acknowledged, each instance indexed once.
    with ThreadPoolExecutor(SENDERS) as pool:
        again = list(pool.map(lambda i: send(node, series[i], f"CT{i}"), range(SENDERS)))
    assert all(set(a.values()) == {"Success"} and len(a) == SLICES for a in again)
    assert len(query(node, "select sop_uid from instances")) == SENDERS * SLICES
    counts = {r.series_uid: r.instance_count for r in query(node, "select series_uid, instance_count from series")}
    assert counts == {s.series_uid: SLICES for s in series}
    # SIGHUP through `pacsnode config reload`: the supervisor validates the file and every child reloads it.
    subprocess.run([sys.executable, "-m", "node.cli", "config", "reload", "--config", str(node.config_path)],
                   cwd=REPO, env=node_env(), capture_output=True, text=True, timeout=60, check=True)
    wait_until(lambda: events(node).count("config_reloaded") == 3, 30, "3 children reloaded", lambda: node.log_tail())

    # Both listeners took associations (whichever is idle accepts from the shared queue: echo until both did).
    def owners() -> set[str]:
        dcmtk.echoscu(node.port, called_ae=node.ae_title, check=True)
        return {r.node_id.split(":", 1)[1] for r in query(node, "select node_id from associations")}

    assert wait_until(lambda: len(found := owners()) == 2 and found, 30, "both listeners") == {
        "listener-0", "listener-1"}
    # /metrics merges every process's counters (node.metrics): whichever listener answers, the associations it
    # counts are all the listeners' (the killed one's included), the same number the index recorded.
    accepted = len(query(node, "select id from associations"))
    scraped = {metric(node, "pacsnode_associations_total", event="accepted") for _ in range(6)}
    assert scraped == {accepted}, (scraped, accepted)
    print(f"\n{SENDERS} senders x {SLICES} slices, {name} killed mid-transfer: {len(acked)} acknowledged before, "
          f"all indexed; restarted as pid {restarted['pid']}; resend of all {SENDERS * SLICES} indexed once")


def test_a_connection_made_while_the_listener_restarts_is_served_by_its_successor(tmp_path, node_database):
    """The supervisor holds the DIMSE port (node.listenfds): with the only listener killed and its restart 3 s
    away, a C-ECHO's connection waits in the accept queue and the restarted listener answers it. With a socket per
    listener (SO_REUSEPORT) nothing listened in between, and the connection was refused."""
    require_tool("echoscu")
    toml = NODE_TOML.replace("listener_processes = 2", "listener_processes = 1").replace(
        "restart_backoff_seconds = 0.2", "restart_backoff_seconds = 3")
    node = launch_node(tmp_path / "node", extra_toml=toml, database_url=node_database.for_node())
    try:
        wait_until(lambda: readyz(node)["ready"], 60, "the node ready", lambda: node.log_tail())
        before = process(readyz(node), "listener-0")["pid"]
        os.kill(before, signal.SIGKILL)
        wait_until(lambda: not _running(before), 10, "the listener dead")
        echo = dcmtk.echoscu(node.port, called_ae=node.ae_title, timeout=60)
        assert echo.returncode == 0, echo.stderr
        after = process(readyz(node), "listener-0")
        assert after["pid"] != before and after["restarts"] == 1
    finally:
        node.stop()


def metric(node: NodeProcess, name: str, **labels: str) -> float:
    """One sample of ``GET /metrics`` (a new connection each time, so either listener may answer); 0 if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def maps_tensorflow(pid: int) -> bool:
    return "tensorflow" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
def test_a_series_crosses_listener_worker_and_dispatcher_processes_and_only_the_worker_loads_tensorflow(
        start_node, orthanc_factory, tmp_path):
    from tests.integration.test_end_to_end import node_toml, results_by_study

    require_weights()
    node_port = free_port()
    orthanc = orthanc_factory(modalities={"node": ("PACSNODE", "127.0.0.1", node_port)})
    release = '\n[[completion.senders]]\ncalling_ae = "CT-SCANNER"\nmode = "release"\nrelease_grace_seconds = 0.2\n'
    node = start_node(port=node_port, extra_toml='process_model = "processes"\nlistener_processes = 2\n'
                      + node_toml(orthanc, scope_check=False) + release)
    report = wait_until(lambda: (r := readyz(node))["ready"] and r, 180, "the worker's models loaded",
                        lambda: node.log_tail())
    series = write_ct_series(tmp_path / "s", slices=20, size=64, seed=33)
    dcmtk.storescu(node.port, tmp_path / "s", calling_ae="CT-SCANNER", check=True)
    wait_until(lambda: (results_by_study(orthanc).get(series.study_uid) or {}).get("SEG"), 180,
               "SR and SEG at Orthanc", lambda: node.log_tail())
    result = results_by_study(orthanc)[series.study_uid]
    assert len(result["SR"]) == 1 and len(result["SEG"]) == 1
    pids = {p["name"]: p["pid"] for p in report["processes"]["processes"]}
    assert maps_tensorflow(pids["worker-0"])
    assert not any(maps_tensorflow(pids[name]) for name in ("listener-0", "listener-1", "dispatcher-0"))
    # What the worker and the dispatcher counted shows on a listener's /metrics.
    assert metric(node, "pacsnode_inference_seconds_count") == 1
    assert metric(node, "pacsnode_inference_device", device="cpu") == 1
    assert metric(node, "pacsnode_end_to_end_seconds_count") >= 1
    job = query(node, "select queue_seconds from jobs")[0]
    print(f"\njob claimed {job.queue_seconds:.3f} s after completion (worker in its own process)")
