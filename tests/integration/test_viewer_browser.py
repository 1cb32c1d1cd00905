"""The AI results in a real viewer: `pacsnode demo` (Orthanc + node + OHIF 3.13.2 behind the same-origin viewer
server) processes one clear pneumonia and one normal phantom; Debian's headless chromium, driven by playwright-core
(demo/viewer-check.mjs), then checks what a person would see: the study list lists both studies with CT, SEG and
SR; on the slice the SR outlines, the CT alone has no lesion-coloured pixels and the CT with the SEG loaded has
many; the SR viewport draws the lesion outline with its area; the normal phantom's slices show the lung overlay
and no lesion. Screenshots land in the test's tmp dir (``PACSNODE_UPDATE_DOCS=1`` copies the SEG and SR views to
docs/viewer-seg.png and docs/viewer-sr.png). Ctrl-C (SIGINT) stops the demo and everything it started.

The lesion checks need trained weights (the shipped ones, or ``PACSNODE_TEST_WEIGHTS_DIR``); without any weights
the test skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peers.orthanc import DICOMWEB_PLUGIN
from tests.conftest import REPO, TEST_WEIGHTS_DIR, missing_peer, require_tool, require_weights, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.browser]

DEMO = REPO / "demo"
MIN_LESION_PIXELS = 500  # canvas pixels; a clear phantom lesion covers thousands at 1280x800


def _require_file(path: Path, package: str) -> None:
    if not path.exists():
        missing_peer(f"{path} is missing (apt-get install {package})")


def _playwright_core() -> None:
    """Install demo/'s pinned playwright-core (npm ci, lockfile) unless it is there at the pinned version."""
    npm = require_tool("npm")
    pinned = json.loads((DEMO / "package.json").read_text())["dependencies"]["playwright-core"]
    installed = DEMO / "node_modules" / "playwright-core" / "package.json"
    if installed.exists() and json.loads(installed.read_text())["version"] == pinned:
        return
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=DEMO, check=True, capture_output=True, timeout=300)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    """Ctrl-C as a person would; a second one forces (the demo then SIGKILLs what it started)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            return proc.wait(timeout=30)
    return proc.returncode


def _plan(summary: dict[str, Any], out: Path) -> dict[str, Any]:
    studies = [
        {
            "name": s["label"], "label": s["label"], "caseId": s["case_id"], "studyUid": s["study_uid"],
            "ctSeriesUid": s["series_uid"], "segSeriesUid": s["seg_series_uid"], "srSeriesUid": s["sr_series_uid"],
            "outlineSopUid": s["outline_sop_uid"],
        }
        for s in summary["studies"]
    ]
    return {"baseUrl": summary["viewer"].rstrip("/"), "outDir": str(out), "timeoutMs": 60000, "studies": studies}


def _problems(results: dict[str, Any]) -> list[str]:
    """Everything the viewer showed wrong, so one run reports all of it."""
    problems = [f"browser: {e}" for e in results["errors"]]
    for name in ("pneumonia", "normal"):
        row = results["studyList"].get(name, "")
        shown = {m for group in re.findall(r"[A-Z]{2,3}(?:\\[A-Z]{2,3})+", row) for m in group.split("\\")}
        if not {"CT", "SEG", "SR", "KO"} <= shown:  # KO: the key-images note
            problems.append(f"study list row of the {name} study lacks CT, KO, SEG and SR: {row!r}")
    pneumonia = results["studies"].get("pneumonia", {})
    normal = results["studies"].get("normal", {})
    for name, study in (("pneumonia", pneumonia), ("normal", normal)):
        if not {"Lungs", "Lesion"} <= set(study.get("segments", [])):
            problems.append(f"{name}: OHIF did not load the SEG's Lungs and Lesion segments: {study.get('segments')}")
    ct, seg = pneumonia.get("ctOnly", {}), pneumonia.get("withSeg", {})
    if ct.get("timedOut", True) or ct.get("red") != 0:
        problems.append(f"pneumonia, CT alone on the outlined slice: expected a rendered image without lesion colour: {ct}")
    if seg.get("timedOut", True) or seg.get("red", 0) < MIN_LESION_PIXELS:
        problems.append(f"pneumonia, SEG loaded on the outlined slice: expected >= {MIN_LESION_PIXELS} lesion pixels "
                        f"beside the lung overlay: {seg}")
    outline = pneumonia.get("srOutline", {})
    text = outline.get("text", "")
    if outline.get("points", 0) < 4 or "Pneumonia lesion area:" not in text or "363698007" in text:
        problems.append(f"pneumonia, SR viewport: expected the lesion outline with its area: {outline}")
    for sample in normal.get("samples", []) or [{"timedOut": True}]:
        if sample.get("timedOut", True) or sample.get("red") != 0:
            problems.append(f"normal, SEG loaded: expected the lung overlay and no lesion colour: {sample}")
    return problems


def test_ohif_shows_the_seg_overlay_and_sr_outline_of_a_pneumonia_phantom_and_none_on_a_normal_one(tmp_path):
    require_weights()
    require_tool("Orthanc")
    _require_file(DICOMWEB_PLUGIN, "orthanc-dicomweb")
    chromium = require_tool("chromium")
    node = require_tool("node")
    _playwright_core()

    summary_path, log = tmp_path / "summary.json", tmp_path / "demo.log"
    command = [sys.executable, "-m", "demo", "--pneumonia", "1", "--normal", "1", "--workdir",
               str(tmp_path / "demo"), "--summary", str(summary_path)]
    if TEST_WEIGHTS_DIR:
        command += ["--weights-dir", TEST_WEIGHTS_DIR]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        wait_until(summary_path.exists, 240, "pacsnode demo's summary", lambda: log.read_text()[-3000:], process=proc)
        summary = json.loads(summary_path.read_text())
        assert [s["label"] for s in summary["studies"]] == ["pneumonia", "normal"]
        plan_path = tmp_path / "plan.json"
        plan_path.write_text(json.dumps(_plan(summary, tmp_path / "viewer")))
        run = subprocess.run([node, str(DEMO / "viewer-check.mjs"), str(plan_path)], cwd=DEMO,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "CHROMIUM": chromium})
        results_path = tmp_path / "viewer" / "results.json"
        assert results_path.exists(), f"viewer-check.mjs wrote no results ({run.returncode}):\n{run.stderr[-3000:]}"
        results = json.loads(results_path.read_text())
    finally:
        status = _stop(proc)
    assert status == 0, f"pacsnode demo did not stop cleanly on Ctrl-C ({status}):\n{log.read_text()[-3000:]}"

    if os.environ.get("PACSNODE_UPDATE_DOCS") == "1":
        pneumonia = results["studies"].get("pneumonia", {})
        for view, name in (("withSeg", "viewer-seg.png"), ("srOutline", "viewer-sr.png")):
            if pneumonia.get(view, {}).get("screenshot"):
                shutil.copyfile(pneumonia[view]["screenshot"], REPO / "docs" / name)
    problems = _problems(results)
    assert not problems, "\n".join(problems) + f"\n(screenshots and results.json in {tmp_path / 'viewer'})"


def test_viewer_server_isolation_headers_proxy_host_and_page_routes(tmp_path):
    """The same-origin server alone (no browser, Orthanc faked by an httpx transport): COOP/COEP on every answer,
    DICOMweb proxied with the browser's Host kept and the body streamed back as is, 502 when Orthanc is down,
    index.html for page routes, 404 for missing assets, nothing served from outside the build."""
    import warnings

    import httpx

    with warnings.catch_warnings():
        # starlette 1.x prefers the httpx2 package for its TestClient; httpx still works and is what we install.
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
        from starlette.testclient import TestClient

    from demo.viewer import app_config_js, create_viewer_app

    class Streamed(httpx.AsyncByteStream):  # as a real transport answers: not read yet
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def __aiter__(self):  # type: ignore[override]
            yield self.data

    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html>ohif</html>")
    (dist / "app.bundle.js").write_text("console.log(1)")
    (tmp_path / "secret.txt").write_text("secret")
    seen: list[httpx.Request] = []

    def orthanc(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/wado":
            raise httpx.ConnectError("down", request=request)
        return httpx.Response(200, stream=Streamed(b"--b\r\n" + request.content + b"--b--"),
                              headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})

    app = create_viewer_app(dist, "http://orthanc:8042", app_config_js(), transport=httpx.MockTransport(orthanc))
    with TestClient(app, base_url="http://127.0.0.1:3000") as client:
        page = client.get("/viewer?StudyInstanceUIDs=1.2.3")
        assert page.status_code == 200 and page.text == "<html>ohif</html>"
        assert page.headers["cross-origin-opener-policy"] == "same-origin"
        assert page.headers["cross-origin-embedder-policy"] == "require-corp"
        config = client.get("/app-config.js")
        assert "qidoRoot: origin + '/dicom-web'" in config.text and "wadoUriRoot: origin + '/wado'" in config.text
        assert client.get("/app.bundle.js").text == "console.log(1)"
        assert client.get("/missing.bundle.js").status_code == 404
        assert "secret" not in client.get("/../secret.txt").text
        assert "secret" not in client.get("/%2e%2e/secret.txt").text

        stored = client.post("/dicom-web/studies?x=1", content=b"DICM", headers={"Host": "viewer.local:3000"})
        assert stored.status_code == 200 and stored.content == b"--b\r\nDICM--b--"
        assert stored.headers["content-type"].startswith("multipart/related")
        assert stored.headers["cross-origin-embedder-policy"] == "require-corp"
        assert seen[-1].headers["host"] == "viewer.local:3000"  # Orthanc builds bulk-data URLs from it
        assert (seen[-1].url.path, seen[-1].url.query) == ("/dicom-web/studies", b"x=1")
        assert client.get("/wado?requestType=WADO").status_code == 502
        sent = len(seen)
        for escape in ("/dicom-web/..%2ftools/shutdown", "/dicom-web/..%2Fsystem", "/dicom-web/%2e%2e/instances",
                       "/dicom-web/..%5Cinstances", "/dicom-web/..%252ftools%252fshutdown", "/dicom-web/..%255csystem"):
            assert client.post(escape, content=b"").status_code == 404, escape
        assert len(seen) == sent  # none of them reached Orthanc's REST API (found by review)
