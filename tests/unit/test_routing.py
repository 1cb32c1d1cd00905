"""Routing: built-in exclusions, the default routes, every condition of a route, and the order routes apply in,
on real headers written to disk (tests/ctgen.py) and read back by `read_header`."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.config import NodeConfig, PipelineName, Route
from node.routing import Builtin, read_header, route
from node.states import NODE_MANUFACTURER
from tests.ctgen import write_ct_series

DEFAULT = NodeConfig().routes


@pytest.fixture(scope="module")
def chest(tmp_path_factory) -> Path:
    return write_ct_series(tmp_path_factory.mktemp("chest"), slices=1, size=16).paths[0]


def variant(chest: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the chest CT file with header attributes changed (None deletes)."""
    ds = pydicom.dcmread(chest)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / f"v{len(list(tmp_path.iterdir()))}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def decide(path: Path, routes=DEFAULT, calling_ae="CT1", slices=40):
    return route(read_header(path, calling_ae=calling_ae, slices=slices), routes, NODE_MANUFACTURER)


def test_axial_chest_ct_goes_to_the_pneumonia_pipeline(chest):
    decision = decide(chest)
    assert (decision.label, decision.pipeline) == ("chest-ct", PipelineName.PNEUMONIA)


@pytest.mark.parametrize(
    ("changes", "label"),
    [
        ({"BodyPartExamined": "HEAD"}, "everything-else"),
        ({"BodyPartExamined": "ABDOMEN"}, "everything-else"),
        ({"BodyPartExamined": None, "SeriesDescription": "HEAD WO CONTRAST"}, "everything-else"),
        ({"BodyPartExamined": "HEAD", "SeriesDescription": "Chest"}, "everything-else"),  # body part wins
        ({"Modality": "MR"}, "everything-else"),
        ({"ImageType": ["DERIVED", "PRIMARY", "AXIAL"]}, "everything-else"),  # reformats are not routed by default
        ({"ImageType": ["ORIGINAL", "PRIMARY", "REFORMATTED"]}, "everything-else"),
        ({"Manufacturer": NODE_MANUFACTURER}, Builtin.OWN_RESULT.value),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, Builtin.LOCALIZER.value),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, Builtin.SCREEN.value),  # a dose screen with Modality CT
        ({"ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]}, Builtin.SCREEN.value),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.33"}, Builtin.NON_IMAGE.value),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.66.4"}, Builtin.NON_IMAGE.value),
        ({"Rows": None, "Columns": None}, Builtin.NON_IMAGE.value),
    ],
)
def test_everything_but_axial_chest_ct_gets_no_pipeline(chest, tmp_path, changes, label):
    decision = decide(variant(chest, tmp_path, **changes))
    assert decision.label == label
    assert decision.pipeline is None


@pytest.mark.parametrize("description", ["CT Thorax 1.0 B70f", "LUNG 1.25mm", "Chest w/o"])
def test_without_a_body_part_a_chest_description_routes(chest, tmp_path, description):
    for missing in (None, ""):
        decision = decide(variant(chest, tmp_path, BodyPartExamined=missing, SeriesDescription=description))
        assert (decision.label, decision.pipeline) == ("chest-ct-by-description", PipelineName.PNEUMONIA)


def test_an_unreadable_file_is_not_routed(tmp_path):
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"not dicom at all")
    decision = route(read_header(path, calling_ae="X", slices=1), DEFAULT, NODE_MANUFACTURER)
    assert (decision.label, decision.pipeline) == (Builtin.UNREADABLE.value, None)


def test_a_series_no_route_matches_is_unrouted(chest):
    only_mr = (Route(name="mr", pipeline=PipelineName.LUNG_VOLUME, modality=("MR",)),)
    assert decide(chest, only_mr).label == Builtin.UNROUTED.value


def test_the_first_matching_route_decides(chest):
    routes = (
        Route(name="er", pipeline=PipelineName.LUNG_VOLUME, calling_ae=("ER-CT",)),
        Route(name="all", pipeline=PipelineName.PNEUMONIA),
    )
    assert decide(chest, routes, calling_ae="ER-CT").pipeline is PipelineName.LUNG_VOLUME
    assert decide(chest, routes, calling_ae="CT1").pipeline is PipelineName.PNEUMONIA


@pytest.mark.parametrize(
    ("condition", "matches"),
    [
        ({"modality": ("ct",)}, True),
        ({"sop_class": ("CTImageStorage",)}, True),
        ({"sop_class": ("1.2.840.10008.5.1.4.1.1.2.1",)}, False),
        ({"image_type": ("original", "axial")}, True),
        ({"image_type": ("ORIGINAL", "HELIX")}, False),
        ({"image_type_not": ("LOCALIZER",)}, True),
        ({"image_type_not": ("AXIAL",)}, False),
        ({"body_part": ("chest",)}, True),
        ({"series_description": r"^ctgen"}, True),
        ({"series_description": r"^head"}, False),
        ({"protocol_name": r"lung"}, False),  # no ProtocolName: an empty string does not match
        ({"calling_ae": ("CT1",)}, True),
        ({"calling_ae": ("CT2",)}, False),
        ({"min_slices": 40}, True),
        ({"min_slices": 41}, False),
        ({"max_slices": 39}, False),
        ({"max_slice_thickness_mm": 2.5}, True),
        ({"max_slice_thickness_mm": 2.0}, False),
        ({"min_slice_thickness_mm": 3.0}, False),
    ],
)
def test_each_condition(chest, condition, matches):
    rule = Route(name="r", pipeline=PipelineName.PNEUMONIA, **condition)
    assert (decide(chest, (rule,)).label == "r") is matches


def test_ignore_route_and_node_made_objects(chest, tmp_path):
    ignore_all = (Route(name="off", pipeline="ignore"),)
    assert decide(chest, ignore_all).pipeline is None
    # a route that would take everything still never gets the node's own output
    take_all = (Route(name="all", pipeline=PipelineName.PNEUMONIA),)
    own = variant(chest, tmp_path, Manufacturer=NODE_MANUFACTURER, SeriesInstanceUID=generate_uid())
    assert decide(own, take_all).label == Builtin.OWN_RESULT.value


def test_route_patterns_search_at_most_256_characters_of_a_header_value(chest, tmp_path):
    """Found by review: SeriesDescription and ProtocolName were searched whole, so a peer's megabyte-long value
    made an admin's pattern like '.*x.*' quadratic on the completion sweeper. LO values hold 64 characters; 256 are
    searched, and a chest word past them does not route."""
    header = read_header(variant(chest, tmp_path, BodyPartExamined=None, SeriesDescription="A" * 1_000_000,
                                 ProtocolName="B" * 1_000_000), calling_ae="CT1", slices=40)
    assert header is not None
    assert len(header.series_description) == len(header.protocol_name) == 256
    late = variant(chest, tmp_path, BodyPartExamined=None, SeriesDescription="x" * 300 + " CHEST")
    assert decide(late).pipeline is None
