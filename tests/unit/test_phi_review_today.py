"""PHI review of the messages added on 2026-12-06/07 (913b6b2..cfd4daf): the gate's refusals that now read the
whole Contrast/Bolus module and a loosely written PatientAge, the STOW-RS reader's transport padding (its 400
answers), and the result builders' trimmed names and explicit-UN attributes - each fed headers whose identifying
values (and the new fields themselves, malformed) carry a marker, in a process whose logging the node configured
(`node.logs`), so what pydicom, highdicom and python-multipart log about them goes through the node's handler. The
refusal reasons (logged, and written into the "not processed" SR), the 400 reasons and every log line must not carry
the marker; the SR itself may (it is the patient's record).

Run in a subprocess, as tests/unit/test_phi_review_logs.py: pytest captures warnings and logging itself.
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
    import copy, datetime as dt, io, json
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag
    from pydicom.uid import CTImageStorage, generate_uid
    from node.logs import configure_logging
    from node.gate import check_header, header_age_years
    from node.stow import BodyReader, Refused, MAX_PADDING_BYTES
    from node.results import AlgorithmIdentity, SkipReason, build_skipped_sr, ResultsError

    configure_logging("DEBUG")
    M = "{MARKER}"

    def raw(ds, keyword, vr, value):
        tag = Tag(keyword)
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)

    def header(**extra):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = "1.2.3.4"
        ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.Modality = "CT"
        ds.PatientName = M + "name^JOHN"
        ds.PatientID = M + "id"
        ds.PatientBirthDate = "19700101"
        ds.AccessionNumber = M + "acc"  # 14 characters: valid SH
        ds.StudyDescription = M + "studydesc"
        ds.SeriesDescription = M + "seriesdesc"
        ds.InstitutionName = M + "institution"
        ds.ReferringPhysicianName = M + "referrer"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.Rows = ds.Columns = 512
        for keyword, (vr, value) in extra.items():
            raw(ds, keyword, vr, value)
        return ds

    out = {{}}
    # -- the gate: contrast in the Contrast/Bolus module, malformed; a loosely written or malformed PatientAge
    gate_cases = {{
        "volume-malformed": dict(ContrastBolusVolume=("DS", M.encode() + b"1 ")),
        "volume-multivalued": dict(ContrastFlowRate=("DS", b"1.5\\\\" + M.encode() + b"2")),
        "route-text": dict(ContrastBolusRoute=("LO", M.encode() + b"3 ")),
        "ingredient-wrong-vr": dict(ContrastBolusIngredient=("IS", M.encode() + b"4 ")),
        "dose-explicit-un": dict(ContrastBolusTotalDose=("UN", M.encode() + b"5 ")),
        "concentration-bad-bytes": dict(ContrastBolusIngredientConcentration=("DS", b"\\xff\\xfe" + M.encode())),
        "agent-sequence-garbage": dict(ContrastBolusAgentSequence=("SQ", b"\\x01\\x02" + M.encode())),
        "age-loose-child": dict(PatientAge=("AS", b" 011y ")),
        "age-malformed": dict(PatientAge=("AS", M.encode() + b"6Y")),
        "age-wrong-vr": dict(PatientAge=("DS", M.encode() + b"7 ")),
    }}
    for name, extra in gate_cases.items():
        ds = header(**extra)
        refusal = check_header(ds)
        out["gate:" + name] = None if refusal is None else [str(refusal.reason), refusal.detail]
        out["age:" + name] = repr(header_age_years(ds))

    # -- STOW-RS: transport padding after a boundary, then what is not padding; part headers with identifying text
    def stow(body, chunks=(1, 7, 4096)):
        answers = []
        for size in chunks:
            reader = BodyReader("b0undary", io.BytesIO(), 1 << 20)
            try:
                for i in range(0, len(body), size):
                    reader.write(body[i:i + size])
                reader.finish()
                answers.append("accepted")
            except Refused as exc:
                answers.append(f"{{exc.http_status}} {{exc.reason}}")
        return answers

    part = (b"Content-Type: application/dicom\\r\\nContent-Description: " + M.encode() + b"8\\r\\n"
            b"Content-Location: /patients/" + M.encode() + b"9.dcm\\r\\n\\r\\n" + b"DICM" + M.encode() + b"10")
    pad = b" \\t "
    bodies = {{
        "padded": b"--b0undary" + pad + b"\\r\\n" + part + b"\\r\\n--b0undary--" + pad + b"\\r\\n",
        "text-after-boundary": b"--b0undary " + M.encode() + b"11\\r\\n" + part + b"\\r\\n--b0undary--\\r\\n",
        "too-much-padding": b"--b0undary" + b" " * (MAX_PADDING_BYTES + 5) + M.encode() + b"12\\r\\n" + part
                            + b"\\r\\n--b0undary--\\r\\n",
        "text-after-padded-delimiter": b"--b0undary\\r\\n" + part + b"\\r\\n--b0undary  " + M.encode()
                                       + b"13\\r\\n" + part + b"\\r\\n--b0undary--\\r\\n",
        "bad-header-field": b"--b0undary  \\r\\n" + M.encode() + b"14 x: y\\r\\n" + part + b"\\r\\n--b0undary--\\r\\n",
        "header-without-lf": b"--b0undary\\t\\r\\nContent-Description: " + M.encode() + b"15\\rX\\r\\n\\r\\nDICM"
                             + b"\\r\\n--b0undary--\\r\\n",
        "epilogue-part": b"--b0undary \\r\\n" + part + b"\\r\\n--b0undary-- \\r\\n--b0undary \\r\\n" + part
                         + b"\\r\\n--b0undary--\\r\\n",
        "truncated": b"--b0undary \\r\\n" + part + b"\\r\\n--b0undary " + M.encode(),
    }}
    for name, body in bodies.items():
        out["stow:" + name] = stow(body)

    # -- results: a padded name, explicit-UN identifying attributes, an unexplained Patient Identity Removed
    ds = header(PatientName=("PN", M.encode() + b"16^JOHN^^^^^"), OtherPatientIDs=("UN", M.encode() + b"17"),
                InstitutionAddress=("UN", M.encode() + b"18"), PatientIdentityRemoved=("CS", b"YES "))
    raw(ds, "StudyDescription", "UN", M.encode() + b"19")
    raw(ds, "ReferringPhysicianName", "UN", M.encode() + b"20^A^B^C^D^E")
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    headers = [ds, copy.deepcopy(ds)]
    headers[1].SOPInstanceUID = generate_uid()
    algorithm = AlgorithmIdentity(name="review-model", version="0.0.1")
    try:
        sr = build_skipped_sr(headers, SkipReason.OUT_OF_SCOPE, out["gate:route-text"][1], algorithm,
                              fallback_datetime=dt.datetime(2026, 1, 1))
        out["skipped"] = str(sr.PatientName)
    except ResultsError as exc:
        out["skipped-error"] = str(exc)
    print("RESULT " + json.dumps(out))
    """
)


