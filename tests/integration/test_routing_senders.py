"""Routing and senders with real peers: DCMTK storescu and Orthanc send series to the node (a subprocess running
the shipped models), and a real Orthanc plays the PACS that receives the results.

What each test shows, all checked at Orthanc through its REST API:
  * storescu sending a chest series in one association, one association per image, or in three batches a few
    seconds apart gives exactly one result version (one SR series, one SEG series, no KOS) under the quiet timer;
  * Orthanc pushing a stored series (``/modalities/node/store``) gives exactly one result version;
  * the node's own SR and SEG sent back to it make nothing new: their series end ``ignored`` by ``[own-result]``;
  * an Orthanc that forwards everything it stores to the node (Lua ``OnStoredInstance`` → ``SendToModality``) while
    receiving the node's results reaches a fixed point: its instance count stops growing;
  * a head CT makes no object at all; a chest series without date attributes gets its SR; one without a
    FrameOfReferenceUID gets one coded "not processed" SR (SKIP-GEOMETRY);
  * a late instance after completion gives v2 SR/SEG with new series numbers and one IOCM rejection KOS that
    references exactly the v1 SR and SEG (valid per dciodvfy).

The phantoms of `tests.ctgen` are not real chests, so the node runs with ``[gate] scope_check = false`` and a small
``min_slices``: these tests are about which series get a result and how many versions, not about the verdict.
The quiet timer is short (``STABLE_SECONDS``), longer than the pauses between batches. One node and one Orthanc are
shared by the module (every series has fresh UIDs); the forwarding-loop test starts its own pair. Waits poll a
condition with a deadline; fixed sleeps only where time passing is the subject (pauses between batches, the
fixed-point window, the margin after an ignored series).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa

from node.results.codes import KEY_IMAGES_SERIES_DESCRIPTION, KOS_SERIES_DESCRIPTION
from peers import dcmtk
from peers.orthanc import OrthancServer
from tests.conftest import (
    REPO,
    TEST_WEIGHTS_DIR,
    NodeProcess,
    free_port,
    launch_node,
    require_tool,
    require_weights,
    wait_until,
)
from tests.ctgen import CtSeries, write_ct_series

pytestmark = pytest.mark.integration

STABLE_SECONDS = 6  # the quiet timer: longer than BATCH_PAUSE_SECONDS, short enough for a fast suite
BATCH_PAUSE_SECONDS = 2.5
FIXED_POINT_WINDOW_SECONDS = 20  # the forwarding-loop test: no growth at Orthanc over this long
FIXED_POINT_WINDOW_SLOW_SECONDS = 120
IGNORED_MARGIN_SECONDS = 3  # after an ignored series: nothing may still be on its way
SLICES, SIZE = 16, 32
RESULT_TIMEOUT = STABLE_SECONDS + 90  # quiet timer + models (warm-up included) + delivery
CALLING_AE = "CT-SCANNER"

PNEUMONIA = "233604007"  # SNOMED CT concept of the pneumonia finding in the SR
SKIP_REASON = "SKIP-REASON"
KOS_TITLE = "113001"  # Rejected for Quality Reasons

_seeds = itertools.count(7100)  # fresh UIDs for every series of the module (ctgen derives UIDs from the seed)


# -- peers ---------------------------------------------------------------------------------------------------------
def node_toml(orthanc: OrthancServer) -> str:
    weights = f'[worker]\nweights_dir = "{TEST_WEIGHTS_DIR}"\n' if TEST_WEIGHTS_DIR else ""
    return weights + f"""
[completion]
stable_seconds = {STABLE_SECONDS}
[gate]
min_slices = 8
scope_check = false
[dispatch]
initial_backoff_seconds = 0.5
max_backoff_seconds = 2
{orthanc.destination_toml()}"""


@dataclass
class Site:
    """A node whose results go to ``orthanc``; Orthanc knows the node as modality ``node``."""

    node: NodeProcess
    orthanc: OrthancServer
    engine: sa.Engine

    def diagnostics(self) -> str:
        return f"\n--- node log (tail) ---\n{self.node.log_text()[-4000:]}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, node_database) -> Iterator[Site]:
    """The module's node and Orthanc (a graceful Orthanc stop and a node start cost seconds: share them)."""
    require_tool("storescu")
    require_weights()
    workdir = tmp_path_factory.mktemp("site")
    node_port = free_port()
    with OrthancServer(workdir / "orthanc", modalities={"node": ("PACSNODE", "127.0.0.1", node_port)}) as orthanc:
        node = launch_node(workdir / "node", port=node_port, extra_toml=node_toml(orthanc),
                           database_url=node_database.for_node())
        engine = sa.create_engine(node.db_url)
        try:
            yield Site(node, orthanc, engine)
        finally:
            engine.dispose()
            node.stop()


