"""A real Orthanc as the test PACS: temporary storage, free ports, readiness by polling ``GET /system``, stop by PID.

`OrthancServer(workdir, ...)` writes a config like docs/peers.md's and can `start()`, `stop()` and `start()` again on the
same ports and storage (PACS-down tests). REST helpers: `find`, `instances_of_modality`, `get_file`,
`sop_instance_uids`, `clear`. With ``tls=OrthancTls(...)`` it speaks DICOM TLS on its DICOM port and/or HTTPS on
its HTTP port (the REST helpers then verify it against the same CA). `orthanc_factory` is a pytest fixture returning a factory; every server it made is stopped at
teardown. To use the fixture from a test module, register this module (``pytest_plugins = ["tests.orthanc"]`` in
the root conftest.py) or wrap `OrthancServer` in a local fixture. Orthanc 1.10 listens on all interfaces (no bind
address option); ``RemoteAccessAllowed: false`` keeps its HTTP API local.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, peer_env, require_tool, wait_for_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


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


class OrthancServer:
    """One Orthanc process (restartable) over one storage folder and one pair of ports.

    ``modalities`` maps a name to (AE title, host, port) for ``DicomModalities``; ``config`` entries override or
    extend the generated configuration (e.g. ``{"DicomCheckCalledAet": False}``).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        config: Mapping[str, Any] | None = None,
        executable: str | None = None,
        tls: OrthancTls | None = None,
    ) -> None:
        self.executable = executable or require_tool("Orthanc")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        storage = self.workdir / "db"
        settings: dict[str, Any] = {
            "Name": "TEST-PACS",
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
            "DicomModalities": {name: list(entry) for name, entry in (modalities or {}).items()},
        }
        if DICOMWEB_PLUGIN.exists():
            settings["Plugins"] = [str(DICOMWEB_PLUGIN)]
            settings["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}  # Host unset: keep ports in URLs
        self.tls = tls
        if tls is not None:
            settings.update(tls.settings(self.workdir))
        settings.update(config or {})
        self.settings = settings
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(settings, indent=2))
        self.log_path = self.workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None and self.tls.https else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None or not self.tls.https:
            return None
        return ssl.create_default_context(cafile=str(self.tls.ca))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def destination_toml(self, name: str = "orthanc") -> str:
        """This Orthanc as a node's DIMSE result destination, a ``[[destinations]]`` TOML table (put it last)."""
        return (f'[[destinations]]\nname = "{name}"\nkind = "dimse"\nae_title = "{self.aet}"\n'
                f'host = "127.0.0.1"\nport = {self.dicom_port}\n')

    def start(self, timeout: float = 60.0) -> OrthancServer:
        """Start Orthanc (``TCP_NODELAY=1``) and return once both its HTTP API and its DICOM port answer."""
        if self.running:
            raise RuntimeError("Orthanc is already running")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.executable, str(self.config_path)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=peer_env(),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                self.rest("GET", "/system", timeout=1.0)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"Orthanc's HTTP API did not answer within {timeout} s") from None
                time.sleep(0.05)
        wait_for_port(self.dicom_port, timeout=max(1.0, deadline - time.monotonic()), proc=self.proc)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Stop by PID: SIGTERM, wait (a graceful stop takes 2-3 s), SIGKILL if it will not go."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- REST -------------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 30.0) -> bytes:
        """Raw HTTP call to the REST API; ``body`` is JSON-encoded unless it is bytes."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout, context=self._ssl_context()) as response:
            payload: bytes = response.read()
            return payload

    def rest(self, method: str, path: str, body: Any = None, *, timeout: float = 30.0) -> Any:
        """JSON REST call; returns the decoded answer."""
        return json.loads(self.request(method, path, body, timeout=timeout) or b"null")

    def find(self, level: str, query: Mapping[str, str], *, expand: bool = True) -> list[Any]:
        """``POST /tools/find``: resources at ``level`` (Patient/Study/Series/Instance) matching ``query``."""
        answer = self.rest("POST", "/tools/find", {"Level": level, "Query": dict(query), "Expand": expand})
        assert isinstance(answer, list)
        return answer

    def instances_of_modality(self, modality: str) -> list[dict[str, Any]]:
        """Every stored instance whose series has ``modality`` (expanded: ID, MainDicomTags ...)."""
        return self.find("Instance", {"Modality": modality})

    def get_file(self, instance_id: str) -> bytes:
        """The stored Part 10 file of an instance."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def sop_instance_uids(self) -> list[str]:
        """The SOP Instance UID of every stored instance (one entry per stored instance, duplicates kept)."""
        instances = self.rest("GET", "/instances?expand")
        return [str(i["MainDicomTags"]["SOPInstanceUID"]) for i in instances]

    def clear(self) -> None:
        """Delete everything stored (between tests sharing one server)."""
        for patient in self.rest("GET", "/patients"):
            self.request("DELETE", f"/patients/{patient}")

    def statistics(self) -> dict[str, Any]:
        stats = self.rest("GET", "/statistics")
        assert isinstance(stats, dict)
        return stats


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """Factory fixture: ``orthanc_factory(**OrthancServer kwargs)`` returns a started server; all stop at teardown."""
    made: list[OrthancServer] = []

    def make(**kwargs: Any) -> OrthancServer:
        server = OrthancServer(tmp_path / f"orthanc-{len(made)}", **kwargs)
        made.append(server)
        return server.start()

    yield make
    for server in made:
        server.stop()
