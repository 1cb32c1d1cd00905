"""Ingest throughput: the same `storescu` feed to DCMTK storescp, Orthanc and the node, in one run.

    make bench                      # or: .venv/bin/python -m benchmarks.ingest [--files 1000] [--size 128]
    .venv/bin/python -m benchmarks.ingest --lean --only pacs-ai-node   # the node without its worker, alone
    .venv/bin/python -m benchmarks.ingest --nodes threads processes:2  # which node variants to run

Writes N small CT files (default 1,000 × ~34 KB, one series), then for each receiver runs one `storescu` association
with all files, and four concurrent `storescu` processes with a quarter each; prints images/s, MB/s and each
receiver's ratio to Orthanc and to DCMTK storescp from the same run. The node runs in each of the ``--nodes``
variants: ``threads`` (`pacsnode serve`, every stage in one process) and ``processes:N`` (``process_model =
"processes"``, N listener processes sharing the port, the worker — enabled unless ``--lean`` — and the dispatcher in
processes of their own: the node as deployed for receiving). After each node run it checks that every acknowledged
instance (storescu exits non-zero on any failure, so: every file sent) is in the spool and in the index, and prints
the peak RSS (VmHWM) of the receiving process — the listener children's largest with ``processes``, the node's own
with ``threads`` — and of the whole process tree. Every peer runs with TCP_NODELAY=1 (see docs/peers.md). Receivers
are started on free loopback ports with temporary storage and stopped by PID (the receivers and storescu come from
`peers`). storescp does no fsync; Orthanc fdatasyncs each file; the node fsyncs the file and its folder and
commits an index row before answering.
"""

from __future__ import annotations

import argparse
import json
import os
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
    wait_until,
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
NODE = "pacs-ai-node"


def node_starter(model: str, listeners: int) -> Callable[[Path, int], PeerProcess]:
    """A launcher for the node in process model ``model`` ("threads" or "processes" with ``listeners``)."""

    def start(work: Path, port: int) -> PeerProcess:
        processes = (f'process_model = "processes"\nlistener_processes = {listeners}\n' if model == "processes"
                     else 'process_model = "threads"\n')
        worker = "[worker]\nenabled = false\n" if LEAN else ""
        started = launch_node(work / "node", port=port, args=("--log-level", "WARNING"),
                              extra_toml=f"{processes}[completion]\nstable_seconds = 3600\n{worker}")
        # wait for every listener (each binds the HTTP port; the DIMSE port is one socket the supervisor binds,
        # node.listenfds), or the first one up takes every sender
        wait_until(lambda: listening_sockets(started.http_port) >= listeners, 120,
                   f"{listeners} listeners on HTTP port {started.http_port}", started.log_tail)
        return started

    return start


def node_receiver(variant: str) -> Receiver:
    """``threads`` or ``processes:N``."""
    model, _, count = variant.partition(":")
    if model == "threads":
        return Receiver(NODE, "PACSNODE", node_starter("threads", 1))
    listeners = int(count or 1)
    return Receiver(f"{NODE} (processes, {listeners} listener{'s' if listeners > 1 else ''})", "PACSNODE",
                    node_starter("processes", listeners))


def listening_sockets(port: int) -> int:
    """How many TCP sockets listen on ``port`` (SO_REUSEPORT listeners each have one), from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return count


PEERS = [
    Receiver("DCMTK storescp", "STORESCP", storescp),
    Receiver("Orthanc", "ORTHANC", orthanc),
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


def vm_hwm_mb(pid: int) -> float:
    """``pid``'s peak resident set (VmHWM) in MB; 0 when it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return max([int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")] or [0.0])


def peak_rss_mb(pid: int) -> float:
    """The largest peak resident set (VmHWM) of ``pid`` and its descendants, in MB."""
    return max(vm_hwm_mb(p) for p in [pid, *_children(pid)])


