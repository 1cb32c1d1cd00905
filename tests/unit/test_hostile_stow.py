"""STOW-RS and QIDO-RS against hostile clients (issue "Hostile networks"): oversized and deflate-bomb parts,
endless part headers, too many parts, absurd paging numbers. The app runs over a real ingest stack; the
"stops reading" test goes through the real uvicorn server on loopback with a raw socket as the client."""

from __future__ import annotations

import socket
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian
from structlog.testing import capture_logs

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from starlette.testclient import TestClient

from node import admission, dicomweb, stow
from node.config import NodeConfig
from node.db import create_engine_for, init_schema
from node.dicomweb import create_app
from node.errors import InvalidDatasetError, StoreStatus
from node.http import HealthProbe, HttpServer
from node.index import Index
from node.ingest import Ingestor
from node.metrics import Metrics
from node.spool import Spool
from tests.conftest import free_port
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes

BOUNDARY = "hostile-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
FAILED_SEQ, FAILURE_REASON = "00081198", "00081197"
MAX_INSTANCE = 256 << 10
MAX_INFLATED = 1 << 20


class Node:
    def __init__(self, tmp_path: Path, **node: Any) -> None:
        settings = {"data_dir": str(tmp_path / "data"), "host": "127.0.0.1", "http_port": free_port(),
                    "max_instance_bytes": MAX_INSTANCE, "max_inflated_bytes": MAX_INFLATED, **node}
        self.config = NodeConfig.model_validate({"node": settings})
        self.engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
        init_schema(self.engine)
        self.spool = Spool(self.config.node.spool_dir)
        index = Index(self.engine)
        self.app = create_app(
            self.config, Ingestor(self.spool, index), index,
            health=HealthProbe(self.engine, self.spool.root, lambda: True), metrics=Metrics(), token=None,
        )
        self.client = TestClient(self.app)

    def stow(self, body: bytes) -> httpx.Response:
        return self.client.post("/dicomweb/studies", content=body, headers={"Content-Type": STOW_TYPE})

    def spooled(self) -> list[Path]:
        return sorted(self.spool.root.rglob("*.dcm"))

    def close(self) -> None:
        self.client.close()
        self.engine.dispose()


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    yield n
    n.close()


def part(data: bytes, headers: str = "Content-Type: application/dicom\r\n") -> bytes:
    return f"--{BOUNDARY}\r\n{headers}\r\n".encode() + data + b"\r\n"


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def part10(ds: pydicom.Dataset, dataset: bytes, transfer_syntax: str) -> bytes:
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1411.99"
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + dataset


def test_a_part_over_the_instance_limit_is_413(node, tmp_path):
    big = write_ct_series(tmp_path / "big", slices=1, size=400).paths[0].read_bytes()  # 320 KB > 256 KiB
    small = write_ct_series(tmp_path / "small", slices=1, size=16).paths[0].read_bytes()
    r = node.stow(body(part(small), part(big)))
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert node.spooled() == []  # refused as a whole: the small part before it is not kept either


