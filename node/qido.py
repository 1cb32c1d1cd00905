"""Minimal QIDO-RS over the index: `Query` parses the request's parameters, `find_studies` and `find_series`
answer from the ``series`` table (only series holding at least one instance), as DICOM JSON-ready datasets and
whether more matches lie past the ``limit`` (PS3.18 8.3.4.4: the answer then carries a Warning)."""

from __future__ import annotations

import re
from typing import NamedTuple

import sqlalchemy as sa
from pydicom.dataset import Dataset
from sqlalchemy.engine import Engine
from starlette.datastructures import QueryParams

from node.errors import ReceiveError
from node.schema import series
from node.uids import check_uid

QIDO_MAX_RESULTS = 1000
QIDO_MAX_OFFSET = 1_000_000_000  # far beyond any index this node holds; keeps SQL integers in range
_DIGITS = re.compile(r"[0-9]{1,12}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # no DICOM string VR allows these in a matching value (PS3.5 6.1.3)
STUDY_KEYS = {"StudyInstanceUID": "0020000D", "ModalitiesInStudy": "00080061"}
SERIES_KEYS = {"SeriesInstanceUID": "0020000E", "Modality": "00080060"}


class Found(NamedTuple):
    """A QIDO-RS answer: the matches from ``offset`` on, at most ``limit`` of them, and whether more follow."""

    datasets: list[Dataset]
    more: bool


class Query:
    """QIDO-RS query parameters: the given attribute keys (keyword or tag), ``limit``/``offset``; ``includefield``
    and ``fuzzymatching`` are accepted and ignored; other keys are ignored and named in a Warning header.
    Raises ValueError (→ 400) for a limit/offset that is not plain digits or is over `QIDO_MAX_OFFSET`, a
    malformed UID, or a matching value holding a control character (the value is not echoed)."""

    def __init__(self, params: QueryParams, keys: dict[str, str]) -> None:
        by_tag = {tag: kw for kw, tag in keys.items()}
        self._values: dict[str, list[str]] = {}
        self.ignored: set[str] = set()
        self.limit = QIDO_MAX_RESULTS
        self.offset = 0
        for name, raw in params.multi_items():
            if name == "limit":
                self.limit = min(_non_negative(name, raw), QIDO_MAX_RESULTS)
            elif name == "offset":
                self.offset = _non_negative(name, raw)
            elif name in ("includefield", "fuzzymatching"):
                continue
            elif (kw := name if name in keys else by_tag.get(name.upper())) is not None:
                values = [v.strip() for v in raw.replace("\\", ",").split(",") if v.strip()]
                if kw.endswith("UID"):
                    values = [_check_uid_value(v, kw) for v in values]
                elif any(_CONTROL.search(v) for v in values):  # PostgreSQL refuses a NUL: a 503 "database down"
                    raise ValueError(f"{kw} must not contain control characters")
                self._values.setdefault(kw, []).extend(values)
            else:
                self.ignored.add(name[:64])

    def values(self, keyword: str) -> list[str]:
        return self._values.get(keyword, [])


def _check_uid_value(value: str, keyword: str) -> str:
    try:
        return check_uid(value, keyword)
    except ReceiveError as exc:
        raise ValueError(str(exc)) from exc


def _non_negative(name: str, raw: str) -> int:
    """ASCII digits only, at most `QIDO_MAX_OFFSET`: Python's int() also takes '1_000', ' 7', '+7' and
    non-ASCII digits, and an offset past 2**63 makes the database driver overflow (a 500, not a 400)."""
    if not _DIGITS.fullmatch(raw):
        raise ValueError(f"{name} must be a non-negative integer, not {raw[:32]!r}")
    value = int(raw)
    if value > QIDO_MAX_OFFSET:
        raise ValueError(f"{name} must be <= {QIDO_MAX_OFFSET}, not {raw[:32]}")
    return value


def _modalities(conn: sa.Connection, values: list[str], study: str | None) -> list[str] | None:
    """The modalities that match ``values`` (None: no condition). PS3.4 C.2.2.2.4: in a CS value "*" matches any
    run of characters and "?" any one, case-sensitively ("*" alone: universal matching); SQL's LIKE differs (its
    "%" and "_", case-insensitive on SQLite), so a pattern is matched here against the modalities held (a few)."""
    patterns = [v for v in values if "*" in v or "?" in v]
    if not values or any(set(p) == {"*"} for p in patterns):
        return None
    if not patterns:
        return values
    s = series.c
    held = sa.select(s.modality).where(s.modality.is_not(None), s.instance_count > 0).distinct()
    if study is not None:
        held = held.where(s.study_uid == study)
    wild = [re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in p), re.DOTALL)
            for p in patterns]
    return [*values, *(m for m in conn.execute(held).scalars() if any(w.fullmatch(m) for w in wild))]


