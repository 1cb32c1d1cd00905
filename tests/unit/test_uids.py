"""UIDs: what arrives must be digits and dots, at most 64 characters; anything else is refused with 0xA900."""

from __future__ import annotations

import pytest

from node.errors import InvalidUIDError, StoreStatus
from node.uids import check_uid


@pytest.mark.parametrize("uid", ["1.2.3", "0", "1.2.840.10008.5.1.4.1.1.2", "9" * 64])
def test_valid_uids(uid):
    assert check_uid(uid, "X") == uid


@pytest.mark.parametrize(
    "uid", ["", None, "1.2/3", "../1.2", "1..2", ".1", "1.", "1.2.a", "9" * 65, "1.2 3", "1.2\\3", "/etc/passwd",
            "1.2.3\n", "1.2.3\n\x00"]  # a trailing newline: "$" in a regex would have let it through into a path
)
def test_invalid_uids_refused_with_a900(uid):
    with pytest.raises(InvalidUIDError) as err:
        check_uid(uid, "SOPInstanceUID")
    assert err.value.status == StoreStatus.DATASET_MISMATCH
    assert "SOPInstanceUID" in str(err.value)


def test_padding_is_removed():
    assert check_uid("1.2.3\x00", "X") == "1.2.3"
    assert check_uid("1.2.3 ", "X") == "1.2.3"
