"""Deterministic UIDs for result objects, so that a retried build or send never creates a duplicate."""

from __future__ import annotations

import json
import re

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from node.results.codes import ResultKind
from node.results.errors import ResultsError

UID_PREFIX = PYDICOM_ROOT_UID  # the default root; a site sets its own (`AlgorithmIdentity.uid_root`)
MAX_ROOT_LENGTH = 32  # a longer root leaves too few hash digits in a 64-character UID
_SCHEME = "pacs-ai-node/result-uid/1"  # bump only if UIDs must change for the same inputs
# The receive path's grammar (node.uids.check_uid): digits and dots. Components with leading zeros break PS3.5 but
# do arrive from real modalities; the node stores such series, so its results must be able to reference them.
_UID_GRAMMAR = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_valid_uid(value: object) -> bool:
    """True for a string of digits and dots (no empty component) of at most 64 characters."""
    return isinstance(value, str) and len(value) <= 64 and _UID_GRAMMAR.fullmatch(value) is not None


def check_root(root: object, name: str = "root") -> str:
    """Return ``root`` if it is a UID root: a valid UID plus a trailing dot, at most `MAX_ROOT_LENGTH`
    characters. Raises `ResultsError` naming ``name``."""
    if not (isinstance(root, str) and root.endswith(".") and is_valid_uid(root[:-1]) and len(root) <= MAX_ROOT_LENGTH):
        raise ResultsError(f"{name} must be a UID root: digits and dots ending in '.', at most {MAX_ROOT_LENGTH} characters")
    return root


def result_uid(
    source_series_uid: str, series_version: int, model_version: str, kind: str | ResultKind, root: str = UID_PREFIX
) -> str:
    """Return the UID of a result object (or series, or tracking identifier) derived from its inputs.

    The same (source series UID, series version, model version, kind) always gives the same valid UID
    (≤ 64 characters) under ``root``; changing any one of them gives a different UID. ``kind`` is a `ResultKind`
    or its value (e.g. ``"sr"``, ``"seg-series"``). Raises `ResultsError` naming the bad parameter.
    """
    check_root(root)
    if not is_valid_uid(source_series_uid):
        raise ResultsError("source_series_uid is not a valid UID")
    if isinstance(series_version, bool) or not isinstance(series_version, int) or series_version < 1:
        raise ResultsError(f"series_version must be an int >= 1, got {series_version!r}")
    if not isinstance(model_version, str) or not model_version.strip():
        raise ResultsError("model_version must be a non-empty string")
    try:
        kind_value = ResultKind(kind).value
    except ValueError as exc:
        allowed = ", ".join(k.value for k in ResultKind)
        raise ResultsError(f"kind {kind!r} is not one of: {allowed}") from exc
    # One JSON-encoded entropy source: pydicom concatenates sources, so separate ones could collide.
    entropy = json.dumps([_SCHEME, source_series_uid, series_version, model_version, kind_value])
    return str(generate_uid(prefix=root, entropy_srcs=[entropy]))