def find_studies(engine: Engine, q: Query) -> Found:
    """Studies the node holds (series with at least one instance), as QIDO-RS study results."""
    s = series.c
    stmt = (
        sa.select(s.study_uid, sa.func.count(s.series_uid), sa.func.sum(s.instance_count))
        .where(s.instance_count > 0)
        .group_by(s.study_uid)
        .order_by(s.study_uid)
        .limit(q.limit + 1)  # one more than asked for tells whether more follow
        .offset(q.offset)
    )
    if uids := q.values("StudyInstanceUID"):
        stmt = stmt.where(s.study_uid.in_(uids))
    with engine.connect() as conn:
        if (modalities := _modalities(conn, q.values("ModalitiesInStudy"), None)) is not None:
            having = sa.select(s.study_uid).where(s.modality.in_(modalities), s.instance_count > 0)
            stmt = stmt.where(s.study_uid.in_(having))
        rows = list(conn.execute(stmt))
        more, rows = len(rows) > q.limit, rows[: q.limit]
        mods: dict[str, set[str]] = {}
        if rows:
            pairs = conn.execute(
                sa.select(s.study_uid, s.modality)
                .where(s.study_uid.in_([r[0] for r in rows]), s.instance_count > 0, s.modality.is_not(None))
                .distinct()
            )
            for study_uid, modality in pairs:
                mods.setdefault(study_uid, set()).add(modality)
    out = []
    for study_uid, n_series, n_instances in rows:
        ds = Dataset()
        ds.StudyInstanceUID = study_uid
        ds.ModalitiesInStudy = sorted(mods.get(study_uid, ()))
        ds.NumberOfStudyRelatedSeries = int(n_series)
        ds.NumberOfStudyRelatedInstances = int(n_instances or 0)
        out.append(ds)
    return Found(out, more)


def find_series(engine: Engine, study: str, q: Query) -> Found:
    """The series of ``study`` the node holds, as QIDO-RS series results."""
    s = series.c
    stmt = (
        sa.select(s.series_uid, s.modality, s.instance_count)
        .where(s.study_uid == study, s.instance_count > 0)
        .order_by(s.series_uid)
        .limit(q.limit + 1)
        .offset(q.offset)
    )
    if uids := q.values("SeriesInstanceUID"):
        stmt = stmt.where(s.series_uid.in_(uids))
    with engine.connect() as conn:
        if (modalities := _modalities(conn, q.values("Modality"), study)) is not None:
            stmt = stmt.where(s.modality.in_(modalities))
        rows = list(conn.execute(stmt))
    more, rows = len(rows) > q.limit, rows[: q.limit]
    out = []
    for series_uid, modality, count in rows:
        ds = Dataset()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality or ""
        ds.NumberOfSeriesRelatedInstances = int(count)
        out.append(ds)
    return Found(out, more)


__all__ = [
    "QIDO_MAX_OFFSET", "QIDO_MAX_RESULTS", "SERIES_KEYS", "STUDY_KEYS", "Found", "Query", "find_series", "find_studies",
]
