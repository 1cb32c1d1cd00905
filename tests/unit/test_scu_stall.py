"""The DIMSE SCU against a peer that stops reading mid-transfer (a hung PACS whose connection stays open): the
send must end with the peer's timeout, not block its thread for ever (node.scu: a socket timeout once connected)."""

from __future__ import annotations

import threading
import time

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from node.errors import SendError
from node.scu import Peer, send_datasets

PIXELS = 48 * 1024 * 1024  # well past what the kernel buffers on loopback: the sender must block


def ct(rows: int = 4096, columns: int = 6144) -> Dataset:
    """A minimal CT image of ``rows`` x ``columns`` 16-bit zeros (by default `PIXELS` bytes), fresh UIDs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, columns, 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = bytes(2 * rows * columns)
    return ds


@pytest.fixture
def stalled_scp():
    """A pynetdicom Storage SCP whose connection thread stops reading at the first P-DATA PDU until released."""
    release = threading.Event()

    def stall(event: evt.Event) -> None:
        if event.data[:1] == b"\x04":  # P-DATA-TF: the C-STORE has begun
            release.wait(60)

    ae = AE(ae_title="HUNG")
    ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 1  # once released, its side ends at once
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_DATA_RECV, stall), (evt.EVT_C_STORE, lambda event: 0x0000)])
    yield server.server_address[1]
    release.set()
    server.shutdown()


def test_a_peer_that_stops_reading_ends_the_send_with_the_timeout(stalled_scp: int) -> None:
    peer = Peer("127.0.0.1", stalled_scp, called_ae="HUNG", timeout=2.0)
    outcome: list[object] = []

    def send() -> None:
        try:
            outcome.append(send_datasets(peer, [ct()]))
        except SendError as exc:
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the send is still blocked on a peer that stopped reading"
    assert time.monotonic() - started < 20
    (result,) = outcome
    assert isinstance(result, SendError) or not any(r.ok for r in result)  # not stored: the dispatcher retries
