"""Fuzzing the STOW-RS multipart reader (node.stow, behind node.dicomweb) with garbled bodies, boundaries, part
headers and request content types, built from real Part 10 files (a tests/ctgen CT slice, pydicom's
CT_small.dcm). The app runs over a real ingest stack; every request must get one of the documented statuses (200,
202, 400, 409, 413, 415) — never a 500 or an exception."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from tests.ctgen import write_ct_series
from tests.fuzzing import LONG, QUICK, mutated
from tests.unit.test_hostile_stow import Node

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
DOCUMENTED = {200, 202, 400, 409, 413, 415}
BOUNDARY = "fuzz-boundary"


@functools.cache
def files() -> list[bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        ct = write_ct_series(Path(tmp), slices=2, size=16, seed=9).paths
        found = get_testdata_file("CT_small.dcm")
        assert found is not None
        return [p.read_bytes() for p in ct] + [Path(found).read_bytes()]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("fuzz-stow"))
    yield n
    n.close()


def content_types() -> st.SearchStrategy[str | None]:
    good = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    return st.one_of(
        st.just(good),
        st.just(good.replace(BOUNDARY, f'"{BOUNDARY}"')),
        st.sampled_from([
            "multipart/related", 'multipart/related; type="application/dicom"', "application/dicom",
            f"multipart/form-data; boundary={BOUNDARY}", f'multipart/related; type="image/jpeg"; boundary={BOUNDARY}',
            'multipart/related; type="application/dicom"; boundary=', f"multipart/related; boundary={BOUNDARY}",
        ]),
        st.none(),
        st.text(max_size=80).map(lambda t: t.encode("latin-1", "replace").decode("latin-1")),
        st.builds(lambda b: f'multipart/related; type="application/dicom"; boundary={b}',
                  st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=80)),
    )


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(st.sampled_from(files()), min_size=0, max_size=3))
    headers = draw(st.sampled_from([
        "Content-Type: application/dicom\r\n", "", "Content-Type: application/json\r\n",
        "Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n", "Garbage\r\n",
    ]))
    body = b"".join(f"--{BOUNDARY}\r\n{headers}\r\n".encode() + p + b"\r\n" for p in parts)
    body += f"--{BOUNDARY}--\r\n".encode()
    return draw(st.one_of(st.just(body), mutated(body, hot=len(body))))


def _fuzz(node: Node, content_type: str | None, body: bytes) -> None:
    headers = {"Content-Type": content_type.encode("latin-1")} if content_type is not None else {}
    response = node.client.post("/dicomweb/studies", content=body, headers=headers)
    assert response.status_code in DOCUMENTED, (response.status_code, response.text[:300])


_given = given(content_type=content_types(), body=bodies())
test_garbled_stow_requests_get_a_documented_status = example(
    content_type=f'multipart/related; type="application/dicom"; boundary={BOUNDARY}', body=b""
)(settings(QUICK, max_examples=600)(_given(_fuzz)))
test_garbled_stow_requests_long = pytest.mark.slow(settings(LONG, max_examples=5000)(_given(_fuzz)))
