"""What admission control costs per received instance, measured on the real pieces (os.statvfs, SQLite job queue
and index), not on fakes.

    .venv/bin/python -m benchmarks.admission [--checks 200000] [--jobs 2000] [--rate 200]

Prints: the per-instance cost of `Admission.check` + `written` while the node accepts (the decision in force is
reused; the disk and the queue are re-read at most every ``check_interval_seconds``), the cost of one such re-read
(a stat per folder the node writes to and a statvfs per file system, node.disks; the queue-depth count over
``--jobs`` job rows), the amortized per-instance total at ``--rate`` images/s (for a node that reads both once per
interval), and the cost of a check while paused (an index lookup for "is this series still being received?", its
answer kept per interval), each against the node's ~5 ms per image budget (~200 images/s).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from node.admission import Admission, index_activity
from node.config import AdmissionSection, Priority, QueueSection
from node.db import create_engine_for, init_schema
from node.errors import AdmissionRefusedError
from node.index import Index, InstanceRecord
from node.queue import JobQueue


def per_call_us(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    """Median over 5 runs of the mean µs per call of ``fn`` over ``n`` calls."""
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=200_000)
    parser.add_argument("--jobs", type=int, default=2000, help="job rows in the queue table (all but 10 done)")
    parser.add_argument("--rate", type=float, default=200.0, help="images/s for the amortized figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        engine = create_engine_for(f"sqlite:///{data / 'node.db'}")
        init_schema(engine)
        queue = JobQueue(engine, QueueSection())
        index = Index(engine)
        with engine.begin() as conn:
            for n in range(args.jobs):
                queue.enqueue(conn, f"1.2.{n}", 1, Priority.ROUTINE)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE jobs SET state = 'done' WHERE id > 10")  # 10 still queued
        index.record_instance(InstanceRecord(
            sop_uid="1.2.3.1", series_uid="1.2.3", study_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1", path="/x", size=1, sha256="0" * 64, modality="CT",
        ))
        settings = AdmissionSection(min_free_bytes=0, min_free_percent=0, reserve_free_bytes=0, reserve_free_percent=0)
        admission = Admission(settings, data, queue_depth=queue.depth, series_activity=index_activity(index))

        def accept() -> None:
            admission.check("1.2.3")
            admission.written(34_000)

        admission.refresh()
        steady = per_call_us(accept, args.checks)
        disk = per_call_us(admission.refresh, 2000)  # within one interval a refresh reads only the disk
        depth = per_call_us(queue.depth, 500)
        interval = settings.check_interval_seconds
        amortized = steady + (disk + depth) / max(args.rate * interval, 1.0)

        paused = Admission(settings.model_copy(update={"max_queue_depth": 1}), data, queue_depth=queue.depth,
                           series_activity=index_activity(index))
        paused.refresh()

        def in_progress() -> None:
            paused.check("1.2.3")  # in the index, receiving: accepted after one lookup

        def new_series() -> None:
            with contextlib.suppress(AdmissionRefusedError):
                paused.check("9.9.9")

        lookup = per_call_us(lambda: index_activity(index)("1.2.3"), 2000)
        paused_ok = per_call_us(in_progress, 5000)
        paused_refused = per_call_us(new_series, 5000)
        engine.dispose()
    budget = 1e6 / args.rate
    print(f"| admission control, per instance ({args.jobs} job rows, interval {interval} s) | µs | % of {budget:.0f} µs |")
    print("|---|---|---|")
    for label, us in (
        ("check + written, accepting (decision reused)", steady),
        ("one disk re-read (stat per folder, statvfs per file system; every interval)", disk),
        ("one queue depth count (every interval)", depth),
        (f"amortized at {args.rate:.0f} img/s", amortized),
        ("one index lookup: series still receiving? (paused only)", lookup),
        ("paused, series in progress (lookup kept per interval)", paused_ok),
        ("paused, new series refused (lookup kept, raise)", paused_refused),
    ):
        print(f"| {label} | {us:.2f} | {100 * us / budget:.3f} |")


if __name__ == "__main__":
    main()