def _run() -> tuple[dict[str, object], list[str]]:
    done = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    (result,) = [line for line in lines if line.startswith("RESULT ")]
    return json.loads(result[len("RESULT "):]), [line for line in lines if not line.startswith("RESULT ")]


def test_todays_refusals_and_400s_and_their_log_lines_carry_no_identifying_value():
    out, log = _run()
    leaked = [line for line in log if MARKER in line]
    assert leaked == [], "\n".join(leaked)
    messages = {k: v for k, v in out.items() if k != "skipped"}
    assert not [k for k, v in messages.items() if MARKER in json.dumps(v)], json.dumps(messages, indent=1)
    assert all(json.loads(line) for line in log)  # every log line is the node's JSON, no raw library text

    # the cases did reach today's code: contrast recorded (malformed counts), a child's loose age read
    for case in ("volume-malformed", "volume-multivalued", "route-text", "ingredient-wrong-vr", "dose-explicit-un",
                 "concentration-bad-bytes"):
        assert out[f"gate:{case}"] is not None and "contrast-enhanced" in out[f"gate:{case}"][1], (case, out)
    assert "child" in out["gate:age-loose-child"][1] and out["age:age-loose-child"] == "11.0"
    assert out["age:age-malformed"] == "None" and out["age:age-wrong-vr"] == "None"
    # the padding is dropped; what is not padding is refused, saying where, not what
    assert all(a == "accepted" for a in out["stow:padded"])
    for case in ("text-after-boundary", "too-much-padding", "text-after-padded-delimiter", "bad-header-field",
                 "header-without-lf", "epilogue-part", "truncated"):
        assert all(a.startswith("400 ") for a in out[f"stow:{case}"]), (case, out[f"stow:{case}"])
    # the "not processed" SR was built and carries the trimmed name (it is the patient's record)
    assert out.get("skipped") == f"{MARKER}16^JOHN", out
