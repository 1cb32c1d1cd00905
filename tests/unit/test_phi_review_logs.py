"""node.logs, PHI review: what pydicom and highdicom say about a malformed patient value reaches the node's log
without the value.

pydicom reports a value that is invalid for its VR through its logger *and* `warnings.warn`, quoting it ("Invalid
value for VR IS: 'DOE'"), and highdicom warns about a single-component person name quoting the name; the node's
worker converts such values (PatientBirthDate for the age, PatientSex, the patient module highdicom copies into each
result). Both went to the node's log as they were: the logger's line through the JSON handler, the warning as a raw
non-JSON line on stderr (found by sending a real node series with a PatientBirthDate of VR IS, and with a
single-component PatientName: tests/integration/test_phi_review_node.py). Run in a subprocess: pytest captures
warnings itself, and the node's own process is what writes them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import REPO

MARKER = "ZZPHIMARKER"

_SCRIPT = textwrap.dedent(
    f"""
    import contextlib
    import logging
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag
    from highdicom.valuerep import check_person_name
    from node.logs import configure_logging

    configure_logging("INFO")
    ds = Dataset()
    for keyword, vr, value in (("PatientBirthDate", "IS", b"{MARKER}1 "), ("PatientName", "DS", b"{MARKER}2 "),
                               ("OtherPatientIDs", "IS", b"{MARKER}3\\\\4"), ("AccessionNumber", "IS", b"O'{MARKER}4")):
        tag = Tag(keyword)
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
        with contextlib.suppress(Exception):
            ds[tag].value  # what the worker does reading the header
    check_person_name("{MARKER}6")  # highdicom, on every result built for a single-component PatientName
    try:
        raise ValueError("could not convert string to float: '{MARKER}7'")
    except ValueError:
        logging.getLogger("pydicom.values").exception("conversion of '{MARKER}8' failed")
    """
)


def _run() -> list[str]:
    done = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def test_library_messages_about_a_malformed_patient_value_reach_the_log_without_the_value():
    lines = _run()
    leaked = [line for line in lines if MARKER in line]
    assert leaked == [], "\n".join(leaked)
    events = [json.loads(line) for line in lines]  # every line is JSON: no raw warning text on stderr either
    pydicom_lines = [e["event"] for e in events if e.get("logger") == "pydicom"]
    # what went wrong is kept: the kind of error and the VR, without the value
    assert any("Invalid value for VR IS" in text for text in pydicom_lines), pydicom_lines
    assert len(pydicom_lines) == 3, pydicom_lines  # O'... is quoted with double quotes: removed all the same
    (failed,) = [e for e in events if e.get("logger") == "pydicom.values"]
    assert failed["event"] == "conversion of [removed] failed (ValueError)" and "exception" not in failed
