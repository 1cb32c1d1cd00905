"""Second review of 72f7a3a (routing.header_value): a header value that converts, but to a type routing does not
expect, must not stall its series either."""

from __future__ import annotations

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from structlog.testing import capture_logs

from node.db import create_engine_for, init_schema
from node.index import Index
from node.ingest import Ingestor, Origin
from node.routing import read_header
from node.spool import Spool
from node.states import SeriesState
from tests.dicomfiles import dataset_bytes
from tests.unit.test_completion import CHEST_CT, chest_header, env, make, send  # noqa: F401 - fixtures


def _image_type_as_us(tmp_path, value: bytes):
    """The chest CT header with ImageType written as US (a faulty converter's VR): two bytes convert to an int."""
    ds = pydicom.dcmread(CHEST_CT[0])
    tag = Tag("ImageType")
    ds._dict[tag] = RawDataElement(tag, "US", len(value), value, 0, False, True)
    path = tmp_path / "image-type-us.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_image_type_that_converts_to_a_number_is_acknowledged_and_routed(env, tmp_path, db_url):  # noqa: F811
    """ImageType as US with two bytes converts (pydicom gives an int, no exception for header_value to catch) and
    routing did ``list(int)``: TypeError on every sweep, the series never completed — the same stall 72f7a3a fixed
    for values that do not convert. The instance is acknowledged at the door (ingest never converts ImageType)."""
    path = _image_type_as_us(tmp_path, b"\x05\x00")
    engine = create_engine_for(db_url)
    init_schema(engine)
    try:
        accepted = Ingestor(Spool(tmp_path / "spool"), Index(engine)).accept(
            dataset_bytes(path), ExplicitVRLittleEndian, Origin(calling_ae="CT1", association_id="x"))
        assert accepted.record.sop_uid
    finally:
        engine.dispose()
    header = read_header(path, calling_ae="CT1", slices=3)
    assert header is not None and header.modality == "CT"

    index, sweeper, completed = make(env)
    _, clock = env
    send(index, "7.6", [0, 2.5, 5.0], path=str(path))
    clock.now += 60
    with capture_logs() as logs:
        sweeper.sweep()
    assert not [e for e in logs if e["event"] == "series_sweep_failed"]
    # decided, on what routing can read: an ImageType of "5" is not the default routes' ORIGINAL\PRIMARY\AXIAL
    assert index.get_series("7.6").state == SeriesState.IGNORED and completed == []
