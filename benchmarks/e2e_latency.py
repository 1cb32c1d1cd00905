"""End-to-end latency: last instance acknowledged → SR + SEG stored at the PACS, for a 120-slice CT series.

    make bench-e2e                  # or: .venv/bin/python -m benchmarks.e2e_latency [--slices 120] [--size 512]

Starts Orthanc (temporary storage, free ports) as the PACS and the node (shipped models) with Orthanc as its
destination, waits until the models are loaded, writes a synthetic chest phantom series, sends it with DCMTK
`storescu`, and measures from storescu's exit (every C-STORE acknowledged) until Orthanc holds both the SR and the
SEG. Prints the split the node records: completion wait, queue, load (decode + resample of the slices not
prefetched), inference (with streaming on: pooling only, the per-slice work having run while the series arrived),
SR/SEG building, commit (files + delivery rows) and the rest (dispatch to Orthanc, Orthanc indexing, polling);
"(send)" is storescu's own time for the series, before the clock starts (the cost prefetching puts on receive).
Repeats ``--runs`` times with fresh series (new UIDs) and prints each run and the median of the warm runs (all but
the first). ``--no-prefetch`` turns streaming inference off (``[worker] prefetch = false``) for comparison;
The node runs as it is deployed by default (``[node] process_model = "processes"``: listener, worker and
dispatcher processes); ``--threads`` runs every stage in one process for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from peers import OrthancServer, free_port, launch_node, storescu, wait_until
from training.phantom import generate_case


def node_toml(orthanc: OrthancServer, prefetch: bool = True, processes: bool = True,
              classifier_version: str | None = None, retain_heap_mb: int | None = None,
              prefetch_poll: float | None = None) -> str:
    return (
        ('process_model = "processes"\n' if processes else 'process_model = "threads"\n')  # launch_node's [node]
        + f"[worker]\nprefetch = {str(prefetch).lower()}\n"
        + (f"prefetch_poll_seconds = {prefetch_poll}\n" if prefetch_poll is not None else "")
        + (f'classifier_version = "{classifier_version}"\n' if classifier_version else "")
        + (f"retain_heap_mb = {retain_heap_mb}\n" if retain_heap_mb is not None else "")
        + "[completion]\nstable_seconds = 30\nsweep_seconds = 0.5\n"
        # storescu sends each series in one association: its profile completes on release
        '[[completion.senders]]\ncalling_ae = "BENCH"\nmode = "release"\n'
        + orthanc.destination_toml("pacs")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--no-prefetch", action="store_true", help="streaming inference off, for comparison")
    parser.add_argument("--threads", action="store_true", help='[node] process_model = "threads" (one process)')
    parser.add_argument("--classifier-version", help="[worker] classifier_version (default: the shipped default)")
    parser.add_argument("--retain-heap-mb", type=int, help="[worker] retain_heap_mb (0: glibc's defaults; node.heap)")
    parser.add_argument("--prefetch-poll", type=float, help="[worker] prefetch_poll_seconds (default: the node's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacsnode-e2e-") as tmp:
        work = Path(tmp)
        node_port = free_port()
        with OrthancServer(work / "orthanc", modalities={"node": ("PACSNODE", "127.0.0.1", node_port)}) as orthanc:
            node = launch_node(work, port=node_port, extra_toml=node_toml(orthanc, not args.no_prefetch, not args.threads,
                                                                         args.classifier_version, args.retain_heap_mb,
                                                                         args.prefetch_poll))
            try:
                wait_until(lambda: "models_loaded" in node.log_text(), 300, "models to load", node.log_tail,
                           process=node.proc)
                engine = sa.create_engine(node.db_url)
                rows: list[tuple[Any, ...]] = []
                loads: list[float] = []  # 1-minute load average after each run: how busy the machine was
                for run in range(args.runs):
                    case = generate_case(90210 + run, 0, 1, work / f"case{run}", size=(args.size, args.size),
                                         slices=(args.slices, args.slices))
                    series_dir = work / f"case{run}" / str(case["dicom_dir"])
                    sent = time.monotonic()
                    storescu(node_port, series_dir, calling_ae="BENCH", check=True)
                    acked = time.monotonic()
                    study = str(case["study_instance_uid"])

                    def stored(study: str = study) -> bool:
                        found = orthanc.find("Series", {"StudyInstanceUID": study}, expand=True)
                        modalities = {s["MainDicomTags"].get("Modality") for s in found}
                        return {"SR", "SEG"} <= modalities

                    wait_until(stored, 300, "SR and SEG at Orthanc", node.log_tail, interval=0.02)
                    total = time.monotonic() - acked
                    with engine.connect() as conn:
                        series = conn.execute(sa.text("select last_received_at, state_changed_at from series "
                                                      "where series_uid = :s"), {"s": case["series_instance_uid"]}).one()
                        job = conn.execute(sa.text("select queue_seconds, inference_seconds from jobs "
                                                   "where series_uid = :s"), {"s": case["series_instance_uid"]}).one()
                    completion = series.state_changed_at - series.last_received_at
                    done = _event(node.log_text(), "job_done", str(case["series_instance_uid"]))
                    used = _event(node.log_text(), "prefetch_used", str(case["series_instance_uid"]))
                    stages = [done.get(k, float("nan")) for k in ("load_seconds", "build_seconds", "commit_seconds")]
                    rest = total - completion - job.queue_seconds - job.inference_seconds - sum(stages)
                    rows.append((run + 1, used.get("slices_cached", 0), acked - sent, completion, job.queue_seconds, stages[0],
                                 job.inference_seconds, stages[1], stages[2], rest, total))
                    loads.append(os.getloadavg()[0])
                engine.dispose()
            finally:
                node.stop(60)
    print(f"\n{args.slices}-slice {args.size}² phantom series, storescu → node → Orthanc "
          f"(seconds from last C-STORE acknowledged)\n")
    print(f"streaming inference (prefetch): {'off' if args.no_prefetch else 'on'}; process model: "
          f"{'threads' if args.threads else 'processes'}; load average during the runs "
          f"{min(loads, default=0):.1f}–{max(loads, default=0):.1f} on {os.cpu_count()} CPUs\n")
    print("| run | slices prefetched | (send) | completion wait | queue | load | inference | build SR/SEG | commit "
          "| dispatch + rest | total |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run, cached, *times in rows:
        print(f"| {run} | {cached} | " + " | ".join(f"{t:.2f}" for t in times) + " |")
    warm = rows[1:] or rows
    medians = [statistics.median(r[i] for r in warm) for i in range(2, 11)]
    print("| median (warm) | | " + " | ".join(f"{t:.2f}" for t in medians) + " |")
    return 0


def _event(log: str, event: str, series_uid: str) -> dict[str, float]:
    """The node's last JSON log event ``event`` for ``series_uid`` (empty when none)."""
    found: dict[str, float] = {}
    for line in log.splitlines():
        if f'"{event}"' in line and series_uid in line:
            try:
                found = json.loads(line[line.index("{"):])
            except ValueError:
                continue
    return found


if __name__ == "__main__":
    sys.exit(main())
