"""Fuzzing the SR/SEG builders' handling of source attributes (node.results): the patient and study attributes
of a real CT series (tests/ctgen) are replaced by what a sender may put on the wire — random text and bytes, the
right VR or a wrong one, several values where one is expected — as raw elements, the way pydicom hands them over
from a received file. A result (SR + SEG, and the "not processed" SR) is always built, and every object written
reads back with pydicom's reading validation set to RAISE, every value decoded."""

from __future__ import annotations

import copy

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from node.results import AlgorithmIdentity, SkipReason, build_results, build_skipped_sr
from tests.fuzzing import LONG, QUICK
from tests.unit.results_support import cached_series, read_back_strictly

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ALGORITHM = AlgorithmIdentity(name="fuzz-model", version="0.0.1")
KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientBirthTime",
    "StudyDate", "StudyTime", "SeriesDate", "SeriesTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
    "InstitutionName", "StudyDescription", "SeriesDescription", "PatientWeight", "OtherPatientIDs",
    "Manufacturer", "StationName",  # highdicom copies the equipment into a Contributing Equipment item
)
VRS = ("DA", "TM", "DT", "PN", "LO", "SH", "CS", "AS", "DS", "IS", "US", "UL", "FD", "UI", "UN", "OB", "ST", "LT")


def values() -> st.SearchStrategy[bytes]:
    text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80).map(str.encode)
    return st.one_of(
        st.sampled_from([b"19950000", b"1995", b"1995-01-01", b"garbage!", b"20251399", b"256199", b"forty",
                         b"M\\F", b"Q", b"", b" ", b"\\", b"\x00", b"X" * 200, b"1995.01.01", b"99999999"]),
        text,
        st.lists(text, min_size=2, max_size=4).map(b"\\".join),
        st.binary(max_size=80),
    )


@st.composite
def damage(draw: st.DrawFn) -> dict[str, tuple[str, bytes]]:
    """keyword -> (VR, value bytes) for 1-6 attributes; the VR is the dictionary's two times in three."""
    out = {}
    for keyword in draw(st.lists(st.sampled_from(KEYWORDS), min_size=1, max_size=6, unique=True)):
        right = dictionary_VR(keyword)
        vr = draw(st.one_of(st.just(right), st.just(right), st.sampled_from(VRS)))
        out[keyword] = (vr, draw(values()))
    return out


def damaged(sources: list[Dataset], attributes: dict[str, tuple[str, bytes]]) -> list[Dataset]:
    broken = copy.deepcopy(sources)
    for ds in broken:
        for keyword, (vr, value) in attributes.items():
            tag = Tag(tag_for_keyword(keyword))
            if len(value) % 2:
                value += b" "  # values are even in length on the wire
            ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    return broken


def _fuzz(attributes: dict[str, tuple[str, bytes]]) -> None:
    sources, findings = cached_series()
    broken = damaged(sources, attributes)
    results = build_results(broken, findings, ALGORITHM)
    assert results.seg is not None
    for built in (results.sr, results.seg, build_skipped_sr(broken, SkipReason.NOT_CT, "detail", ALGORITHM)):
        read_back_strictly(built)


# The birth dates, and the first crashes found, replayed on every run.
_examples = [{"PatientBirthDate": ("DA", v)} for v in (b"19950000", b"1995", b"1995-01-01", b"garbage!")]
_examples += [
    {"PatientWeight": ("DS", b"1995-01-01")},  # found by fuzzing: highdicom copies every Patient Study attribute
    {"PatientName": ("US", b"abc ")},  # a wrong VR whose bytes do not decode
    {"StudyID": ("SH", b"A\\B ")},  # two values where one is allowed
    {"InstitutionName": ("PN", b"19950000")},  # a wrong VR in the equipment highdicom copies: unwritable
    {"StationName": ("US", b"ab")},
]
_test = given(attributes=damage())(_fuzz)
for _e in _examples:
    _test = example(attributes=_e)(_test)
test_malformed_source_attributes_never_lose_the_result = settings(QUICK, max_examples=40)(_test)
test_malformed_source_attributes_long = pytest.mark.slow(settings(LONG, max_examples=1000)(given(attributes=damage())(_fuzz)))
