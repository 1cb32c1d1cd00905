"""Deterministic UIDs for result objects, so that a retried build or send never creates a duplicate."""

from __future__ import annotations

import json
import re

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from node.results.codes import ResultKind
from node.results.errors import ResultsError

UID_PREFIX = PYDICOM_ROOT_UID
_SCHEME = "pacs-ai-node/result-uid/1"  # bump only if UIDs must change for the same inputs
# The receive path's grammar (node.spool.check_uid): digits and dots. Components with leading zeros break PS3.5 but
# do arrive from real modalities; the node stores such series, so its results must be able to reference them.
_UID_GRAMMAR = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_valid_uid(value: object) -> bool:
    """True for a string of digits and dots (no empty component) of at most 64 characters."""
    return isinstance(value, str) and len(value) <= 64 and _UID_GRAMMAR.fullmatch(value) is not None


def result_uid(
    source_series_uid: str, series_version: int, model_version: str, kind: str | ResultKind
) -> str:
    """Return the UID of a result object (or series, or tracking identifier) derived from its inputs.

    The same (source series UID, series version, model version, kind) always gives the same valid UID
    (≤ 64 characters); changing any one of them gives a different UID. ``kind`` is a `ResultKind` or its value
    (e.g. ``"sr"``, ``"seg-series"``). Raises `ResultsError` naming the bad parameter.
    """
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
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[entropy]))
