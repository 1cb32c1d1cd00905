"""DimseSender against a real pynetdicom Storage SCP: a rejection note is stored only after every other object of
its delivery, warning and duplicate statuses count as stored, and a PACS that takes none of the delivery's SOP
classes is a permanent failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from node.config import Destination
from node.senders import NOTE_HELD, DimseSender, PermanentSendError
from tests.ctgen import write_ct_series
from tests.unit.test_senders import delivery


class Scp:
    """A Storage SCP answering ``status(dataset)`` to each C-STORE, recording the SOP Instance UIDs in order."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.status = lambda ds: 0x0000

    def on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        self.received.append(str(ds.SOPInstanceUID))
        return self.status(ds)


@pytest.fixture
def scp() -> Iterator[tuple[Scp, Destination]]:
    pacs = Scp()
    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, pacs.on_store)])
    dest = Destination(name="pacs", kind="dimse", ae_title="PACS", host="127.0.0.1", port=server.server_address[1])
    yield pacs, dest
    server.shutdown()


def uids(paths: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]


def test_a_rejection_note_is_stored_only_after_every_other_object(scp, tmp_path):
    """An IOCM-aware PACS withdraws version 1 on receiving the note: never while version 2 is incomplete."""
    pacs, dest = scp
    paths = delivery(tmp_path / "v2")  # SR, SEG, key-images KOS, rejection note
    sr, seg, key, note = uids(paths)
    pacs.status = lambda ds: 0xA900 if ds.Modality == "SEG" else 0x0000
    with pytest.raises(PermanentSendError, match=f"refused {seg}: status 0xA900; ") as err:
        DimseSender("NODE", 5).send(dest, [paths[3], paths[0], paths[1], paths[2]])  # the note first in the list
    assert pacs.received == [sr, seg, key]  # never the note
    assert str(err.value).endswith(NOTE_HELD)  # the dead letter says the previous version's result stays
    pacs.received = []
    with pytest.raises(PermanentSendError, match=f"refused {seg}: status 0xA900$"):  # nothing held back: no remark
        DimseSender("NODE", 5).send(dest, paths[:3])
    pacs.status, pacs.received = (lambda ds: 0x0000), []
    DimseSender("NODE", 5).send(dest, [paths[3], *paths[:3]])
    assert pacs.received == [sr, seg, key, note]  # the key-images KOS is no withdrawal: it keeps its place


@pytest.mark.parametrize("status", [0x0107, 0x0116, 0x0111, 0x0001, 0xB000])
def test_warning_and_duplicate_statuses_count_as_stored(scp, tmp_path, status):
    """0x0107 and 0x0116 are warnings (PS3.7 C); 0x0111, a duplicate SOP instance, means the PACS holds the node's
    deterministic UID already: stored, with a warning logged."""
    pacs, dest = scp
    files = write_ct_series(tmp_path / "r", slices=2, size=8).paths
    pacs.status = lambda ds: status
    with capture_logs() as logs:
        DimseSender("NODE", 5).send(dest, files)
    assert pacs.received == uids(files)
    duplicates = [e["sop_uid"] for e in logs if e["event"] == "instance_already_stored"]
    assert duplicates == (uids(files) if status == 0x0111 else [])


def test_a_pacs_taking_none_of_the_sop_classes_is_a_permanent_failure(tmp_path):
    ae = AE(ae_title="PACS")
    ae.add_supported_context(MRImageStorage)  # CT is what the delivery holds
    server = ae.start_server(("127.0.0.1", 0), block=False)
    dest = Destination(name="pacs", kind="dimse", ae_title="PACS", host="127.0.0.1", port=server.server_address[1])
    try:
        with pytest.raises(PermanentSendError, match="accepts none of the SOP classes sent: CT Image Storage"):
            DimseSender("NODE", 5).send(dest, write_ct_series(tmp_path / "r", slices=2, size=8).paths)
    finally:
        server.shutdown()
