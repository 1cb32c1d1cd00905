"""Admission control on a real, small disk: the node's data directory is a 48 MiB tmpfs, DCMTK storescu is the
modality, and a filler file placed on the tmpfs plays the rest of the hospital's data.

What it shows: a series that starts above the floor (16 MiB free) runs on past it — a scanner mid-series may
finish — until the hard reserve (6 MiB), where everything is refused with 0xA700; new series are refused before
the filesystem is full (free space never comes near 0 and the node keeps answering); every instance the node
acknowledged is in the spool and the index and parses, nothing refused left a trace; STOW-RS gets 503 with
Retry-After while paused (whole request below the reserve, every part of a new series below the floor); and once
the filler is deleted the node accepts again by itself — no restart, no admin action.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pydicom
import pytest
import sqlalchemy as sa

from tests.conftest import (
    NodeProcess,
    launch_node,
    missing_peer,
    peer_env,
    require_tool,
    wait_until,
)
from tests.ctgen import CtSeries, write_ct_series
from tests.dicomfiles import content
from tests.unit.test_dicomweb import FAILED_SEQ, FAILURE_REASON, STOW_TYPE, multipart

pytestmark = pytest.mark.integration

MiB = 1 << 20
TMPFS_BYTES = 48 * MiB
FLOOR, RESERVE = 16 * MiB, 6 * MiB
RETRY_AFTER = 7
SLICE = 256  # 256² CT slices: ~129 KiB per file


@pytest.fixture
def tmpfs_node(tmp_path, node_database):
    """A node whose data_dir is a fresh tmpfs mount; stopped, then unmounted, at teardown."""
    workdir = tmp_path / "node"
    mount = workdir / "data"  # launch_node's data_dir
    mount.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        missing_peer(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    node: NodeProcess | None = None
    try:
        node = launch_node(workdir, extra_toml=f"""