# -- senders -------------------------------------------------------------------------------------------------------
def storescu(port: int, *paths: Path, aec: str = "PACSNODE", options: tuple[str, ...] = ()) -> None:
    """One storescu call (one association) sending ``paths`` (files or folders) with TCP_NODELAY."""
    dcmtk.storescu(port, *paths, called_ae=aec, calling_ae=CALLING_AE, options=options, check=True, timeout=120)


def chest_series(out: Path, *, slices: int = SLICES) -> CtSeries:
    return write_ct_series(out, slices=slices, size=SIZE, seed=next(_seeds))


def rewrite(series: CtSeries, change: Callable[[pydicom.Dataset], None]) -> CtSeries:
    """Apply ``change`` to every file of ``series`` in place."""
    for path in series.paths:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path, enforce_file_format=True)
    return series


def _drop_dates(ds: pydicom.Dataset) -> None:
    for element in list(ds):
        if element.VR in ("DA", "DT", "TM"):
            del ds[element.tag]


def _drop_frame_of_reference(ds: pydicom.Dataset) -> None:
    del ds.FrameOfReferenceUID


def _head(ds: pydicom.Dataset) -> None:
    ds.BodyPartExamined = "HEAD"
    ds.SeriesDescription = "head routine"


# -- looking at Orthanc and at the node ----------------------------------------------------------------------------
def study_series(orthanc: OrthancServer, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """The series Orthanc holds in ``study_uid``, by modality (expanded: MainDicomTags, Instances)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for s in orthanc.find("Series", {"StudyInstanceUID": study_uid}):
        out.setdefault(s["MainDicomTags"].get("Modality", ""), []).append(s)
    return out


def instance_count(orthanc: OrthancServer) -> int:
    return int(orthanc.statistics()["CountInstances"])


def fetch(orthanc: OrthancServer, series: dict[str, Any], out: Path) -> list[Path]:
    """The files of one expanded Orthanc series, written under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for instance_id in series["Instances"]:
        path = out / f"{instance_id}.dcm"
        path.write_bytes(orthanc.get_file(instance_id))
        paths.append(path)
    return paths


def has_results(orthanc: OrthancServer, study_uid: str, *modalities: str) -> Callable[[], bool]:
    return lambda: all(study_series(orthanc, study_uid).get(m) for m in modalities)


def series_row(engine: sa.Engine, series_uid: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text("select * from series where series_uid = :s"), {"s": series_uid}).first()


def settled(engine: sa.Engine, series_uid: str) -> bool:
    """The node has decided about the series and has nothing left to do for it: no open job, nothing to send."""
    with engine.connect() as conn:
        state = conn.execute(sa.text("select state from series where series_uid = :s"), {"s": series_uid}).scalar()
        busy = conn.execute(
            sa.text("select (select count(*) from jobs where series_uid = :s and state in ('queued', 'running'))"
                    " + (select count(*) from deliveries where series_uid = :s and state in ('pending', 'sending'))"),
            {"s": series_uid},
        ).scalar()
    return state in ("complete", "ignored") and busy == 0


def results_rows(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("select count(*) from results")).scalar() or 0)


def jobs_for(engine: sa.Engine, series_uid: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("select * from jobs where series_uid = :s"), {"s": series_uid}))


