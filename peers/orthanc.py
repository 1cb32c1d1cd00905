"""A real Orthanc as the PACS: temporary storage, free (or given) ports, readiness by ``GET /system``, stop by PID.

`OrthancServer(workdir, ...)` writes a config like docs/peers.md's and can `start()`, `stop()` and `start()` again
on the same ports and storage (PACS-down tests). REST helpers: `rest`, `find`, `instances_of_modality`, `get_file`,
`series_file`, `sop_instance_uids`, `series_by_study`, `push_studies`, `clear`, `statistics`. With
``tls=OrthancTls(...)`` it speaks DICOM TLS on its DICOM port and/or HTTPS on its HTTP port (the REST helpers then
verify it against the same CA). Orthanc 1.10 listens on all interfaces (no bind address option);
``RemoteAccessAllowed: false`` keeps its HTTP API local.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peers.process import (
    PeerError,
    PeerMissingError,
    PeerProcess,
    find_tool,
    free_port,
    peer_env,
    wait_for_port,
    wait_until,
)

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb
DICOMWEB_ROOT = "/dicom-web"  # where the plugin serves DICOMweb on Orthanc's HTTP port


@dataclass(frozen=True)
class OrthancTls:
    """Orthanc's own certificate and key (PEM) and the CA that signed it, which it also trusts for its peers'
    client certificates (Orthanc 1.9+: ``DicomTls*``; ``SslEnabled`` for HTTPS)."""

    certificate: Path
    private_key: Path
    ca: Path
    dicom: bool = True  # DICOM TLS on the DICOM port (then TLS only)
    https: bool = False  # HTTPS on the HTTP port
    client_certificate_required: bool = True  # DICOM TLS peers must present a certificate signed by ``ca``

    def settings(self, workdir: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.dicom:
            out.update(DicomTlsEnabled=True, DicomTlsCertificate=str(self.certificate),
                       DicomTlsPrivateKey=str(self.private_key), DicomTlsTrustedCertificates=str(self.ca),
                       DicomTlsRemoteCertificateRequired=self.client_certificate_required)
        if self.https:
            combined = workdir / "https.pem"  # Orthanc wants the key and the certificate in one file
            combined.write_bytes(self.private_key.read_bytes() + self.certificate.read_bytes())
            out.update(SslEnabled=True, SslCertificate=str(combined))
        return out


class OrthancServer(PeerProcess):
    """One Orthanc process (restartable) over one storage folder and one pair of ports.

    ``dicom_port``/``http_port`` 0 pick free ports. ``modalities`` maps a name to (AE title, host, port) for
    ``DicomModalities``. ``dicomweb``: None turns the DICOMweb plugin on when it is installed, True requires it
    (`PeerMissingError` otherwise), False leaves it off. ``config`` entries override or extend the generated
    configuration (e.g. ``{"DicomCheckCalledAet": False}``). A missing ``Orthanc`` raises `PeerMissingError`.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        name: str = "TEST-PACS",
        dicom_port: int = 0,
        http_port: int = 0,
        modalities: Mapping[str, Sequence[Any]] | None = None,
        config: Mapping[str, Any] | None = None,
        executable: str | None = None,
        tls: OrthancTls | None = None,
        dicomweb: bool | None = None,
    ) -> None:
        self.executable = executable or find_tool("Orthanc")
        if dicomweb and not DICOMWEB_PLUGIN.exists():
            raise PeerMissingError(f"Orthanc's DICOMweb plugin is missing ({DICOMWEB_PLUGIN}: apt-get install orthanc-dicomweb)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        storage = self.workdir / "db"
        settings: dict[str, Any] = {
            "Name": name,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {key: list(entry) for key, entry in (modalities or {}).items()},
        }
        if dicomweb or (dicomweb is None and DICOMWEB_PLUGIN.exists()):
            settings["Plugins"] = [str(DICOMWEB_PLUGIN)]
            # Host unset: the URLs it returns follow the request's Host (and keep their port)
            settings["DicomWeb"] = {"Enable": True, "Root": DICOMWEB_ROOT + "/"}
        else:
            settings["Plugins"] = []
        self.tls = tls
        if tls is not None:
            settings.update(tls.settings(self.workdir))
        settings.update(config or {})
        self.settings = settings
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(settings, indent=2))
        self.log_path = self.workdir / "orthanc.log"
        self.proc = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None and self.tls.https else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None or not self.tls.https:
            return None
        return ssl.create_default_context(cafile=str(self.tls.ca))

    def destination_toml(self, name: str = "orthanc") -> str:
        """This Orthanc as a node's DIMSE result destination, a ``[[destinations]]`` TOML table (put it last)."""
        return (f'[[destinations]]\nname = "{name}"\nkind = "dimse"\nae_title = "{self.aet}"\n'
                f'host = "127.0.0.1"\nport = {self.dicom_port}\n')

    def start(self, timeout: float = 60.0) -> OrthancServer:
        """Start Orthanc (``TCP_NODELAY=1``) and return once both its HTTP API and its DICOM port answer; raises
        `PeerError` (stopping it) when it exits or does not answer within ``timeout`` seconds."""
        proc = self._spawn([self.executable, str(self.config_path)], cwd=self.workdir, env=peer_env())
        deadline = time.monotonic() + timeout

        def ready() -> None:
            wait_until(self._answers, timeout, f"Orthanc's HTTP API on port {self.http_port}", self.log_tail,
                       process=proc)
            wait_for_port(self.dicom_port, max(1.0, deadline - time.monotonic()), proc, "Orthanc's DICOM port",
                          self.log_tail)

        self._ready_or_stop(ready)
        return self

    def _answers(self) -> bool:
        try:
            self.request("GET", "/system", timeout=1.0)
        except PeerError:
            return False
        return True

    # -- REST -------------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 30.0) -> bytes:
        """Raw HTTP call to the REST API; ``body`` is JSON-encoded unless it is bytes. Raises `PeerError`."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl_context()) as response:
                payload: bytes = response.read()
                return payload
        except urllib.error.HTTPError as exc:
            raise PeerError(f"Orthanc {method} {path}: HTTP {exc.code} {exc.read()[:500]!r}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise PeerError(f"Orthanc {method} {path}: {exc}") from exc

    def rest(self, method: str, path: str, body: Any = None, *, timeout: float = 30.0) -> Any:
        """JSON REST call; returns the decoded answer."""
        return json.loads(self.request(method, path, body, timeout=timeout) or b"null")

    def find(self, level: str, query: Mapping[str, str], *, expand: bool = True) -> list[Any]:
        """``POST /tools/find``: resources at ``level`` (Patient/Study/Series/Instance) matching ``query``."""
        answer = self.rest("POST", "/tools/find", {"Level": level, "Query": dict(query), "Expand": expand})
        if not isinstance(answer, list):
            raise PeerError(f"Orthanc /tools/find answered {answer!r}")
        return answer

    def instances_of_modality(self, modality: str) -> list[dict[str, Any]]:
        """Every stored instance whose series has ``modality`` (expanded: ID, MainDicomTags ...)."""
        return self.find("Instance", {"Modality": modality})

    def get_file(self, instance_id: str) -> bytes:
        """The stored Part 10 file of an instance."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def series_file(self, series_uid: str) -> bytes:
        """The Part 10 file of the first instance of a series (SR, SEG: one instance each)."""
        found = self.find("Instance", {"SeriesInstanceUID": series_uid}, expand=False)
        if not found:
            raise PeerError(f"series {series_uid} is not in Orthanc")
        return self.get_file(str(found[0]))

    def sop_instance_uids(self) -> list[str]:
        """The SOP Instance UID of every stored instance (one entry per stored instance, duplicates kept)."""
        instances = self.rest("GET", "/instances?expand")
        return [str(i["MainDicomTags"]["SOPInstanceUID"]) for i in instances]

    def series_by_study(self) -> dict[str, dict[str, list[str]]]:
        """{StudyInstanceUID: {Modality: [SeriesInstanceUID, ...]}} of everything stored."""
        studies = {s["ID"]: s["MainDicomTags"].get("StudyInstanceUID") for s in self.rest("GET", "/studies?expand")}
        out: dict[str, dict[str, list[str]]] = {}
        for series in self.rest("GET", "/series?expand"):
            study = studies.get(series.get("ParentStudy"))
            tags = series.get("MainDicomTags", {})
            if study and "SeriesInstanceUID" in tags:
                out.setdefault(study, {}).setdefault(tags.get("Modality", ""), []).append(tags["SeriesInstanceUID"])
        return out

    def push_studies(self, study_uids: Sequence[str], modality: str, timeout: float = 300.0) -> None:
        """C-STORE the studies to the ``DicomModalities`` entry ``modality`` (Orthanc as the SCU; synchronous)."""
        ids = []
        for uid in study_uids:
            found = [r["ID"] for r in self.rest("POST", "/tools/lookup", uid.encode()) if r.get("Type") == "Study"]
            if not found:
                raise PeerError(f"study {uid} is not in Orthanc")
            ids.extend(found)
        self.rest("POST", f"/modalities/{modality}/store", {"Resources": ids, "Synchronous": True}, timeout=timeout)

    def clear(self) -> None:
        """Delete everything stored (between tests sharing one server)."""
        for patient in self.rest("GET", "/patients"):
            self.request("DELETE", f"/patients/{patient}")

    def statistics(self) -> dict[str, Any]:
        stats = self.rest("GET", "/statistics")
        if not isinstance(stats, dict):
            raise PeerError(f"Orthanc /statistics answered {stats!r}")
        return stats