[worker]
enabled = false
[gate]
scope_check = false
[admission]
min_free_bytes = {FLOOR}
min_free_percent = 0
reserve_free_bytes = {RESERVE}
reserve_free_percent = 0
retry_after_seconds = {RETRY_AFTER}
check_interval_seconds = 0.25
""", database_url=node_database.for_node())
        assert node.data_dir == mount
        yield node
    finally:
        if node is not None:
            node.stop()
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, nbytes: int) -> None:
    block = b"\0" * MiB
    with path.open("wb") as f:
        while nbytes > 0:
            nbytes -= f.write(block[: min(nbytes, MiB)])
        f.flush()
        os.fsync(f.fileno())


def send(node: NodeProcess, series: CtSeries) -> dict[str, str]:
    """storescu -nh (go on after a failure) → {file: store response}, e.g. "Success" or "Refused: OutOfResources"."""
    result = subprocess.run(
        [require_tool("storescu"), "-v", "-nh", "-aet", "MODALITY", "-aec", node.ae_title, "+sd", "+r",
         "127.0.0.1", str(node.port), str(series.paths[0].parent)],
        capture_output=True, text=True, env=peer_env(), timeout=120,
    )
    out = result.stdout + result.stderr
    answers: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        elif (m := re.search(r"Received Store Response \((.*)\)", line)) and current is not None:
            answers[current] = m.group(1)
            current = None
    assert len(answers) == len(series.paths), out[-3000:]
    return answers


def acked(answers: dict[str, str]) -> list[Path]:
    return sorted(Path(f) for f, status in answers.items() if status == "Success")


def status(node: NodeProcess) -> dict:
    return httpx.get(f"http://127.0.0.1:{node.http_port}/readyz", timeout=10).json()


def metric(node: NodeProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def stow(node: NodeProcess, series: CtSeries) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{node.http_port}/dicomweb/studies",
                      content=multipart([p.read_bytes() for p in series.paths]),
                      headers={"Content-Type": STOW_TYPE}, timeout=30)


def wait_paused(node: NodeProcess, paused: list[str]) -> dict:
    return wait_until(lambda: (a := status(node)["admission"])["paused"] == paused and a, 10,
                      f"admission paused by {paused}", lambda: f"\n{status(node)['admission']}")


def test_refuses_before_the_disk_is_full_loses_nothing_and_resumes(tmpfs_node, tmp_path):
    node = tmpfs_node
    require_tool("storescu")
    scanner = write_ct_series(tmp_path / "scanner", slices=150, size=SLICE, seed=11)  # ~19 MiB, one series
    late = write_ct_series(tmp_path / "late", slices=20, size=SLICE, seed=12)  # a new series while paused
    web = write_ct_series(tmp_path / "web", slices=2, size=SLICE, seed=13)  # a new series over STOW-RS
    one_file = scanner.paths[0].stat().st_size

    # The rest of the hospital's data: leave 4 MiB above the floor, in two files (one freed first).
    filler_small, filler_big = node.data_dir / "filler-small", node.data_dir / "filler-big"
    room = free_bytes(node.data_dir) - (FLOOR + 4 * MiB)
    fill(filler_small, 8 * MiB)
    fill(filler_big, room - 8 * MiB)
    assert wait_paused(node, [])["accepting"] == "all"

    # 1. The scanner's series starts above the floor, runs past it, and is stopped only by the hard reserve.
    first = send(node, scanner)
    scanner_acked = acked(first)
    low = free_bytes(node.data_dir)
    refused_in_series = len(scanner.paths) - len(scanner_acked)
    crossing = (4 * MiB) // one_file  # instances that fit above the floor
    assert len(scanner_acked) > crossing + 10, "the series in progress was not let past the floor"
    assert refused_in_series > 0 and all("Out of Resources" in s or "OutOfResources" in s
                                         for s in first.values() if s != "Success"), first
    # Refusals are the tail of the series: once at the reserve, nothing more was acknowledged.
    order = list(first)  # in the order storescu sent them
    first_refused = next(i for i, f in enumerate(order) if first[f] != "Success")
    assert all(first[f] != "Success" for f in order[first_refused:])
    # Stopped at the reserve, far from 0: the overshoot is the last file plus what the index database grew by
    # since the last disk read (only spool files are subtracted from the estimate in between).
    assert RESERVE / 2 < low < RESERVE + one_file
    a = wait_paused(node, ["disk_floor", "disk_reserve"])
    assert a["accepting"] == "nothing" and a["floor_bytes"] == FLOOR and a["reserve_bytes"] == RESERVE

    # Below the reserve: a new series is refused whole, STOW-RS before its body is read; the node still answers.
    assert set(send(node, late).values()) == {next(s for s in first.values() if s != "Success")}
    early = stow(node, web)
    assert early.status_code == 503 and early.headers["Retry-After"] == str(RETRY_AFTER)
    assert early.json()["reason"] == "disk_reserve"
    echo = subprocess.run([require_tool("echoscu"), "-aet", "MODALITY", "-aec", node.ae_title, "127.0.0.1",
                           str(node.port)], capture_output=True, text=True, env=peer_env(), timeout=30)
    assert echo.returncode == 0, echo.stderr
    assert status(node)["ready"] is True  # alive and ready; it refuses data, it is not broken

    # 2. Between reserve and floor: still no new series, and STOW-RS of a new series is 503 part by part.
    filler_small.unlink()
    a = wait_paused(node, ["disk_floor"])
    assert a["accepting"] == "series in progress"
    assert "Success" not in send(node, late).values()
    paused_stow = stow(node, web)
    assert paused_stow.status_code == 503 and paused_stow.headers["Retry-After"] == str(RETRY_AFTER)
    assert [i[FAILURE_REASON]["Value"][0] for i in paused_stow.json()[FAILED_SEQ]["Value"]] == [0xA700, 0xA700]

    # 3. Space freed: accepting again by itself.
    filler_big.unlink()
    wait_paused(node, [])
    resumed = send(node, late)
    assert set(resumed.values()) == {"Success"}
    assert stow(node, web).status_code == 200

    # Nothing acknowledged lost: every acknowledged file is in the index and the spool, parses, and has the
    # content that was sent; nothing refused left a row or a file.
    engine = sa.create_engine(node.db_url)
    try:
        with engine.connect() as conn:
            rows = {r.sop_uid: r for r in conn.execute(sa.text("SELECT sop_uid, path FROM instances"))}
    finally:
        engine.dispose()
    sent_ok = scanner_acked + acked(resumed)
    assert len(rows) == len(sent_ok) + len(web.paths)
    for path in sent_ok:
        sop_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        stored = Path(rows[sop_uid].path)
        assert stored.is_relative_to(node.spool)
        assert content(stored) == content(path)
        assert pydicom.dcmread(stored).pixel_array.shape == (SLICE, SLICE)
    refused_uids = {pydicom.dcmread(Path(f), stop_before_pixels=True).SOPInstanceUID
                    for f, s in first.items() if s != "Success"}
    assert not refused_uids & rows.keys()
    assert not list(node.spool.rglob("*.tmp"))

    # Counted and logged: refusals per reason and front door, one event per transition.
    dimse_refused = metric(node, "pacsnode_admission_refused_total", front_door="dimse")
    assert dimse_refused == refused_in_series + 2 * len(late.paths)
    assert metric(node, "pacsnode_admission_refused_total", front_door="stow", reason="disk_reserve") == 1
    assert metric(node, "pacsnode_admission_refused_total", front_door="stow", reason="disk_floor") == 2
    assert metric(node, "pacsnode_admission_paused", reason="disk_floor") == 0
    events = [json.loads(line) for line in node.log_text().splitlines() if line.startswith("{")]
    transitions = [(e["event"], e["reason"]) for e in events if e["event"] in ("admission_paused", "admission_resumed")]
    assert transitions == [("admission_paused", "disk_floor"), ("admission_paused", "disk_reserve"),
                           ("admission_resumed", "disk_reserve"), ("admission_resumed", "disk_floor")]
    refusal_lines = [e for e in events if e["event"] == "admission_refused"]
    assert 0 < len(refusal_lines) <= 6  # rate-limited: not one line per refused instance
    print(f"\ntmpfs {TMPFS_BYTES // MiB} MiB, floor {FLOOR // MiB} MiB, reserve {RESERVE // MiB} MiB, "
          f"{one_file} B per file: scanner series {len(scanner_acked)}/{len(scanner.paths)} acknowledged "
          f"({crossing} fit above the floor), lowest free {low / MiB:.2f} MiB; new series refused "
          f"{2 * len(late.paths)} instances, then {len(acked(resumed))}/{len(late.paths)} accepted after freeing; "
          f"DIMSE refusals counted {dimse_refused:.0f}")
