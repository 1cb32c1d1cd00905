"""Claim throughput of the shared job queue (`node.leases` under `node.queue.JobQueue`): 1, 2 and 4 competing worker
processes drain one queue on SQLite and on PostgreSQL (a throwaway cluster, `peers.postgres`), and every claimed
job id is checked: none may be claimed twice, none left behind.

    .venv/bin/python -m benchmarks.claims [--jobs 1000] [--workers 1 2 4] [--backends sqlite postgresql]

Each worker process has its own engine and loops `claim` → `finish` (in its own transaction) until nothing is due,
as a worker does without the models. Prints jobs/s (claim + finish) from the first claim to the last finish.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from node.config import Priority, QueueSection
from node.db import create_engine_for, init_schema
from node.queue import JobQueue
from node.states import JobState


def _drain(url: str, holder: str, start: Any, out: Any) -> None:
    engine = create_engine_for(url)
    queue = JobQueue(engine, QueueSection(lease_seconds=600))
    engine.connect().close()  # connect before the clock starts
    claimed = []
    start.wait()
    t0 = time.perf_counter()
    while (job := queue.claim(holder)) is not None:
        claimed.append(job.id)
        with engine.begin() as conn:
            if not queue.finish(conn, job, holder, inference_seconds=0.0):
                raise RuntimeError(f"{holder} lost the lease of job {job.id}")
    out.put((claimed, t0, time.perf_counter()))
    engine.dispose()


def run(url: str, jobs: int, workers: int) -> dict[str, Any]:
    engine = create_engine_for(url)
    init_schema(engine)
    queue = JobQueue(engine, QueueSection())
    with engine.begin() as conn:
        ids = [queue.enqueue(conn, f"1.2.{i}", 1, Priority.ROUTINE) for i in range(jobs)]
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_drain, args=(url, f"bench:worker:{i}", start, out)) for i in range(workers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    claimed = Counter(job_id for ids_, _, _ in results for job_id in ids_)
    seconds = max(end for _, _, end in results) - min(begin for _, begin, _ in results)
    left = jobs - queue.counts().get(JobState.DONE.value, 0)
    engine.dispose()
    return {"jobs": jobs, "seconds": seconds, "rate": jobs / seconds,
            "twice": sum(1 for n in claimed.values() if n > 1), "missing": len(set(ids) - set(claimed)), "left": left,
            "per_worker": sorted(len(ids_) for ids_, _, _ in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pacsnode-claims-"))
    server = None
    try:
        print(f"claim + finish throughput, {args.jobs} jobs per run, worker processes competing for one queue")
        print("| backend | workers | jobs/s | seconds | jobs per worker | claimed twice | never claimed | not done |")
        print("|---|---|---|---|---|---|---|---|")
        failed = False
        for backend in args.backends:
            for n, workers in enumerate(args.workers):
                if backend == "sqlite":
                    url = f"sqlite:///{tmp / f'claims{n}.db'}"
                else:
                    if server is None:
                        from peers.postgres import PostgresServer

                        server = PostgresServer(Path(tempfile.mkdtemp(prefix="pacsnode-pg-"))).start()
                    url = str(server.create_database())
                r = run(url, args.jobs, workers)
                failed |= bool(r["twice"] or r["missing"] or r["left"])
                print(f"| {backend} | {workers} | {r['rate']:.0f} | {r['seconds']:.2f} | "
                      f"{'/'.join(map(str, r['per_worker']))} | {r['twice']} | {r['missing']} | {r['left']} |",
                      flush=True)
        print("no job claimed twice, none left" if not failed else "FAILED: a job was claimed twice or left behind")
        if failed:
            raise SystemExit(1)
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.workdir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
