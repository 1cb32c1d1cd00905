"""kill -9 during a transfer loses nothing acknowledged: four DCMTK `storescu` senders at once (so instances share
group commits), the node killed with SIGKILL mid-transfer, then every instance `storescu` saw answered Success is
checked in the spool (byte-for-byte data set) and in the index, and a restarted node takes the re-sent rest.

Power loss cannot be staged here; the argument for it is in node/durability.py (file fdatasync → rename → folder
fsync → index commit → answer).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from peers import dcmtk
from peers.process import peer_env, wait_until
from tests.conftest import require_tool
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes

pytestmark = pytest.mark.integration

# One process (the threads model): SIGKILL of that pid is the whole node dying at once. The processes model's own
# crash test kills one listener child mid-transfer (test_processes.py).
LEAN = 'process_model = "threads"\n[worker]\nenabled = false\n[completion]\nstable_seconds = 3600\n'


def indexed(db_url: str) -> dict[str, str]:
    """sop_uid → path of every committed index row (a fresh engine, as after a crash)."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return {r.sop_uid: r.path for r in conn.execute(sa.text("select sop_uid, path from instances"))}
    finally:
        engine.dispose()


def acknowledged(log: str) -> list[str]:
    """The files a ``storescu -v`` run saw answered with Success."""
    done, current = [], None
    for line in log.splitlines():
        if m := re.match(r"I: Sending file: (.+)$", line):
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


def test_kill_9_during_a_transfer_loses_nothing_acknowledged(start_node, tmp_path):
    storescu = require_tool("storescu")
    series = [write_ct_series(tmp_path / f"feed{i}", slices=40, size=32, seed=20 + i) for i in range(4)]
    sop_of = {str(p): sop for s in series for p, sop in zip(s.paths, s.sop_uids, strict=True)}
    node = start_node(extra_toml=LEAN)
    logs = [tmp_path / f"storescu{i}.log" for i in range(4)]
    senders = []
    for i, (s, log) in enumerate(zip(series, logs, strict=True)):
        with log.open("w") as out:
            senders.append(subprocess.Popen(
                [storescu, "-v", "-aet", f"CT{i}", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                 *map(str, s.paths)], stdout=out, stderr=subprocess.STDOUT, env=peer_env()))
    try:
        wait_until(lambda: len(indexed(node.db_url)) >= 20, 60, "20 instances committed")
        node.kill()
        assert node.proc is not None
        node.proc.wait(10)
    finally:
        for proc in senders:
            proc.wait(60)
    acked = [f for log in logs for f in acknowledged(log.read_text())]
    assert acked, "nothing was acknowledged before the kill"
    assert len(acked) < 160, "the transfer finished before the kill: nothing was tested"
    rows = indexed(node.db_url)
    for sent in acked:
        sop = sop_of[sent]
        assert sop in rows, f"acknowledged {sop} has no index row after kill -9"
        stored = Path(rows[sop])
        assert stored.name == f"{sop}.dcm" and stored.is_file(), f"acknowledged {sop} has no spool file"
        assert dataset_bytes(stored) == dataset_bytes(sent)
    # A restarted node takes the whole series again (the acknowledged ones as duplicates), nothing counted twice.
    node.start()
    for i, s in enumerate(series):
        done = dcmtk.storescu(node.port, *s.paths, called_ae=node.ae_title, calling_ae=f"CT{i}")
        assert done.returncode == 0, done.stderr[-2000:]
    assert set(indexed(node.db_url)) == set(sop_of.values())
    engine = sa.create_engine(node.db_url)
    try:
        with engine.connect() as conn:
            counts = dict(conn.execute(sa.text("select series_uid, instance_count from series")).all())
    finally:
        engine.dispose()
    assert counts == {s.series_uid: 40 for s in series}
