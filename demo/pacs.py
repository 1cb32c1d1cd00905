"""Orthanc as the demo's PACS: one process over a temporary storage folder, stopped by PID."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from demo.common import (
    DICOMWEB_PATH,
    DICOMWEB_PLUGIN,
    ORTHANC_AET,
    DemoError,
    peer_env,
    stop_process,
    wait_for_port,
)


class Orthanc:
    """One Orthanc process over a temporary storage folder: DICOM and HTTP on the given ports, DICOMweb plugin on,
    HTTP for local clients, DICOM for the listed modalities from their hosts only. `start()` returns once
    ``GET /system`` and the DICOM port answer."""

    def __init__(self, workdir: Path, *, dicom_port: int, http_port: int, modalities: Mapping[str, Sequence[Any]]) -> None:
        exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
        if exe is None:
            raise DemoError("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb, or make sysdeps)")
        if not DICOMWEB_PLUGIN.exists():
            raise DemoError(f"Orthanc's DICOMweb plugin is missing ({DICOMWEB_PLUGIN}: apt-get install orthanc-dicomweb)")
        self.executable = exe
        self.workdir = workdir
        self.dicom_port, self.http_port = dicom_port, http_port
        workdir.mkdir(parents=True, exist_ok=True)
        settings = {
            "Name": "PACSNODE-DEMO", "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
            "DicomServerEnabled": True, "DicomAet": ORTHANC_AET, "DicomPort": dicom_port, "DicomCheckCalledAet": True,
            # Orthanc 1.10 cannot bind to loopback: local clients only for HTTP, and for DICOM only the modalities
            # listed here, from their own host.
            "HttpServerEnabled": True, "HttpPort": http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {name: list(entry) for name, entry in modalities.items()},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": DICOMWEB_PATH + "/"},  # Host unset: URLs follow the request's Host
        }
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(settings, indent=2))
        self.log_path = workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> None:
        import httpx

        with self.log_path.open("ab") as log:
            # own session: a terminal's Ctrl-C reaches only the demo, which stops the pieces in order
            self.proc = subprocess.Popen([self.executable, str(self.config_path)], cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT, env=peer_env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise DemoError(f"Orthanc exited with {self.proc.returncode}; see {self.log_path}")
            try:
                httpx.get(self.url + "/system", timeout=1.0).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise DemoError(f"Orthanc's HTTP API did not answer within {timeout:.0f} s") from None
                time.sleep(0.1)
        wait_for_port(self.dicom_port, deadline, self.proc, "Orthanc")

    def stop(self, timeout: float = 20.0) -> None:
        stop_process(self.proc, timeout)

    def rest(self, path: str) -> Any:
        import httpx

        try:
            response = httpx.get(self.url + path, timeout=30.0)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise DemoError(f"Orthanc GET {path}: {exc}") from exc
        return response.json()

    def file(self, series_uid: str) -> bytes:
        """The Part 10 file of the first instance of a series (SR, SEG: one instance each)."""
        import httpx

        found = self._post("/tools/find", {"Level": "Instance", "Query": {"SeriesInstanceUID": series_uid}})
        if not found:
            raise DemoError(f"series {series_uid} is not in Orthanc")
        return httpx.get(f"{self.url}/instances/{found[0]}/file", timeout=30.0).content

    def _post(self, path: str, body: Any) -> Any:
        import httpx

        try:
            content = body if isinstance(body, str) else json.dumps(body)
            response = httpx.post(self.url + path, content=content, timeout=300.0)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise DemoError(f"Orthanc POST {path}: {exc}") from exc
        return response.json()

    def push_studies(self, study_uids: Sequence[str], modality: str) -> None:
        """C-STORE the studies to the ``DicomModalities`` entry ``modality`` (Orthanc as the SCU; synchronous)."""
        ids = []
        for uid in study_uids:
            found = [r["ID"] for r in self._post("/tools/lookup", uid) if r.get("Type") == "Study"]
            if not found:
                raise DemoError(f"study {uid} is not in Orthanc")
            ids.extend(found)
        self._post(f"/modalities/{modality}/store", {"Resources": ids, "Synchronous": True})

    def series_by_study(self) -> dict[str, dict[str, list[str]]]:
        """{StudyInstanceUID: {Modality: [SeriesInstanceUID, ...]}} of everything stored."""
        studies = {s["ID"]: s["MainDicomTags"].get("StudyInstanceUID") for s in self.rest("/studies?expand")}
        out: dict[str, dict[str, list[str]]] = {}
        for series in self.rest("/series?expand"):
            study = studies.get(series.get("ParentStudy"))
            tags = series.get("MainDicomTags", {})
            if study and "SeriesInstanceUID" in tags:
                out.setdefault(study, {}).setdefault(tags.get("Modality", ""), []).append(tags["SeriesInstanceUID"])
        return out

