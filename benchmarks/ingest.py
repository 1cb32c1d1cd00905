"""Ingest throughput: the same `storescu` feed to DCMTK storescp, Orthanc and the node, in one run.

    make bench                      # or: .venv/bin/python benchmarks/ingest.py [--files 1000] [--size 128]

Writes N small CT files (default 1,000 × ~34 KB), then for each receiver runs one `storescu` association with all
files, and four concurrent `storescu` processes with a quarter each; prints images/s, MB/s and the node's ratio to
each peer. Every peer runs with TCP_NODELAY=1 (see docs/peers.md). Receivers are started on free loopback ports
with temporary storage and stopped by PID. storescp does no fsync; Orthanc fdatasyncs each file; the node fsyncs
the file and its folder and commits an index row before answering.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.ctgen import write_ct_series  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening")


ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Receiver:
    name: str
    ae_title: str
    start: Callable[[Path, int], subprocess.Popen[bytes]]


def start_storescp(work: Path, port: int) -> subprocess.Popen[bytes]:
    out = work / "storescp"
    out.mkdir()
    return subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "--output-directory", str(out), "+xa", str(port)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def start_orthanc(work: Path, port: int) -> subprocess.Popen[bytes]:
    db = work / "orthanc"
    db.mkdir()
    config = {
        "Name": "BENCH", "StorageDirectory": str(db), "IndexDirectory": str(db),
        "DicomServerEnabled": True, "DicomAet": "ORTHANC", "DicomPort": port, "DicomCheckCalledAet": False,
        "HttpServerEnabled": True, "HttpPort": free_port(), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
        "Plugins": [], "ConcurrentJobs": 2,
    }
    path = work / "orthanc.json"
    path.write_text(json.dumps(config))
    return subprocess.Popen(["Orthanc", str(path)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_node(work: Path, port: int) -> subprocess.Popen[bytes]:
    data = work / "node"
    config = work / "node.toml"
    config.write_text(
        f'[node]\nae_title = "PACSNODE"\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\n'
        f"http_port = {free_port()}\n[completion]\nstable_seconds = 3600\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(config), "--log-level", "WARNING"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


RECEIVERS = [
    Receiver("DCMTK storescp", "STORESCP", start_storescp),
    Receiver("Orthanc", "ORTHANC", start_orthanc),
    Receiver("pacs-ai-node", "PACSNODE", start_node),
]


def feed(port: int, ae_title: str, groups: list[list[Path]]) -> float:
    """Run one storescu per group concurrently; return the wall time until all finished."""
    t0 = time.perf_counter()
    procs = []
    for i, group in enumerate(groups):
        procs.append(
            subprocess.Popen(
                ["storescu", "-aet", f"BENCH{i}", "-aec", ae_title, "127.0.0.1", str(port), *map(str, group)],
                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
        )
    errors = [p.communicate()[1] for p in procs if p.wait() != 0]
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"storescu failed: {errors[0][:500]!r}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128, help="image edge in pixels (128 → ~34 KB files)")
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is missing: run `make sysdeps` as root", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="pacsnode-bench-") as tmp:
        work = Path(tmp)
        series = write_ct_series(work / "feed", slices=args.files, size=args.size, seed=42)
        files = series.paths
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(f"feed: {len(files)} CT files, {megabytes:.1f} MB ({megabytes * 1e3 / len(files):.0f} KB each)")
        results: dict[tuple[str, int], float] = {}
        for receiver in RECEIVERS:
            for senders in args.senders:
                run_dir = work / f"{receiver.ae_title}-{senders}"
                run_dir.mkdir()
                port = free_port()
                proc = receiver.start(run_dir, port)
                try:
                    wait_port(port, proc)
                    groups = [files[i::senders] for i in range(senders)]
                    results[(receiver.name, senders)] = feed(port, receiver.ae_title, groups)
                finally:
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        node = "pacs-ai-node"
        print()
        print("| receiver | senders | images/s | MB/s | node ratio |")
        print("|---|---:|---:|---:|---:|")
        for (name, senders), seconds in results.items():
            ips = len(files) / seconds
            ratio = seconds / results[(node, senders)]
            print(f"| {name} | {senders} | {ips:,.0f} | {megabytes / seconds:,.1f} | {ratio:.2f}× |")
        print("\nnode ratio = node images/s ÷ receiver images/s (1.00× = as fast; >1 = node faster).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
