"""UID validation for what arrives (C-STORE, STOW-RS, QIDO-RS query keys): digits and dots, at most 64 characters.

`check_uid(value, name)` is the one check; the spool builds paths only from UIDs it passed, so a value that is not
a UID never becomes a path. `node.results.uids` makes the node's own UIDs to the same grammar.
"""

from __future__ import annotations

import re

from node.errors import InvalidUIDError

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")  # used with fullmatch: "$" would let a trailing "\n" through


def check_uid(value: object, name: str) -> str:
    """Return ``value`` as a UID string (trailing NUL/space padding removed), or raise `InvalidUIDError` (C-STORE
    0xA900) naming the attribute ``name``."""
    if value is None or value == "":
        raise InvalidUIDError(f"{name} is missing")
    text = str(value).rstrip("\x00 ")
    if len(text) > 64 or not _UID_RE.fullmatch(text):
        shown = text[:80].encode("ascii", "backslashreplace").decode()
        raise InvalidUIDError(f"{name} is not a valid UID: {shown!r}")
    return text
