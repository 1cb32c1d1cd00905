"""Review of the DICOMweb read side: QIDO-RS over the real uvicorn server (httpx and dicomweb-client as clients), on
SQLite and a real PostgreSQL, with hostile query parameters, PS3.4 matching rules and the audit record of each
query. The node serves no WADO-RS: its retrieve URLs answer 404/405 and are neither served nor a 500."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from dicomweb_client.api import DICOMwebClient

from node.audit import AuditTrail, Outcome, read_records
from node.config import NodeConfig
from node.db import create_engine_for, init_schema
from node.dicomweb import create_app
from node.http import HealthProbe, HttpServer
from node.index import Index
from node.ingest import Ingestor
from node.metrics import Metrics
from node.schema import series
from node.spool import Spool
from tests.conftest import free_port

STUDIES = {"1.2.3.1": "CT", "1.2.3.2": "MR", "1.2.3.3": "CT"}  # study UID -> the modality of its one series


class Served:
    """The node's HTTP app on a real uvicorn server over ``db_url``, with its audit trail, holding `STUDIES`."""

    def __init__(self, tmp_path: Path, db_url: str, audit: dict[str, Any] | None = None) -> None:
        self.config = NodeConfig.model_validate({
            "node": {"data_dir": str(tmp_path / "data"), "host": "127.0.0.1", "http_port": free_port()},
            "database": {"url": db_url}, "audit": audit or {},
        })
        self.engine = create_engine_for(self.config.database_url)
        init_schema(self.engine)
        spool, index = Spool(self.config.node.spool_dir), Index(self.engine)
        ready = threading.Event()
        ready.set()
        self.audit = AuditTrail(self.config.audit, self.config.node.data_dir, ae_title="PACSNODE")
        app = create_app(self.config, Ingestor(spool, index), index, health=HealthProbe(self.engine, spool.root,
                         ready.is_set), metrics=Metrics(), token=None, audit=self.audit)
        with self.engine.begin() as conn:
            conn.execute(sa.insert(series), [
                dict(series_uid=f"{study}.1", study_uid=study, modality=modality, state="complete", instance_count=2,
                     first_received_at=0, last_received_at=0, state_changed_at=0)
                for study, modality in STUDIES.items()])
        self.http = HttpServer(self.config, app)
        self.http.start()
        self.base = f"http://127.0.0.1:{self.http.port}/dicomweb"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base + path, timeout=10)

    def records(self) -> list[dict[str, Any]]:
        return list(read_records(AuditTrail.file_for(self.config.audit, self.config.node.data_dir)))

    def queries(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["event"] == "query"]

    def close(self) -> None:
        self.http.stop()
        self.audit.close()
        self.engine.dispose()


@pytest.fixture
def served(tmp_path: Path, db_url: str) -> Iterator[Served]:
    s = Served(tmp_path, db_url)
    yield s
    s.close()


