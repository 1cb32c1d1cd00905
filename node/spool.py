"""The spool: durable files for received instances, at paths built only from validated UIDs.

`Spool.write(study_uid, series_uid, sop_uid, chunks)` writes a DICOM Part 10 file atomically — temp name in the
destination folder, fsync, ``os.replace``, fsync of the folder (and of a newly created parent) — and returns where
it lives. Errors: `InvalidUIDError` (`node.uids.check_uid`: a UID that is not digits and dots, ≤ 64 chars — never
used as a path), `SpoolFullError` (ENOSPC/EDQUOT → C-STORE 0xA700), `StoreFailedError` (any other OS error → 0xA701).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from node.errors import SpoolFullError, StoreFailedError
from node.uids import check_uid


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    size: int
    sha256: str


class Spool:
    """Files under ``root/<study>/<series>/<sop>.dcm``; the root must already be writable."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The final path for an instance; raises `InvalidUIDError` for anything that is not a UID."""
        study = check_uid(study_uid, "StudyInstanceUID")
        series = check_uid(series_uid, "SeriesInstanceUID")
        sop = check_uid(sop_uid, "SOPInstanceUID")
        return self.root / study / series / f"{sop}.dcm"

    def write(self, study_uid: str, series_uid: str, sop_uid: str, chunks: Iterable[bytes]) -> SpooledFile:
        """Write ``chunks`` durably as the instance's file, replacing an older copy atomically."""
        final = self.path_for(study_uid, series_uid, sop_uid)
        folder = final.parent
        digest = hashlib.sha256()
        size = 0
        tmp = folder / f".{final.name}.{secrets.token_hex(6)}.tmp"
        try:
            new_dirs = self._make_dirs(folder)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    digest.update(chunk)
                    size += len(chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            for d in [folder, *new_dirs]:
                _fsync_dir(d)
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(f"spool is full writing {sop_uid}: {exc.strerror}") from exc
            raise StoreFailedError(f"spool write failed for {sop_uid}: {exc.strerror or exc}") from exc
        return SpooledFile(path=final, size=size, sha256=digest.hexdigest())

    def _make_dirs(self, folder: Path) -> list[Path]:
        """Create missing folders below the root; return the parents whose entries changed (to fsync)."""
        changed: list[Path] = []
        for d in (folder.parent, folder):
            if not d.is_dir():
                try:
                    d.mkdir()
                except FileExistsError:
                    continue
                changed.append(d.parent)
        return changed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
