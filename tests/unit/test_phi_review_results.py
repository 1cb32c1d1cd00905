"""node.results, PHI review: `ResultsError` messages — trusted by the worker, so they reach the jobs table, the log,
/admin and the "processing failed" SR — keep a library's complaint but none of the sources' identifying values,
whatever form the library quoted them in.

`scrub` only removed a value quoted exactly as ``str(value)``: pydicom's and highdicom's ``{value!r}`` (a name with
a control character, quoted with its escapes) and one value of a multi-valued attribute (OtherPatientIDs: the
element's ``str`` is the whole list) went through."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from node.results import ResultsError
from node.results.content import converting, scrub

MARKER = "ZZPHIMARKER"


def _source() -> Dataset:
    ds = Dataset()
    ds.PatientName = f"DOE^{MARKER}1\x07"
    ds.OtherPatientIDs = [f"{MARKER}2", f"{MARKER}3"]
    ds.PatientID = f"{MARKER}4"
    ds.AccessionNumber = f"O'{MARKER}5"
    return ds


@pytest.mark.parametrize("message", [
    f"Invalid value for VR PN: {f'DOE^{MARKER}1' + chr(7)!r}.",  # repr: the control character escaped
    f"Invalid value for VR LO: '{MARKER}3'.",  # one value of a multi-valued attribute
    f"Invalid value for VR LO: ['{MARKER}2', '{MARKER}3']",  # all of them, as a list
    f'value "O\'{MARKER}5" refused',  # a value with a quote in it
    f"Invalid value for VR SH: {f'O{chr(39)}{MARKER}5'!r}",  # ... and its repr
    f"{MARKER}4 is not allowed here",  # unquoted
])
def test_scrub_removes_every_form_a_library_quotes_a_value_in(message):
    assert MARKER not in scrub(message, [_source()])


def test_a_converted_error_keeps_the_step_and_the_complaint():
    with pytest.raises(ResultsError) as info, converting("building the SR document", [_source()]):
        raise ValueError(f"Invalid value for VR PN: {f'DOE^{MARKER}1' + chr(7)!r}.")
    text = str(info.value)
    assert MARKER not in text
    assert text.startswith("building the SR document failed: ValueError: Invalid value for VR PN: "), text