def receiving_pids(peer: PeerProcess) -> list[int]:
    """The process(es) that receive: the node's listener children (process model "processes", from the
    supervisor's process table), else the receiver's own process (the node's with "threads")."""
    if peer.proc is None:
        return []
    table = peer.spool.parent / "processes.json" if isinstance(peer, NodeProcess) else None
    if table is None or not table.exists():
        return [peer.proc.pid]
    return [p["pid"] for p in json.loads(table.read_text())["processes"] if p["role"] == "listener" and p["pid"]]


def receiving_rss_mb(node: NodeProcess) -> float:
    """The peak RSS of the process(es) that received (`receiving_pids`): the largest."""
    return max([vm_hwm_mb(pid) for pid in receiving_pids(node)] or [0.0])


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds ``pids`` have used so far (/proc; 0 for one that exited)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


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


def print_table(results: dict[tuple[str, int], float], cpu_ms: dict[tuple[str, int], float], files: int,
                megabytes: float) -> None:
    """One row per receiver and sender count: images/s, MB/s, the ratio to Orthanc and storescp, and the CPU the
    receiving process(es) spent per instance."""
    print("\n| receiver | senders | images/s | MB/s | ÷ Orthanc | ÷ storescp | receiver CPU, ms per instance |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, senders), seconds in results.items():
        ratios = [results[(peer, senders)] / seconds if (peer, senders) in results else float("nan")
                  for peer in ("Orthanc", "DCMTK storescp")]
        print(f"| {name} | {senders} | {files / seconds:,.0f} | {megabytes / seconds:,.1f} | "
              + " | ".join(f"{r:.2f}×" for r in ratios) + f" | {cpu_ms.get((name, senders), float('nan')):.2f} |")
    print("\n÷ X = receiver images/s ÷ X's images/s, same feed and run (1.00× = as fast; >1 = faster). Targets for "
          "the node: ≥ 0.75× Orthanc with 1 sender, ≥ 1.0× with 4. Receiver CPU: user + system time of the "
          "receiving process(es) (the node's listeners; with `threads` the whole node, worker included) ÷ instances.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128, help="image edge in pixels (128 → ~34 KB files)")
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--lean", action="store_true", help="node without its worker (no TensorFlow loaded)")
    parser.add_argument("--nodes", nargs="+", default=["threads", "processes:1", "processes:2"],
                        help="node variants: threads, processes:N (N listener processes)")
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
    receivers = [*PEERS, *(node_receiver(v) for v in args.nodes)]
    with tempfile.TemporaryDirectory(prefix="pacsnode-bench-") as tmp:
        work = Path(tmp)
        series = write_ct_series(work / "feed", slices=args.files, size=args.size, seed=42)
        files = series.paths
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(f"feed: one series of {len(files)} CT files, {megabytes:.1f} MB "
              f"({megabytes * 1e3 / len(files):.0f} KB each); node worker {'off' if LEAN else 'on'}")
        results: dict[tuple[str, int], float] = {}
        cpu_ms: dict[tuple[str, int], float] = {}  # CPU of the receiving process(es) per instance
        notes: list[str] = []
        for number, receiver in enumerate(r for r in receivers if not args.only or r.name.startswith(tuple(args.only))):
            for senders in args.senders:
                run_dir = work / f"{number}-{receiver.ae_title}-{senders}"
                run_dir.mkdir()
                port = free_port()
                peer = receiver.start(run_dir, port)
                try:
                    groups = [files[i::senders] for i in range(senders)]
                    pids = receiving_pids(peer)
                    cpu = cpu_seconds(pids)
                    results[(receiver.name, senders)] = feed(port, receiver.ae_title, groups)
                    cpu_ms[(receiver.name, senders)] = (cpu_seconds(pids) - cpu) * 1e3 / len(files)
                    if isinstance(peer, NodeProcess) and peer.proc is not None:
                        notes.append(f"{receiver.name}, {senders} sender(s): acknowledged and checked: "
                                     f"{check_stored(peer, len(files))}; peak RSS of the receiving process "
                                     f"{receiving_rss_mb(peer):.0f} MB, of all its processes "
                                     f"{peak_rss_mb(peer.proc.pid):.0f} MB")
                finally:
                    peer.stop()
        print_table(results, cpu_ms, len(files), megabytes)
        print(*notes, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
