"""Where the receive time goes: py-spy samples a node receiving `storescu` series, split by stage.

    .venv/bin/python -m benchmarks.receive_profile [--files 500] [--size 512] [--senders 1] [--rate 500]

Writes a CT series (`peers.ctgen`), starts the node with the worker off (receive only: no TensorFlow, no model
runner) and the quiet timer long, attaches ``py-spy record --idle --threads`` to it (root, or ptrace allowed),
sends the series with one `storescu` per sender and prints wall milliseconds per instance by stage. py-spy
(``pip install py-spy``) is a development tool, not a dependency.

What counts: the association threads (the ones that ran the C-STORE handler, ``_on_store``) sample every 1/rate
seconds whether running or blocked (``--idle``), so their samples split each instance's wall time: our handler
by the innermost frame of ours (node/*.py) or the library call under it, pynetdicom's polling sleep while the
next request arrives, and building/sending the C-STORE response. pynetdicom's DUL threads (socket reads, PDU
decoding) run beside them; their non-sleeping samples are shown as a separate, overlapping line. With several
senders the per-instance figures are per association thread, summed over threads, ÷ instances.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peers import launch_node, storescu
from peers.ctgen import write_ct_series

# Inside the handler: the innermost matching frame (leaf first) names the stage.
_HANDLER_STAGES: list[tuple[str, str]] = [
    ("spool: file write + fsync", r"(fsync|write) \(node/spool\.py|_write_file \(node/spool\.py"),
    ("spool: directory fsync", r"_fsync_dir \(node/spool\.py|sync_dirs"),
    ("spool: mkdir, rename, other", r"node/spool\.py"),
    ("index: SQLite COMMIT (WAL fsync)", r"\bcommit \(|_commit_impl|do_commit"),
    ("index: SQL statements (SQLAlchemy + sqlite3)", r"node/index\.py|node/durability\.py"),
    ("group commit: waiting while another association's batch commits", r"submit \(node/groupcommit\.py"),
    ("parse + validate (pydicom)", r"_parse_header|_check_vrs|read_dataset"),
    ("file meta (pydicom)", r"write_file_meta_info|_file_meta"),
    ("admission", r"node/admission\.py"),
    ("logging (structlog)", r"structlog|node/logs\.py"),
    ("metrics", r"node/metrics\.py"),
]
_HANDLER = re.compile(r"_on_store \(node/dimse\.py")
_SLEEPING = re.compile(r"(run_reactor \(pynetdicom/dul\.py:40\d\)|_run_reactor \(pynetdicom/association\.py:71\d\)|"
                       r"ready \(pynetdicom/transport\.py|wait \(threading\.py|get \(queue\.py|"
                       r"wait_readable \(node/reactorwait\.py)")


def classify(frames: list[str]) -> str:
    """One association-thread stack (root first) → a stage name."""
    for i, frame in enumerate(frames):
        if _HANDLER.search(frame):
            for inner in reversed(frames[i:]):
                for name, pattern in _HANDLER_STAGES:
                    if re.search(pattern, inner):
                        return f"handler: {name}"
            return "handler: other (ingest glue, UID checks)"
    text = ";".join(frames)
    if "send_msg" in text or "primitive_to_message" in text:
        return "pynetdicom: build + encode + send C-STORE-RSP"
    if _SLEEPING.search(frames[-1]):
        return "pynetdicom: reactor wait (next request arriving; 1 ms sleeps before node.reactorwait)"
    return "pynetdicom: other (DIMSE decode, events)"


def split(raw: Path) -> tuple[collections.Counter[str], int]:
    """py-spy ``--format raw --threads`` output → (samples per stage over association threads, DUL busy samples)."""
    stacks: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if len(frames) > 1 and count.isdigit():  # py-spy --nonblocking may catch a thread with no stack
            stacks[frames[0]].append((frames[1:], int(count)))
    stages: collections.Counter[str] = collections.Counter()
    dul_busy = 0
    for samples in stacks.values():
        text = [";".join(f) for f, _ in samples]
        if any(_HANDLER.search(t) for t in text):
            for frames, n in samples:
                if "run_reactor (pynetdicom/association.py" in ";".join(frames):  # not the negotiation before it
                    stages[classify(frames)] += n
        elif any("P_DATA_TF" in t for t in text):
            dul_busy += sum(n for frames, n in samples if not _SLEEPING.search(frames[-1]))
    return stages, dul_busy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--keep", type=Path, help="copy py-spy's raw output here")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is missing: pip install py-spy", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pacsnode-profile-") as tmp:
        work = Path(tmp)
        series = write_ct_series(work / "feed", slices=args.files, size=args.size, seed=7)
        kb = sum(p.stat().st_size for p in series.paths) / 1e3 / args.files
        node = launch_node(work / "node", args=("--log-level", "WARNING"),
                           # one process, so py-spy's pid is the receiving one (the listener's code path)
                           extra_toml='process_model = "threads"\n'
                                      "[completion]\nstable_seconds = 3600\n[worker]\nenabled = false\n")
        raw = work / "profile.txt"
        try:
            assert node.proc is not None
            spy_proc = subprocess.Popen(
                [spy, "record", "--nonblocking", "--idle", "--threads", "--rate", str(args.rate), "--format", "raw", "-o", str(raw),
                 "--pid", str(node.proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attaching: nothing observable to wait on from outside
            groups = [series.paths[i::args.senders] for i in range(args.senders)]
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(args.senders) as pool:
                done = list(pool.map(lambda g: storescu(node.port, *g, calling_ae="PROFILE", timeout=3600), groups))
            elapsed = time.perf_counter() - t0
            spy_proc.send_signal(2)
            spy_proc.wait(60)
        finally:
            node.stop()
        failed = [d.stderr[-800:] for d in done if d.returncode]
        if failed:
            print(f"storescu failed: {failed}", file=sys.stderr)
            return 1
        if args.keep:
            shutil.copy(raw, args.keep)
        stages, dul_busy = split(raw)
    n = args.files
    per = 1e3 / args.rate / n  # ms per instance per sample
    print(f"{n} × {args.size}² CT ({kb:.0f} KB each), {args.senders} sender(s): {n / elapsed:.0f} img/s, "
          f"{elapsed * 1e3 / n:.2f} ms wall per instance")
    print("\n| association thread: stage | ms per instance | share |\n|---|---:|---:|")
    total = sum(stages.values())
    for stage, samples in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"| {stage} | {samples * per:.2f} | {samples / total:.0%} |")
    print(f"| **total (association thread wall)** | **{total * per:.2f}** | |")
    print(f"| DUL thread, beside it: PDU read + decode (busy) | {dul_busy * per:.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
