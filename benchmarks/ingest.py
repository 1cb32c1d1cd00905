"""Ingest throughput: the same `storescu` feed to DCMTK storescp, Orthanc and the node, in one run.

    make bench                      # or: .venv/bin/python -m benchmarks.ingest [--files 1000] [--size 128]
    .venv/bin/python -m benchmarks.ingest --lean --only pacs-ai-node   # the node without its worker, alone

Writes N small CT files (default 1,000 × ~34 KB), then for each receiver runs one `storescu` association with all
files, and four concurrent `storescu` processes with a quarter each; prints images/s, MB/s and the node's ratio to
each peer. After each node run it checks that every acknowledged instance (storescu exits non-zero on any failure,
so: every file sent) is in the spool and in the index, and prints the node's peak RSS (VmHWM, the largest of its
process and any child processes, e.g. listener processes). Every peer runs with TCP_NODELAY=1 (see docs/peers.md). Receivers are started on free loopback ports
with temporary storage and stopped by PID (the receivers and storescu come from `peers`). storescp does no fsync;
Orthanc fdatasyncs each file; the node fsyncs the file and its folder and commits an index row before answering.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from peers import (
    NodeProcess,
    OrthancServer,
    PeerMissingError,
    PeerProcess,
    StoreScp,
    find_tool,
    free_port,
    launch_node,
    storescu,
)
from peers.ctgen import write_ct_series


@dataclass
class Receiver:
    name: str
    ae_title: str
    start: Callable[[Path, int], PeerProcess]  # (work folder, DICOM port) -> a started receiver


def storescp(work: Path, port: int) -> PeerProcess:
    return StoreScp(work / "storescp", aet="STORESCP", port=port, options=("+xa",)).start()


def orthanc(work: Path, port: int) -> PeerProcess:
    return OrthancServer(work / "orthanc", name="BENCH", dicom_port=port, dicomweb=False,
                         config={"DicomCheckCalledAet": False, "ConcurrentJobs": 2}).start()


LEAN = False  # --lean: the node without its worker (no TensorFlow in the process; the receive path alone)


def node(work: Path, port: int) -> PeerProcess:
    worker = "[worker]\nenabled = false\n" if LEAN else ""
    return launch_node(work / "node", port=port, extra_toml=f"[completion]\nstable_seconds = 3600\n{worker}",
                       args=("--log-level", "WARNING"))


RECEIVERS = [
    Receiver("DCMTK storescp", "STORESCP", storescp),
    Receiver("Orthanc", "ORTHANC", orthanc),
    Receiver("pacs-ai-node", "PACSNODE", node),
]


def feed(port: int, ae_title: str, groups: list[list[Path]]) -> float:
    """Run one storescu per group concurrently; return the wall time until all finished."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(groups)) as pool:
        done = list(pool.map(lambda i: storescu(port, *groups[i], called_ae=ae_title, calling_ae=f"BENCH{i}",
                                                timeout=3600),
                             range(len(groups))))
    elapsed = time.perf_counter() - t0
    errors = [d.stderr for d in done if d.returncode != 0]
    if errors:
        raise RuntimeError(f"storescu failed: {errors[0][:500]!r}")
    return elapsed


def _children(pid: int) -> list[int]:
    """``pid``'s descendants, read from /proc (Linux)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        kids = [child for child, parent in parents.items() if parent == current]
        found += kids
        todo += kids
    return found


def peak_rss_mb(pid: int) -> float:
    """The largest peak resident set (VmHWM) of ``pid`` and its descendants, in MB."""
    peaks = [0.0]
    for p in [pid, *_children(pid)]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        peaks += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return max(peaks)


def check_stored(node: NodeProcess, sent: int) -> str:
    """Check every sent instance is a file in the node's spool and a row in its index naming that file; return a
    one-line summary, raise `RuntimeError` otherwise."""
    files = {str(p) for p in node.spool.rglob("*.dcm")}
    with sqlite3.connect(node.db_url.split("///", 1)[1]) as db:
        paths = [row[0] for row in db.execute("SELECT path FROM instances")]
    missing = [p for p in paths if p not in files]
    if len(files) != sent or len(paths) != sent or missing:
        raise RuntimeError(f"sent {sent}: {len(files)} spool files, {len(paths)} index rows, {len(missing)} rows "
                           "without their file")
    return f"{sent} files + {sent} index rows"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128, help="image edge in pixels (128 → ~34 KB files)")
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--lean", action="store_true", help="node without its worker (no TensorFlow loaded)")
    parser.add_argument("--only", nargs="+", help="receivers to run (e.g. pacs-ai-node Orthanc)")
    args = parser.parse_args()
    global LEAN  # noqa: PLW0603 - one flag for the node launcher; the benchmark is a script
    LEAN = args.lean
    for tool in ("storescu", "storescp", "Orthanc"):
        try:
            find_tool(tool)
        except PeerMissingError:
            print(f"{tool} is missing: run `make sysdeps` as root", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="pacsnode-bench-") as tmp:
        work = Path(tmp)
        series = write_ct_series(work / "feed", slices=args.files, size=args.size, seed=42)
        files = series.paths
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(f"feed: {len(files)} CT files, {megabytes:.1f} MB ({megabytes * 1e3 / len(files):.0f} KB each)")
        results: dict[tuple[str, int], float] = {}
        rss: dict[int, float] = {}
        stored: dict[int, str] = {}
        for receiver in [r for r in RECEIVERS if not args.only or r.name in args.only]:
            for senders in args.senders:
                run_dir = work / f"{receiver.ae_title}-{senders}"
                run_dir.mkdir()
                port = free_port()
                peer = receiver.start(run_dir, port)
                try:
                    groups = [files[i::senders] for i in range(senders)]
                    results[(receiver.name, senders)] = feed(port, receiver.ae_title, groups)
                    if isinstance(peer, NodeProcess) and peer.proc is not None:
                        rss[senders] = peak_rss_mb(peer.proc.pid)
                        stored[senders] = check_stored(peer, len(files))
                finally:
                    peer.stop()
        ours = "pacs-ai-node"
        print()
        print("| receiver | senders | images/s | MB/s | node ratio |")
        print("|---|---:|---:|---:|---:|")
        for (name, senders), seconds in results.items():
            ips = len(files) / seconds
            ratio = seconds / results[(ours, senders)] if (ours, senders) in results else float("nan")
            print(f"| {name} | {senders} | {ips:,.0f} | {megabytes / seconds:,.1f} | {ratio:.2f}× |")
        print("\nnode ratio = node images/s ÷ receiver images/s (1.00× = as fast; >1 = node faster).")
        for senders in [n for n in args.senders if n in stored]:
            print(f"node, {senders} sender(s): acknowledged and checked: {stored[senders]}; "
                  f"peak RSS {rss[senders]:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