def walk(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    stack = list(ds.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        yield item
        stack.extend(item.get("ContentSequence", []))


def coded_value(sr: pydicom.Dataset, concept: str) -> str | None:
    """The code value of the CODE content item named ``concept`` anywhere in the SR tree."""
    for item in walk(sr):
        name = item.get("ConceptNameCodeSequence")
        if name and name[0].CodeValue == concept and "ConceptCodeSequence" in item:
            return str(item.ConceptCodeSequence[0].CodeValue)
    return None


def dciodvfy_errors(path: Path) -> list[str]:
    exe = require_tool("dciodvfy")
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def assert_one_version(site: Site, series: CtSeries) -> dict[str, list[dict[str, Any]]]:
    """Wait for the series' SR, SEG and key images at Orthanc and for the node to settle; assert exactly one
    version."""
    wait_until(has_results(site.orthanc, series.study_uid, "SR", "SEG", "KO"), RESULT_TIMEOUT,
               "SR, SEG and key-images KO at Orthanc", site.diagnostics)
    wait_until(lambda: settled(site.engine, series.series_uid), 60, "the node to settle", site.diagnostics)
    row = series_row(site.engine, series.series_uid)
    assert (row.state, row.version, row.instance_count) == ("complete", 1, len(series.paths)), site.diagnostics()
    found = study_series(site.orthanc, series.study_uid)
    assert len(found["SR"]) == 1 and len(found["SR"][0]["Instances"]) == 1, found
    assert len(found["SEG"]) == 1 and len(found["SEG"][0]["Instances"]) == 1, found
    # one KO: the key-images note, no rejection note (that would mean a second version)
    assert len(found["KO"]) == 1 and len(found["KO"][0]["Instances"]) == 1, found
    assert found["KO"][0]["MainDicomTags"].get("SeriesDescription") == KEY_IMAGES_SERIES_DESCRIPTION, found
    return found


# -- 1. storescu as the modality, three ways of sending --------------------------------------------------------------
def _one_association(port: int, s: CtSeries) -> None:
    storescu(port, *s.paths)


def _association_per_image(port: int, s: CtSeries) -> None:
    for path in s.paths:
        storescu(port, path)


def _three_batches(port: int, s: CtSeries) -> None:
    third = len(s.paths) // 3
    batches = [s.paths[:third], s.paths[third:2 * third], s.paths[2 * third:]]
    for n, batch in enumerate(batches):
        if n:
            time.sleep(BATCH_PAUSE_SECONDS)  # the subject: pauses shorter than the quiet timer
        storescu(port, *batch)


SEND_PATTERNS: dict[str, Callable[[int, CtSeries], None]] = {
    "one-association": _one_association,
    "association-per-image": _association_per_image,
    "three-batches": _three_batches,
}


@pytest.fixture(scope="module")
def storescu_sends(
    site: Site, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[CtSeries, Future[None]]]]:
    """All three send patterns started at once (their quiet timers run side by side); name → (series, send)."""
    base = tmp_path_factory.mktemp("storescu")
    with ThreadPoolExecutor(max_workers=len(SEND_PATTERNS)) as pool:
        sends = {}
        for name, send in SEND_PATTERNS.items():
            series = chest_series(base / name)
            sends[name] = (series, pool.submit(send, site.node.port, series))
        yield sends


@pytest.mark.parametrize("pattern", list(SEND_PATTERNS))
def test_storescu_sender_gives_one_result_version(site: Site, storescu_sends, pattern: str) -> None:
    series, send = storescu_sends[pattern]
    send.result(timeout=120)  # every instance is sent before we look: a second version could only come later
    assert_one_version(site, series)


# -- 2. Orthanc as the sender ------------------------------------------------------------------------------------------
def test_orthanc_sender_gives_one_result_version(site: Site, tmp_path: Path) -> None:
    series = chest_series(tmp_path / "ct")
    parents = {site.orthanc.rest("POST", "/instances", path.read_bytes())["ParentSeries"] for path in series.paths}
    assert len(parents) == 1
    site.orthanc.rest("POST", "/modalities/node/store", {"Resources": list(parents), "Synchronous": True},
                      timeout=120)
    found = assert_one_version(site, series)
    assert len(found["CT"][0]["Instances"]) == len(series.paths)
    assert series_row(site.engine, series.series_uid).calling_ae == "ORTHANC"


# -- 3. the node's own results sent back to it -------------------------------------------------------------------------
def test_own_results_sent_back_make_nothing_new(site: Site, storescu_sends, tmp_path: Path) -> None:
    series, send = storescu_sends["one-association"]
    send.result(timeout=120)
    found = assert_one_version(site, series)
    own = fetch(site.orthanc, found["SR"][0], tmp_path / "own") + fetch(site.orthanc, found["SEG"][0],
                                                                         tmp_path / "own")
    own_series = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in own}
    before_orthanc, before_results = instance_count(site.orthanc), results_rows(site.engine)

    storescu(site.node.port, *own, options=("-R",))  # -R: propose exactly the SOP classes of the files

    def decided() -> list[Any]:
        rows = [series_row(site.engine, uid) for uid in own_series]
        return rows if all(r is not None and r.state not in ("receiving", "reopened") for r in rows) else []

    rows = wait_until(decided, STABLE_SECONDS + 30, "the node to decide about its own results", site.diagnostics)
    assert {(r.state, r.route) for r in rows} == {("ignored", "[own-result]")}, site.diagnostics()
    time.sleep(IGNORED_MARGIN_SECONDS)  # the subject: nothing follows an ignored series
    assert instance_count(site.orthanc) == before_orthanc
    assert results_rows(site.engine) == before_results
    assert all(jobs_for(site.engine, uid) == [] for uid in own_series)
    status = subprocess.run([sys.executable, "-m", "node.cli", "status", "--json", "--config",
                             str(site.node.config_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["series"].get("ignored", 0) >= len(own_series)  # the operator's view agrees


# -- 4. a PACS that forwards everything back: fixed point --------------------------------------------------------------
FORWARD_ALL_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'node')
end
"""


@pytest.mark.one_backend  # own results sent back run on both backends in test_own_results_sent_back_make_nothing_new
@pytest.mark.parametrize("window", [
    pytest.param(FIXED_POINT_WINDOW_SECONDS, id="window-20s"),
    pytest.param(FIXED_POINT_WINDOW_SLOW_SECONDS, id="window-2min", marks=pytest.mark.slow),
])
def test_forwarding_pacs_reaches_a_fixed_point(start_node, orthanc_factory, tmp_path: Path, window: int) -> None:
    require_tool("storescu")
    require_weights()
    script = tmp_path / "forward.lua"
    script.write_text(FORWARD_ALL_LUA)
    node_port = free_port()
    orthanc = orthanc_factory(modalities={"node": ("PACSNODE", "127.0.0.1", node_port)},
                              config={"LuaScripts": [str(script)]})
    node = start_node(port=node_port, extra_toml=node_toml(orthanc))
    engine = sa.create_engine(node.db_url)
    site = Site(node, orthanc, engine)
    try:
        series = chest_series(tmp_path / "ct")
        storescu(orthanc.dicom_port, *series.paths, aec=orthanc.aet)  # the modality sends to the PACS only
        wait_until(has_results(orthanc, series.study_uid, "SR", "SEG", "KO"), RESULT_TIMEOUT,
                   "SR, SEG and key-images KO at the forwarding Orthanc", site.diagnostics)
        found = study_series(orthanc, series.study_uid)
        result_series = {s["MainDicomTags"]["SeriesInstanceUID"] for m in ("SR", "SEG", "KO") for s in found[m]}

        def forwarded_results_decided() -> bool:
            rows = [series_row(engine, uid) for uid in result_series]
            return all(r is not None and r.state not in ("receiving", "reopened") for r in rows)

        # Orthanc forwards the results to the node; once the node has judged them, a loop would show
        wait_until(forwarded_results_decided, STABLE_SECONDS + 30, "the node to judge the forwarded results",
                   site.diagnostics)
        assert {(series_row(engine, u).state, series_row(engine, u).route) for u in result_series} == {
            ("ignored", "[own-result]")}
        before, results_before = instance_count(orthanc), results_rows(engine)
        assert before == len(series.paths) + 3, study_series(orthanc, series.study_uid)  # + SR, SEG, KO
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:  # the subject is time passing: sample the count through the window
            assert instance_count(orthanc) == before, site.diagnostics()
            time.sleep(1.0)
        assert instance_count(orthanc) == before
        assert results_rows(engine) == results_before
        row = series_row(engine, series.series_uid)
        assert (row.state, row.version, row.calling_ae) == ("complete", 1, "ORTHANC")
    finally:
        engine.dispose()


# -- 5. what gets a result and what does not -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_series(site: Site, tmp_path_factory: pytest.TempPathFactory) -> dict[str, CtSeries]:
    """A head CT, a chest CT without any date/time attributes and one without FrameOfReferenceUID, sent together
    in one association (their quiet timers run side by side)."""
    base = tmp_path_factory.mktemp("odd")
    made = {
        "head": rewrite(chest_series(base / "head"), _head),
        "no-dates": rewrite(chest_series(base / "no-dates"), _drop_dates),
        "no-for": rewrite(chest_series(base / "no-for"), _drop_frame_of_reference),
    }
    storescu(site.node.port, *(base / name for name in made))
    return made


@pytest.mark.one_backend  # routing reads a header; its ignored-series path runs on both in test_own_results_sent_back
def test_head_ct_gets_no_object(site: Site, odd_series: dict[str, CtSeries]) -> None:
    head = odd_series["head"]
    wait_until(lambda: settled(site.engine, head.series_uid), STABLE_SECONDS + 30, "the head CT to be judged",
               site.diagnostics)
    row = series_row(site.engine, head.series_uid)
    assert (row.state, row.route) == ("ignored", "everything-else")
    assert jobs_for(site.engine, head.series_uid) == []
    time.sleep(IGNORED_MARGIN_SECONDS)  # the subject: nothing follows an ignored series
    assert site.orthanc.find("Study", {"StudyInstanceUID": head.study_uid}) == []


def test_chest_ct_without_dates_gets_its_sr(site: Site, odd_series: dict[str, CtSeries], tmp_path: Path) -> None:
    series = odd_series["no-dates"]
    found = assert_one_version(site, series)
    sr_path = fetch(site.orthanc, found["SR"][0], tmp_path)[0]
    sr = pydicom.dcmread(sr_path)
    assert coded_value(sr, SKIP_REASON) is None
    assert coded_value(sr, PNEUMONIA) is not None
    assert dciodvfy_errors(sr_path) == []


def test_chest_ct_without_frame_of_reference_gets_a_not_processed_sr(
    site: Site, odd_series: dict[str, CtSeries], tmp_path: Path
) -> None:
    series = odd_series["no-for"]
    wait_until(has_results(site.orthanc, series.study_uid, "SR"), RESULT_TIMEOUT, "the not-processed SR",
               site.diagnostics)
    wait_until(lambda: settled(site.engine, series.series_uid), 60, "the node to settle", site.diagnostics)
    found = study_series(site.orthanc, series.study_uid)
    assert set(found) == {"SR"} and len(found["SR"]) == 1 and len(found["SR"][0]["Instances"]) == 1, found
    sr = pydicom.dcmread(fetch(site.orthanc, found["SR"][0], tmp_path)[0])
    assert coded_value(sr, SKIP_REASON) == "SKIP-GEOMETRY"
    assert [(j.state, j.skip_reason) for j in jobs_for(site.engine, series.series_uid)] == [
        ("skipped", "MISSING_GEOMETRY")]


# -- 5b. malformed birth dates (issue "Hostile networks"): the result is never lost ---------------------------------
BAD_BIRTH_DATES = ("19950000", "1995", "1995-01-01", "garbage!")


@pytest.fixture(scope="module")
def bad_birth_dates(site: Site, tmp_path_factory: pytest.TempPathFactory) -> dict[str, CtSeries]:
    """One chest series per malformed PatientBirthDate (written as is, no validation), sent in one association."""
    base = tmp_path_factory.mktemp("bad-birth-dates")
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
        for n, value in enumerate(BAD_BIRTH_DATES):
            made[value] = rewrite(chest_series(base / str(n)), lambda ds, v=value: setattr(ds, "PatientBirthDate", v))
    storescu(site.node.port, *(base / str(n) for n in range(len(BAD_BIRTH_DATES))))
    return made


@pytest.mark.parametrize("value", BAD_BIRTH_DATES)
def test_a_malformed_birth_date_still_gets_its_sr_and_seg(
    site: Site, bad_birth_dates: dict[str, CtSeries], value: str, tmp_path: Path
) -> None:
    series = bad_birth_dates[value]
    assert pydicom.dcmread(series.paths[0]).PatientBirthDate == value  # what was sent
    found = assert_one_version(site, series)
    for modality in ("SR", "SEG"):
        path = fetch(site.orthanc, found[modality][0], tmp_path / modality)[0]
        result = pydicom.dcmread(path)
        assert result.PatientBirthDate == "", modality  # emptied (Type 2), never copied malformed
        assert dciodvfy_errors(path) == [], modality
    if len(value) > 4:  # the value never reaches the log or the jobs table ("1995" is too common to look for)
        assert value not in site.node.log_text()
        assert all(value not in str(tuple(job)) for job in jobs_for(site.engine, series.series_uid))


# -- 6. a late instance: a second version and a rejection note for the first --------------------------------------
def referenced_sop_uids(kos: pydicom.Dataset) -> tuple[set[str], set[str]]:
    """(evidence, content tree) SOP Instance UIDs a KOS references."""
    evidence = {str(sop.ReferencedSOPInstanceUID)
                for study in kos.CurrentRequestedProcedureEvidenceSequence
                for s in study.ReferencedSeriesSequence for sop in s.ReferencedSOPSequence}
    content = {str(ref.ReferencedSOPInstanceUID)
               for item in walk(kos) for ref in item.get("ReferencedSOPSequence", [])}
    return evidence, content


def test_late_instance_gives_v2_and_a_kos_withdrawing_v1(site: Site, tmp_path: Path) -> None:
    series = chest_series(tmp_path / "ct", slices=SLICES + 1)
    storescu(site.node.port, *series.paths[:-1])
    v1 = assert_one_version(site, replace(series, sop_uids=series.sop_uids[:-1], paths=series.paths[:-1]))
    v1_series = {s["MainDicomTags"]["SeriesInstanceUID"] for m in ("SR", "SEG", "KO") for s in v1[m]}
    v1_sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
               for m in ("SR", "SEG", "KO") for p in fetch(site.orthanc, v1[m][0], tmp_path / "v1")}

    storescu(site.node.port, series.paths[-1])  # the late slice continues the stack evenly

    wait_until(lambda: len(study_series(site.orthanc, series.study_uid).get("SR", [])) >= 2
               and len(study_series(site.orthanc, series.study_uid).get("SEG", [])) >= 2
               and len(study_series(site.orthanc, series.study_uid).get("KO", [])) >= 3, RESULT_TIMEOUT,
               "v2 SR, SEG, key images and the rejection KOS at Orthanc", site.diagnostics)
    wait_until(lambda: settled(site.engine, series.series_uid), 60, "the node to settle", site.diagnostics)
    row = series_row(site.engine, series.series_uid)
    assert (row.state, row.version, row.instance_count) == ("complete", 2, len(series.paths))

    found = study_series(site.orthanc, series.study_uid)
    assert len(found["SR"]) == 2 and len(found["SEG"]) == 2 and len(found["KO"]) == 3, found  # KO: 2 key images + 1
    for modality in ("SR", "SEG"):
        (old,) = [s for s in found[modality] if s["MainDicomTags"]["SeriesInstanceUID"] in v1_series]
        (new,) = [s for s in found[modality] if s["MainDicomTags"]["SeriesInstanceUID"] not in v1_series]
        # v2 never shares a series number with v1
        assert old["MainDicomTags"]["SeriesNumber"] != new["MainDicomTags"]["SeriesNumber"], modality
    (rejection,) = [s for s in found["KO"] if s["MainDicomTags"].get("SeriesDescription") == KOS_SERIES_DESCRIPTION]
    kos_path = fetch(site.orthanc, rejection, tmp_path / "kos")
    assert len(kos_path) == 1
    kos = pydicom.dcmread(kos_path[0])
    assert kos.ConceptNameCodeSequence[0].CodeValue == KOS_TITLE
    evidence, content = referenced_sop_uids(kos)
    assert evidence == v1_sops and content == v1_sops
    assert dciodvfy_errors(kos_path[0]) == []
