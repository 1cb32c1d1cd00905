"""The building blocks every config section uses: the frozen model base, AE titles, ports, UID roots, loopback."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
)

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}\Z")  # default character repertoire, no backslash


def _check_ae_title(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash, not blank)")
    if value != value.strip():
        raise ValueError(f"{value!r} has leading or trailing spaces; AE titles are compared without them")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]

UID_ROOT_MAX_LENGTH = 32  # node.results.uids.MAX_ROOT_LENGTH: leaves >= 32 hash digits in a 64-character UID
_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.?\Z")  # PS3.5 9.1: no leading zeros


def _check_uid_root(value: str) -> str:
    """'' (pydicom's root) or an organisation's UID root, returned with its trailing dot."""
    if not value:
        return value
    root = value if value.endswith(".") else value + "."
    if not _UID_ROOT_RE.match(value) or len(root) > UID_ROOT_MAX_LENGTH:
        raise ValueError(
            f"{value[:80]!r} is not a UID root: digits and dots, no component with a leading zero, at most "
            f"{UID_ROOT_MAX_LENGTH} characters with the trailing dot (e.g. '1.2.826.0.1.3680043.10.999.')"
        )
    return root


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")



def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable only from this machine ("localhost", 127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # wildcards ("", "0.0.0.0", "::") and names other than localhost may be reachable

