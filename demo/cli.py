"""`pacsnode demo` (and ``python -m demo``): the command line of the demo."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from demo.common import (
    DemoError,
)
from demo.runner import Demo, DemoSettings, StudyResult, make_phantoms

DESCRIPTION = ("Start Orthanc, the node and the OHIF viewer on loopback, send synthetic phantom CT studies through "
               "the node and print the viewer URL of each study with its AI results. Ctrl-C stops everything. "
               "Not for clinical use.")


def register(subparsers: Any) -> None:
    """Add ``demo`` to an argparse subparsers object (``args.func`` runs it and returns the exit code)."""
    p = subparsers.add_parser("demo", help="Orthanc + node + OHIF viewer on loopback, fed with phantom studies",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, help="keep Orthanc's storage, the node's data and logs here "
                   "(default: a temporary folder removed on exit)")
    p.add_argument("--viewer-port", type=int, default=0, help="viewer HTTP port (default: a free port)")
    p.add_argument("--orthanc-http-port", type=int, default=0, help="Orthanc HTTP port (default: a free port)")
    p.add_argument("--orthanc-dicom-port", type=int, default=0, help="Orthanc DICOM port (default: a free port)")
    p.add_argument("--node-port", type=int, default=0, help="the node's DICOM port (default: a free port)")
    p.add_argument("--weights-dir", type=Path, help="model weights folder (<name>/<version>/; default: shipped)")
    p.add_argument("--pneumonia", type=int, default=2, help="pneumonia phantom studies (default 2)")
    p.add_argument("--normal", type=int, default=1, help="normal phantom studies (default 1)")
    p.add_argument("--size", type=int, default=256, help="phantom matrix size (default 256)")
    p.add_argument("--slices", type=int, default=48, help="slices per phantom series (default 48)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the results (default 300)")
    p.add_argument("--summary", type=Path, help="also write the studies, results and URLs to this JSON file")


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C/SIGTERM. Exit 0 after a clean stop, 1 when a piece failed, 130 when forced."""
    if args.pneumonia < 0 or args.normal < 0 or args.pneumonia + args.normal == 0:
        print("pacsnode demo: --pneumonia and --normal must be >= 0 and not both 0", file=sys.stderr)
        return 2
    keep = args.workdir is not None
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="pacsnode-demo-"))).resolve()
    settings = DemoSettings(workdir=workdir, viewer_port=args.viewer_port, orthanc_http_port=args.orthanc_http_port,
                            orthanc_dicom_port=args.orthanc_dicom_port, node_port=args.node_port,
                            weights_dir=args.weights_dir)
    demo = Demo(settings)
    # Both signals stop the demo the same way; SIGINT explicitly too, as a background job may inherit it ignored.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    t0 = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - t0:5.1f}s] {message}", flush=True)

    status = 0
    try:
        say(f"pacsnode demo: working in {workdir}{'' if keep else ' (removed on exit)'}")
        demo.start(log=say)
        phantoms = make_phantoms(workdir / "phantoms", pneumonia=args.pneumonia, normal=args.normal,
                                 size=args.size, slices=args.slices)
        sender = demo.send_phantoms(phantoms)
        say(f"sent {len(phantoms)} phantom series ({args.slices} slices, {args.size} px) to Orthanc with {sender}, "
            "routed to the node; waiting for its SR + SEG at Orthanc ...")

        def announce(r: StudyResult) -> None:
            p = "" if r.sr.probability is None else f", p={r.sr.probability:.2f}"
            say(f"{r.phantom.case_id} ({r.phantom.label} phantom): AI says pneumonia {r.sr.finding or '?'}{p}")

        results = demo.wait_for_results(phantoms, timeout=args.timeout, on_result=announce)
        if args.summary:
            summary = {"viewer": demo.viewer_url + "/", "orthanc": demo.orthanc.url if demo.orthanc else None,
                       "workdir": str(workdir), "studies": [r.as_dict() for r in results]}
            tmp = args.summary.with_name(args.summary.name + ".tmp")
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, args.summary)
        print(f"\nReady in {time.monotonic() - t0:.0f} s. Study list: {demo.viewer_url}/", flush=True)
        for r in results:
            print(f"  {r.phantom.case_id} {r.phantom.label:9s} AI: pneumonia {r.sr.finding or '?'}\n    {r.viewer_url}",
                  flush=True)
        print("Synthetic phantoms, research models: not for clinical use. Ctrl-C to stop.", flush=True)
        while True:  # until Ctrl-C or SIGTERM
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except DemoError as exc:
        print(f"pacsnode demo: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:

        def force(_signum: int, _frame: FrameType | None) -> None:
            demo.kill()
            os._exit(130)

        signal.signal(signal.SIGINT, force)
        signal.signal(signal.SIGTERM, force)
        print("stopping (Ctrl-C again to force) ...", file=sys.stderr, flush=True)
        demo.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        print("stopped", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