def study_uids(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return sorted(d["0020000D"]["Value"][0] for d in r.json())


def test_a_control_character_in_a_matching_value_is_a_400_not_a_database_outage(served: Served) -> None:
    """A NUL in a Modality value: PostgreSQL refuses the string (DataError), and the node answered 503 "the index
    database is unavailable", logged ``qido_index_unavailable`` at error level and audited a serious failure — a
    client's typo read as a database outage. It is a malformed request: 400 naming the parameter, the value not
    echoed, audited as a minor failure, on both backends alike."""
    for path, name in (("/studies?ModalitiesInStudy=C%00T", "ModalitiesInStudy"),
                       ("/studies/1.2.3.1/series?Modality=%00", "Modality"),
                       ("/studies?ModalitiesInStudy=CT%0D%0AX-Evil:1", "ModalitiesInStudy")):
        r = served.get(path)
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert name in r.json()["error"] and "\x00" not in r.text and "Evil" not in r.text
    outcomes = [int(q["EventIdentification"]["EventOutcomeIndicator"]) for q in served.queries()]
    assert outcomes == [Outcome.MINOR_FAILURE] * 3


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_hostile_parameters_get_a_400_naming_them_or_a_correct_answer(served: Served) -> None:
    """Checked sound (no fix): bad dates and unsupported keys are ignored and named in a Warning, UID wildcards and
    bad limits are 400 naming the parameter, SQL-like and non-ASCII values match nothing, UID lists work with
    commas, backslashes and repeated keys, tags work in either case."""
    for q in ("StudyDate=20261301", "StudyDate=2026-", "PatientName=M%C3%BCller*", "fuzzymatching=true&PatientName=x"):
        r = served.get(f"/studies?{q}")
        assert study_uids(r) == sorted(STUDIES) and "ignored" in r.headers["warning"]
    for q, name in (("StudyInstanceUID=*", "StudyInstanceUID"), ("StudyInstanceUID=1.2.3.?", "StudyInstanceUID"),
                    ("limit=-1", "limit"), ("offset=99999999999", "offset"), ("limit=1e3", "limit")):
        r = served.get(f"/studies?{q}")
        assert r.status_code == 400 and name in r.json()["error"], (q, r.text)
    for q in ("ModalitiesInStudy=CT%27%20OR%201=1--", "ModalitiesInStudy=%C3%A9", "ModalitiesInStudy=ct"):
        assert study_uids(served.get(f"/studies?{q}")) == []
    for q in ("StudyInstanceUID=1.2.3.1,1.2.3.2", "StudyInstanceUID=1.2.3.1%5C1.2.3.2",
              "StudyInstanceUID=1.2.3.1&StudyInstanceUID=1.2.3.2", "0020000d=1.2.3.1,1.2.3.2"):
        assert study_uids(served.get(f"/studies?{q}")) == ["1.2.3.1", "1.2.3.2"]
    assert study_uids(served.get("/studies?includefield=all&StudyInstanceUID=")) == sorted(STUDIES)
    for path in ("/studies/1.2.3.1", "/studies/1.2.3.1/series/1.2.3.1.1", "/studies/1.2.3.1/metadata",
                 "/studies/1.2.3.1/series/1.2.3.1.1/instances/1.2/frames/1", "/studies/9.9/series"):
        assert served.get(path).status_code in (200, 404, 405), path  # no WADO-RS here; never a 500


def test_wildcards_in_a_modality_match_as_ps3_4_says(served: Served) -> None:
    """PS3.4 C.2.2.2.4: in a CS value such as Modality and ModalitiesInStudy, "*" matches any run of characters and
    "?" any one ("*" alone is universal matching), case-sensitively. The node compared them literally, so a viewer's
    "ModalitiesInStudy=*" or "Modality=C?" found nothing. SQL's own wildcards are literals here."""
    client = DICOMwebClient(url=served.base)

    def found(filters: dict[str, str]) -> list[str]:
        return sorted(d["0020000D"]["Value"][0] for d in client.search_for_studies(search_filters=filters))

    assert found({"ModalitiesInStudy": "*"}) == sorted(STUDIES)
    assert found({"ModalitiesInStudy": "C*"}) == found({"ModalitiesInStudy": "C?"}) == ["1.2.3.1", "1.2.3.3"]
    assert found({"ModalitiesInStudy": "?R,CT"}) == sorted(STUDIES)
    assert found({"ModalitiesInStudy": "c*"}) == found({"ModalitiesInStudy": "C_"}) == found({"ModalitiesInStudy": "%"}) == []
    series = client.search_for_series("1.2.3.1", search_filters={"Modality": "?T"})
    assert [d["0020000E"]["Value"][0] for d in series] == ["1.2.3.1.1"]
    assert client.search_for_series("1.2.3.1", search_filters={"Modality": "M*"}) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_media_type_the_node_cannot_give_is_406(served: Served) -> None:
    """PS3.18 8.2.1 / RFC 9110 12.5.1: QIDO-RS answers DICOM JSON only; a client that accepts only XML
    (``application/dicom+xml`` or its multipart form) or ``text/html`` was sent JSON with 200 and then failed to parse
    it. Now 406, the header not echoed and the refusal audited; any Accept that admits JSON (wildcards, ``q``) or none
    at all is answered as before."""
    for accept in ("application/dicom+xml", 'multipart/related; type="application/dicom+xml"', "text/html",
                   "application/dicom+json;q=0, application/dicom+xml"):
        r = httpx.get(served.base + "/studies", headers={"Accept": accept}, timeout=10)
        assert r.status_code == 406 and "Accept" in r.json()["error"] and "xml" not in r.text, (accept, r.text)
        r = httpx.get(served.base + "/studies/1.2.3.1/series", headers={"Accept": accept}, timeout=10)
        assert r.status_code == 406, accept
    for accept in ("application/dicom+json", "application/json", "*/*", "application/*", "",
                   "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
                   "application/dicom+xml, application/dicom+json;q=0.5", "APPLICATION/DICOM+JSON; charset=utf-8",
                   "application/dicom+json;q=x"):
        r = httpx.get(served.base + "/studies", headers={"Accept": accept}, timeout=10)
        assert (r.status_code, r.headers["content-type"]) == (200, "application/dicom+json"), accept
    outcomes = [int(q["EventIdentification"]["EventOutcomeIndicator"]) for q in served.queries()]
    assert outcomes == [Outcome.MINOR_FAILURE] * 8 + [Outcome.SUCCESS] * 9