def test_a_deflate_bomb_part_fails_with_a700_and_is_not_inflated_whole(node, tmp_path):
    path = write_ct_series(tmp_path / "bomb", slices=1, size=16).paths[0]
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 2048
    ds.PixelData = bytes(2048 * 2048 * 2)  # 8 MiB of zeros
    plain = DicomBytesIO()
    plain.is_little_endian, plain.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(plain, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = deflater.compress(plain.getvalue()) + deflater.flush()
    assert len(bomb) < MAX_INSTANCE
    r = node.stow(body(part(part10(ds, bomb, DeflatedExplicitVRLittleEndian))))
    assert r.status_code == 409
    assert r.json()[FAILED_SEQ]["Value"][0][FAILURE_REASON]["Value"] == [StoreStatus.OUT_OF_RESOURCES]
    assert node.spooled() == []
    # the same instance, deflated but small, is stored: the limit is on the inflated size, not on Deflated
    small = pydicom.dcmread(path)
    plain = DicomBytesIO()
    plain.is_little_endian, plain.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(plain, small)
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    ok = deflater.compress(plain.getvalue()) + deflater.flush()
    assert node.stow(body(part(part10(small, ok, DeflatedExplicitVRLittleEndian)))).status_code == 200


def test_large_parts_are_parsed_and_spooled_from_the_body_file(node, tmp_path, monkeypatch):
    monkeypatch.setattr(stow, "IN_MEMORY_PART_BYTES", 1024)  # every part takes the large-part path
    series = write_ct_series(tmp_path / "s", slices=3, size=64)
    plain = pydicom.dcmread(series.paths[2])
    plain_bytes = DicomBytesIO()
    plain_bytes.is_little_endian, plain_bytes.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(plain_bytes, plain)
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = part10(plain, deflater.compress(plain_bytes.getvalue()) + deflater.flush(), DeflatedExplicitVRLittleEndian)
    r = node.stow(body(*(part(p.read_bytes()) for p in series.paths[:2]), part(deflated)))
    assert r.status_code == 200, r.text
    stored = {p.stem: p for p in node.spooled()}
    for path in series.paths[:2]:
        assert dataset_bytes(stored[pydicom.dcmread(path).SOPInstanceUID]) == dataset_bytes(path)
    assert pydicom.dcmread(stored[plain.SOPInstanceUID]).PixelData == plain.PixelData


def test_endless_part_headers_are_400(node):
    # six 3 KB headers: each under python-multipart's own per-line cap, together over the node's per-part cap
    headers = "".join(f"X-Junk-{n}: {'a' * 3000}\r\n" for n in range(6))
    r = node.stow(body(part(b"x", headers=headers)))
    assert r.status_code == 400 and "bytes of headers" in r.json()["error"]
    r = node.stow(body(part(b"x", headers="X-Junk: " + "a" * (1 << 20) + "\r\n")))
    assert r.status_code == 400


def test_too_many_parts_are_413(node, monkeypatch):
    monkeypatch.setattr(stow, "MAX_PARTS", 3)
    r = node.stow(body(*[part(b"x")] * 4))
    assert r.status_code == 413 and "parts" in r.json()["error"]


def test_the_study_in_the_url_is_checked_on_the_capped_parse(node, tmp_path):
    series = write_ct_series(tmp_path / "s", slices=1, size=16)
    r = node.client.post(
        "/dicomweb/studies/1.2.3.4", content=body(part(series.paths[0].read_bytes())),
        headers={"Content-Type": STOW_TYPE},
    )
    assert r.status_code == 409
    assert r.json()[FAILED_SEQ]["Value"][0][FAILURE_REASON]["Value"] == [StoreStatus.DATASET_MISMATCH]
    assert dataset_bytes(series.paths[0])  # (the file itself is fine)


def test_an_oversized_part_is_refused_before_the_rest_of_the_body_is_read(tmp_path):
    """Through uvicorn: a client announcing a 1 GiB body gets its 413 while still sending, after at most a few
    MB (socket buffers), and the node held nothing of it."""
    n = Node(tmp_path)
    server = HttpServer(n.config, n.app)
    server.start()
    try:
        head = (
            f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {STOW_TYPE}\r\n"
            f"Content-Length: {1 << 30}\r\n\r\n"
        ).encode() + part(b"")[:-2]
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(head)
        sock.settimeout(0.05)
        chunk, sent, answer = bytes(64 << 10), 0, b""
        deadline = time.monotonic() + 20
        while not answer.endswith(b"}") and time.monotonic() < deadline:
            try:
                answer += sock.recv(65536)
                continue
            except TimeoutError:
                pass
            try:
                sent += sock.send(chunk)
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.close()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 32 << 20, f"the node read {sent} bytes of an oversized part before refusing it"
        assert n.spooled() == []
        print(f"413 after {sent >> 10} KiB sent of a 1 GiB body")
    finally:
        server.stop()
        n.close()


@pytest.mark.parametrize(
    "params",
    [{"offset": "1e23"}, {"offset": str(10**23)}, {"offset": "1_000"}, {"offset": " 5"}, {"offset": "+5"},
     {"offset": "\u0663"}, {"limit": str(2**64)}, {"limit": ""}, {"offset": str(10**9 + 1)}],
    ids=["1e23", "10^23", "underscore", "space", "plus", "arabic-digit", "limit-2^64", "empty", "just-over"],
)
def test_absurd_paging_numbers_are_400(node, params):
    r = node.client.get("/dicomweb/studies", params=params)
    assert r.status_code == 400, r.text


def test_plain_paging_numbers_still_work(node):
    for params in ({"offset": "0"}, {"offset": str(10**9)}, {"limit": "5", "offset": "7"}):
        assert node.client.get("/dicomweb/studies", params=params).status_code == 200


def test_a_body_arriving_as_the_disk_reaches_its_reserve_is_dropped_with_503(node, tmp_path, monkeypatch):
    """Admission judges a STOW-RS request before its body and each part after it; a body spilled to the data disk
    re-checks the free space as it arrives, so bodies on many connections cannot fill the disk under the spool and
    the index: below [admission]'s hard reserve it is dropped (503, Retry-After, nothing stored or left behind).
    With room again, the same request is stored."""
    monkeypatch.setattr(dicomweb, "BODY_CHECK_BYTES", 16 << 10)
    free = {"bytes": 100 << 20}  # 100 MiB free of 100 GiB: below the default reserve (512 MiB, 1 %)
    monkeypatch.setattr(admission, "statvfs_usage", lambda path: (free["bytes"], 100 << 30))
    series = write_ct_series(tmp_path / "s", slices=3, size=64)  # ~8 KB each: the body passes 16 KiB
    request = body(*(part(p.read_bytes()) for p in series.paths))
    r = node.stow(request)
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == str(node.config.admission.retry_after_seconds)
    assert r.json()["reason"] == "disk_reserve"
    assert node.spooled() == []
    assert list((node.config.node.data_dir / "incoming").iterdir()) == []
    small = body(part(write_ct_series(tmp_path / "one", slices=1, size=16).paths[0].read_bytes()))
    assert len(small) < 16 << 10 and node.stow(small).status_code == 200  # never checked: under the interval
    free["bytes"] = 50 << 30
    assert node.stow(request).status_code == 200
    assert len(node.spooled()) == 4


def test_a_file_meta_element_is_never_read_whole(tmp_path):
    """pydicom reads every group 0002 value whole: a part declaring a 512 MiB (0002,0102) cost 512 MiB of memory,
    ~1 GiB per part in flight at the default max_instance_bytes (found by review). Only the first 64 KiB after the
    preamble are read for the file meta; more is 0xC000."""
    import struct
    import tracemalloc

    from node.ingest import FileSpan

    size = 8 << 20
    source = pydicom.dcmread(write_ct_series(tmp_path / "m", slices=1, size=8).paths[0])
    meta = part10(source, b"", "1.2.840.10008.1.2.1")
    bomb = meta + struct.pack("<HH2sHL", 0x0002, 0x0102, b"OB", 0, size) + bytes(size)
    (tmp_path / "part").write_bytes(bomb)
    with open(tmp_path / "part", "rb") as f:
        tracemalloc.start()
        try:
            with pytest.raises(InvalidDatasetError, match="file meta runs past"):
                stow.split_part10(FileSpan(f, 0, len(bomb)))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 1 << 20, f"{peak >> 20} MiB"


def test_parts_with_many_headers_and_many_refusals(node, tmp_path):
    """A part may carry MIME-Version, Content-ID, Content-Location, Content-Description and X- headers: the
    parser's default of 8 header fields refused the whole request (400). And 100 unparseable parts log 20 lines,
    not one each (100,000 parts wrote 36 MB of log; found by review)."""
    good = write_ct_series(tmp_path / "g", slices=1, size=16).paths[0].read_bytes()
    headers = "Content-Type: application/dicom\r\n" + "".join(f"X-Note-{i}: {i}\r\n" for i in range(11))
    r = node.stow(body(part(good, headers)))
    assert r.status_code == 200, r.text
    with capture_logs() as logs:
        r = node.stow(body(*[part(b"not dicom") for _ in range(100)]))
    assert r.status_code == 409 and len(r.json()[FAILED_SEQ]["Value"]) == 100
    assert len([e for e in logs if e["event"] == "instance_refused"]) == dicomweb.LOGGED_PART_REFUSALS


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_a_body_going_on_after_its_closing_boundary_is_400(tmp_path, chunk):
    """Two bodies concatenated: the parser dropped everything after the first closing boundary unread, so the second
    instance was neither stored nor named in the answer, which said 200, "stored all" (found by review). A closing
    boundary followed by a plain epilogue stays fine. Fed in small chunks too: a delimiter may straddle two."""
    files = write_ct_series(tmp_path / "s", slices=2, size=16).paths
    one, two = (p.read_bytes() for p in files)
    sink = __import__("io").BytesIO()

    def parse(data: bytes) -> list[stow.Part]:
        reader = stow.BodyReader(BOUNDARY, sink, MAX_INSTANCE)
        for i in range(0, len(data), chunk):
            reader.write(data[i:i + chunk])
        reader.write(b"")  # the server's stream may end with an empty chunk
        return reader.finish()

    assert len(parse(body(part(one)) + b"an epilogue, as RFC 2046 allows\r\n")) == 1
    with pytest.raises(stow.Refused) as err:
        parse(body(part(one)) + body(part(two)))
    assert err.value.http_status == 400 and "after its closing boundary" in err.value.reason


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_a_preamble_before_the_first_boundary_is_skipped(node, tmp_path, chunk):
    """RFC 2046 5.1.1: a multipart body may open with a preamble that readers ignore. python-multipart refused one
    (400, 'Expected boundary character'), so a client that writes one could not store anything. A boundary string
    inside the preamble but not at the start of a line is text; a preamble that never reaches a boundary is 400."""
    files = write_ct_series(tmp_path / "s", slices=2, size=16).paths
    one, two = (p.read_bytes() for p in files)
    preamble = f"This is a multi-part message in MIME format; not --{BOUNDARY} yet.\r\n\r\n".encode()

    def parse(data: bytes) -> list[stow.Part]:
        reader = stow.BodyReader(BOUNDARY, __import__("io").BytesIO(), MAX_INSTANCE)
        for i in range(0, len(data), chunk):
            reader.write(data[i:i + chunk])
        reader.write(b"")
        return reader.finish()

    assert len(parse(preamble + body(part(one), part(two)))) == 2
    with pytest.raises(stow.Refused) as err:
        parse(b"x" * (stow.MAX_PREAMBLE_BYTES + 10) + body(part(one)))
    assert err.value.http_status == 400 and "no boundary" in err.value.reason
    with pytest.raises(stow.Refused) as err:
        parse(b"")
    assert err.value.http_status == 400
    r = node.stow(preamble + body(part(one), part(two)))
    assert r.status_code == 200, r.text
    assert len(node.spooled()) == 2


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_transport_padding_after_a_boundary_is_ignored(node, tmp_path, chunk):
    """RFC 2046 5.1.1: a boundary delimiter line may end in transport padding (spaces, tabs) that 'receivers MUST be
    able to handle'. python-multipart refused it (400, 'Did not find CR at end of boundary'), so a body that passed
    through a transport adding it stored nothing. Now ignored, after any boundary (the first, between parts, the
    closing one), at any split of the body into chunks; padding longer than `stow.MAX_PADDING_BYTES`, or text
    after a boundary on its line, is still malformed (400). Part payloads are untouched, spaces and all."""
    files = write_ct_series(tmp_path / "s", slices=2, size=16).paths
    one, two = (p.read_bytes() for p in files)

    def padded(padding: bytes, *parts: bytes) -> bytes:
        head = b"--" + BOUNDARY.encode()
        return (b"".join(head + padding + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
                + head + b"--" + padding + b"\r\n")

    def parse(data: bytes) -> list[bytes]:
        sink = __import__("io").BytesIO()
        reader = stow.BodyReader(BOUNDARY, sink, MAX_INSTANCE)
        for i in range(0, len(data), chunk):
            reader.write(data[i:i + chunk])
        return [sink.getvalue()[p.offset:p.offset + p.length] for p in reader.finish()]

    assert parse(padded(b" \t  ", one, two)) == [one, two]
    assert parse(padded(b" ", one)) == [one]
    tricky = b"payload --" + BOUNDARY.encode() + b"  \r\n mid-line, not a delimiter \t\r\n"  # not at a line start
    assert parse(padded(b"\t", tricky, one)) == [tricky, one]
    if chunk == 1 << 20:  # one call each, to keep the slow byte-by-byte runs to the cases above
        for bad in (b" " * (stow.MAX_PADDING_BYTES + 1), b"  x"):
            with pytest.raises(stow.Refused) as err:
                parse(padded(bad, one))
            assert err.value.http_status == 400
    r = node.stow(padded(b"  ", one, two))
    assert r.status_code == 200, r.text
    assert len(node.spooled()) == 2
