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


@settings(QUICK)
@given(payloads=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r\n--" + BOUNDARY.encode(), b"")),
                         min_size=1, max_size=4),
       paddings=st.lists(st.sampled_from([b"", b" ", b"\t", b" \t ", b"  "]), min_size=5, max_size=5),
       cuts=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=40))
@example(payloads=[b" --" + BOUNDARY.encode() + b" \r\n", b"\r\n\r\n--"], paddings=[b" "] * 5, cuts=[1])
def test_transport_padding_is_dropped_and_nothing_else_at_any_split(payloads, paddings, cuts):
    """node.stow._TransportPadding: a body whose boundary lines carry padding reads back exactly as the same body
    without it, whatever its payloads (spaces, CRs, dashes, boundary text not at a line start) and however the
    body is split into chunks; a body without padding passes through unchanged."""
    from node.stow import _TransportPadding

    dash = b"--" + BOUNDARY.encode()

    def body(pad: list[bytes]) -> bytes:
        parts = b"".join(dash + pad[i % 4] + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                         for i, p in enumerate(payloads))
        return parts + dash + b"--" + pad[4] + b"\r\n"

    def filtered(data: bytes) -> bytes:
        f, out, i, k = _TransportPadding(dash), b"", 0, 0
        while i < len(data):
            n = cuts[k % len(cuts)]
            out += f.feed(data[i:i + n])
            i, k = i + n, k + 1
        return out + f.feed(b"", final=True)

    plain = body([b""] * 5)
    assert filtered(plain) == plain
    # the closing boundary's padding is epilogue to the parser (kept); every other boundary's is dropped
    assert filtered(body(paddings)) == body([b""] * 4 + [paddings[4]])
