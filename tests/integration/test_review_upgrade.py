"""Review: a hospital upgrades the node in place, with work in flight. DCMTK storescu and pynetdicom are the
modalities, Orthanc the PACS, the node real `pacsnode serve` processes on SQLite or PostgreSQL (``--node-db``).

The state the release before leaves is made the way that release left it, without running its code (a git worktree
of an older commit is not something a test run can count on): the node's schema revision then was
`PREVIOUS`, so the database is taken back to it with `pacsnode db downgrade` — rows of the same schema the older
code wrote alike — and its spool and results folders have no `.pacsnode-spool-id` (markers came with the releases
after it). The same scenario was run by hand against that release's own code (a worktree of 1a4a442), killed with
SIGKILL on SQLite and stopped with SIGTERM on PostgreSQL, with the same outcome as the first test here.

What a hospital needs: nothing acknowledged lost, every queued or interrupted job run once more at most and each
series processed once (one version, one SR/SEG/KO at the PACS), every waiting delivery sent, dead letters still dead
and replayable, the older release's pid and status files no obstacle, and on PostgreSQL a refusal that names the
revision and `pacsnode db upgrade` until an administrator runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.spool import MARKER
from peers import dcmtk
from peers.orthanc import OrthancServer
from peers.pacsnode import NodeProcess, node_env
from peers.process import PeerError
from tests.conftest import REPO, free_port, launch_node, require_weights, wait_until
from tests.ctgen import write_ct_series

pytestmark = pytest.mark.integration

PREVIOUS = "0006_purged_members"  # the schema revision of the release before (tests/unit/test_migrate_downgrade.py)
TOML = """
[completion]
stable_seconds = 4
sweep_seconds = 0.5
[[completion.senders]]
# the scanner cut off mid-series by the stop: its series stays open longer than the stop's 10 s drain of open
# associations (node.service.DIMSE_DRAIN_SECONDS), as with the default 30 s; else it would complete in the drain
calling_ae = "CT-B"
stable_seconds = 12
[gate]
scope_check = false
[dispatch]
initial_backoff_seconds = 0.5
max_backoff_seconds = 2
[queue]
lease_seconds = 20
heartbeat_seconds = 2
"""


def _pacsnode(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(node.config_path)], cwd=REPO,
                          env=node_env(), capture_output=True, text=True, timeout=120, check=False)


class Db:
    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def one(self, sql: str, **params: Any) -> Any:
        return self.rows(sql, **params)[0][0]


def _kill_all(node: NodeProcess) -> None:
    """SIGKILL the supervisor and every role process it had (a power cut, the OOM killer, `kill -9` of the unit)."""
    assert node.data_dir is not None and node.proc is not None
    table = json.loads((node.data_dir / "processes.json").read_text())
    pids = [node.proc.pid] + [int(p["pid"]) for p in table["processes"] if p.get("pid")]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    node.proc.wait()

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True

    wait_until(lambda: all(gone(p) for p in pids), 30, "every process of the node gone")
    node.proc = None


def _as_the_previous_release_left_it(node: NodeProcess) -> None:
    """The schema at `PREVIOUS` (rows kept), and no spool markers: what the release before leaves behind."""
    done = _pacsnode(node, "db", "downgrade", PREVIOUS)
    assert done.returncode == 0, done.stderr
    assert node.data_dir is not None
    for folder in ("spool", "results"):
        (node.data_dir / folder / MARKER).unlink(missing_ok=True)


def _start_upgraded(node: NodeProcess, postgres: bool) -> None:
    """Start this release on the older state: SQLite upgrades by itself; PostgreSQL refuses until `db upgrade`."""
    if postgres:
        with pytest.raises(PeerError):
            node.start(120)
        refusal = node.log_text()
        assert PREVIOUS in refusal and "pacsnode db upgrade" in refusal, refusal[-2000:]
        done = _pacsnode(node, "db", "upgrade")
        assert done.returncode == 0 and done.stdout.strip().endswith(f"{PREVIOUS} -> 0007_admin_indexes"), done
    node.start(180)
    if not postgres:
        assert '"schema_upgraded"' in node.log_text() and PREVIOUS in node.log_text()


def _modalities(orthanc: OrthancServer, study_uid: str) -> list[tuple[str, int]]:
    return sorted((s["MainDicomTags"]["Modality"], len(s["Instances"]))
                  for s in orthanc.find("Series", {"StudyInstanceUID": study_uid}))


# Behind -m slow (50-65 s each, the suite's time budget): the schema's way up and back with work in flight is
# tests/unit/test_migrate.py's and test_migrate_downgrade.py's on every run. PostgreSQL only under --node-db=both: its
# upgrade is the explicit `pacsnode db upgrade` of a shared database; `pytest -m slow` (SQLite) runs the other.
@pytest.mark.slow
@pytest.mark.one_backend
def test_an_upgrade_with_work_in_flight_loses_nothing_and_repeats_nothing(node_database, tmp_path):
    require_weights()
    postgres = node_database.postgres
    node_port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", modalities={"node": ("PACSNODE", "127.0.0.1", node_port)})
    archive = free_port()  # a second destination that never answers: its rows wait, one is dead-lettered
    toml = TOML + orthanc.destination_toml() + (f'[[destinations]]\nname = "archive"\nkind = "dimse"\n'
                                                f'ae_title = "ARCHIVE"\nhost = "127.0.0.1"\nport = {archive}\n')
    node = launch_node(tmp_path / "node", port=node_port, extra_toml=toml, database_url=node_database.for_node(),
                       timeout=180)
    db = Db(node.db_url)
    a, b, c = (write_ct_series(tmp_path / name, slices=20, size=64, seed=seed)
               for name, seed in (("a", 1), ("b", 2), ("c", 3)))
    assoc = None
    try:
        dcmtk.storescu(node.port, *a.paths, calling_ae="CT-A", check=True)
        wait_until(lambda: db.one("select count(*) from deliveries where series_uid = :s", s=a.series_uid) == 2, 300,
                   "series a's results queued to both destinations", node.log_tail)
        with db.engine.begin() as conn:  # dead-lettered as the dispatcher does on giving up
            conn.execute(sa.text(
                "update deliveries set state = 'dead', holder = null, lease_until = null, last_error = 'gave up "
                "after 1 s; last error: refused' where series_uid = :s and destination = 'archive'"),
                {"s": a.series_uid})
        dcmtk.storescu(node.port, *c.paths, calling_ae="CT-C", check=True)
        wait_until(lambda: db.rows("select state from jobs where series_uid = :s", s=c.series_uid) == [("running",)],
                   300, "series c's job running", node.log_tail)
        ae = AE(ae_title="CT-B")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
        assert assoc.is_established
        assert [int(assoc.send_c_store(dcmread(p)).Status) for p in b.paths[:5]] == [0] * 5  # acknowledged
        if postgres:
            node.stop(60)  # SIGTERM: the two-stage shutdown
        else:
            _kill_all(node)
        assoc.abort()
        _as_the_previous_release_left_it(node)

        orthanc.start()
        _start_upgraded(node, postgres)
        dcmtk.storescu(node.port, *b.paths[5:], calling_ae="CT-B", check=True)
        wait_until(lambda: db.one("select count(*) from jobs where state = 'done'") == 3
                   and db.one("select count(*) from deliveries where destination = 'orthanc' and state = 'delivered'")
                   == 3, 400, "every series processed and delivered to orthanc", node.log_tail)

        for s in (a, b, c):
            assert {r[0] for r in db.rows("select sop_uid from instances where series_uid = :s", s=s.series_uid)} \
                == set(s.sop_uids), "an acknowledged instance lost"
            assert db.rows("select state, version from series where series_uid = :s", s=s.series_uid) \
                == [("complete", 1)]
            assert db.rows("select version, state from jobs where series_uid = :s", s=s.series_uid) == [(1, "done")]
            assert _modalities(orthanc, s.study_uid) == [("KO", 1), ("SEG", 1), ("SR", 1)]  # once each
        assert db.one("select attempts from jobs where series_uid = :s", s=a.series_uid) == 1
        assert db.one("select attempts from jobs where series_uid = :s", s=b.series_uid) == 1
        assert db.one("select count(*) from associations where closed_at is null") == 0
        audit = _pacsnode(node, "audit", "--json", "--event", "association_ended")
        ended = [json.loads(line) for line in audit.stdout.splitlines() if line.startswith("{")]
        assert any("aborted" in r["EventIdentification"]["EventOutcomeDescription"] and r["ActiveParticipant"][0][
            "UserID"] == "CT-B" for r in ended), audit.stdout[-3000:]  # the cut association is in the audit trail
        dead = db.rows("select id, state, last_error from deliveries where destination = 'archive' and "
                       "series_uid = :s", s=a.series_uid)
        assert [(r.state, r.last_error) for r in dead] == [("dead", "gave up after 1 s; last error: refused")]
        replayed = _pacsnode(node, "retry", "--delivery", str(dead[0].id))
        assert replayed.returncode == 0 and "1 deliveries queued again" in replayed.stdout, replayed
        assert db.one("select state from deliveries where id = :i", i=dead[0].id) in ("pending", "sending")
        assert node.running
    finally:
        if assoc is not None and assoc.is_alive():
            assoc.abort()
        node.stop()
        orthanc.stop()
        db.engine.dispose()


@pytest.mark.slow  # 40 s; tests/unit/test_worker_results_root.py checks the same rule in 1 s on every run
@pytest.mark.one_backend  # the worker's check of the results folder, the same on both backends
def test_after_an_upgrade_results_are_still_written_where_retention_purged_the_newest(node_database, orthanc_factory,
                                                                                        tmp_path):
    """Retention deletes result files but keeps their rows (node.retention). The first start with markers marks a
    results folder only if the newest recorded results are in it (README "Scale-out"), so a node upgraded from the
    release before, whose newest results were purged (a quiet month past `results_days`, or a full disk), refuses
    to write any result: each job is deferred ("spool root .../results has no .pacsnode-spool-id and none of N
    files the index holds in it: is its volume not mounted?") without spending an attempt, for ever, on a volume that
    is mounted and well. The hospital saw no AI result after the upgrade. Now only results younger than
    `results_days` are asked for (`node.worker._newest_results`): retention has not deleted those."""
    require_weights()
    postgres = node_database.postgres
    node_port = free_port()
    orthanc = orthanc_factory(modalities={"node": ("PACSNODE", "127.0.0.1", node_port)})
    retention = "[retention]\ninstances_days = 0.00001\nresults_days = 0.00001\n"  # < 1 s after delivery
    node = launch_node(tmp_path / "node", port=node_port, extra_toml=TOML + retention + orthanc.destination_toml(),
                       database_url=node_database.for_node(), timeout=180)
    db = Db(node.db_url)
    a, b = (write_ct_series(tmp_path / name, slices=20, size=64, seed=seed) for name, seed in (("a", 4), ("b", 5)))
    try:
        dcmtk.storescu(node.port, *a.paths, calling_ae="CT-A", check=True)
        wait_until(lambda: db.rows("select state from deliveries where series_uid = :s", s=a.series_uid)
                   == [("delivered",)], 300, "series a delivered", node.log_tail)
        node.stop(60)
        wait_until(lambda: json.loads(_pacsnode(node, "purge", "--json").stdout)["result_files"] == 3, 30,
                   "retention purging series a's 3 result files")
        assert not any(Path(r.path).exists() for r in db.rows("select path from results"))
        _as_the_previous_release_left_it(node)

        _start_upgraded(node, postgres)
        dcmtk.storescu(node.port, *b.paths, calling_ae="CT-B", check=True)
        job = wait_until(lambda: [r for r in db.rows("select state, last_error from jobs where series_uid = :s",
                                                     s=b.series_uid) if r.state == "done" or r.last_error], 300,
                         "series b's job done or failed", node.log_tail)
        assert job[0].state == "done", job[0].last_error
        wait_until(lambda: _modalities(orthanc, b.study_uid) == [("KO", 1), ("SEG", 1), ("SR", 1)], 60,
                   "series b's results at the PACS", node.log_tail)
    finally:
        node.stop()
        db.engine.dispose()
