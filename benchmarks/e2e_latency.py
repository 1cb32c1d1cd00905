"""End-to-end latency: last instance acknowledged → SR + SEG stored at the PACS, for a 120-slice CT series.

    make bench-e2e                  # or: .venv/bin/python benchmarks/e2e_latency.py [--slices 120] [--size 512]

Starts Orthanc (temporary storage, free ports) as the PACS and the node (shipped models) with Orthanc as its
destination, waits until the models are loaded, writes a synthetic chest phantom series, sends it with DCMTK
`storescu`, and measures from storescu's exit (every C-STORE acknowledged) until Orthanc holds both the SR and the
SEG. Prints the split the node records: completion wait, queue, inference, build+dispatch. Repeats ``--runs``
times with fresh series (new UIDs) and prints each run and the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

from tests.conftest import free_port, wait_for_port  # noqa: E402
from tests.orthanc import OrthancServer  # noqa: E402
from training.phantom import generate_case  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


def start_node(work: Path, port: int, orthanc: OrthancServer) -> tuple[subprocess.Popen[bytes], Path]:
    data = work / "node"
    config = work / "node.toml"
    config.write_text(
        f'[node]\nae_title = "PACSNODE"\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\n'
        f"http_port = {free_port()}\n[completion]\nstable_seconds = 30\nsweep_seconds = 0.5\n"
        # storescu sends each series in one association: its profile completes on release
        '[[completion.senders]]\ncalling_ae = "BENCH"\nmode = "release"\n'
        f'[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\n'
        f"port = {orthanc.dicom_port}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    log = (work / "node.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, data


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise TimeoutError(what)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacsnode-e2e-") as tmp:
        work = Path(tmp)
        node_port = free_port()
        orthanc = OrthancServer(work / "orthanc", modalities={"node": ("PACSNODE", "127.0.0.1", node_port)})
        orthanc.start()
        proc, data = start_node(work, node_port, orthanc)
        try:
            wait_for_port(node_port, proc=proc)
            log = work / "node.log"
            wait(lambda: "models_loaded" in log.read_text(errors="replace"), 300, "models to load")
            engine = sa.create_engine(f"sqlite:///{data / 'node.db'}")
            rows = []
            for run in range(args.runs):
                case = generate_case(90210 + run, 0, 1, work / f"case{run}", size=(args.size, args.size),
                                     slices=(args.slices, args.slices))
                series_dir = work / f"case{run}" / str(case["dicom_dir"])
                subprocess.run(["storescu", "-aet", "BENCH", "-aec", "PACSNODE", "+sd", "+r", "127.0.0.1",
                                str(node_port), str(series_dir)], check=True, env=ENV, capture_output=True)
                acked = time.monotonic()
                study = str(case["study_instance_uid"])

                def stored(study: str = study) -> bool:
                    found = orthanc.find("Series", {"StudyInstanceUID": study}, expand=True)
                    modalities = {s["MainDicomTags"].get("Modality") for s in found}
                    return {"SR", "SEG"} <= modalities

                wait(stored, 300, "SR and SEG at Orthanc")
                total = time.monotonic() - acked
                with engine.connect() as conn:
                    series = conn.execute(sa.text("select last_received_at, state_changed_at from series "
                                                  "where series_uid = :s"), {"s": case["series_instance_uid"]}).one()
                    job = conn.execute(sa.text("select queue_seconds, inference_seconds from jobs "
                                               "where series_uid = :s"), {"s": case["series_instance_uid"]}).one()
                completion = series.state_changed_at - series.last_received_at
                rest = total - completion - job.queue_seconds - job.inference_seconds
                rows.append((run + 1, completion, job.queue_seconds, job.inference_seconds, rest, total))
            engine.dispose()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            orthanc.stop()
    print(f"\n{args.slices}-slice {args.size}² phantom series, storescu → node → Orthanc "
          f"(seconds from last C-STORE acknowledged)\n")
    print("| run | completion wait | queue | inference (both models) | load+build+dispatch | total |")
    print("|---:|---:|---:|---:|---:|---:|")
    for run, completion, queue, inference, rest, total in rows:
        print(f"| {run} | {completion:.2f} | {queue:.2f} | {inference:.2f} | {rest:.2f} | {total:.2f} |")
    print(f"| median | | | | | {statistics.median(r[-1] for r in rows):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
