"""The spool: durable files for received instances, at paths built only from validated UIDs.

`Spool.write(study_uid, series_uid, sop_uid, chunks)` writes a DICOM Part 10 file atomically — temp name in the
destination folder, fdatasync, ``os.replace``, fsync of the folder (and of a newly created parent) — and returns
where it lives. With ``sync_dir=False`` the caller takes over the folder's fsync (`Spool.sync_dirs`): the group
commit (`node.ingest`) syncs each folder once for all the files a batch renamed into it, before anything in the
batch is indexed or acknowledged. Errors: `InvalidUIDError` (`node.uids.check_uid`: a UID that is not digits and dots, ≤ 64 chars — never
used as a path), `SpoolFullError` (ENOSPC/EDQUOT → C-STORE 0xA700), `StoreFailedError` (any other OS error → 0xA701).

The root is the spool it was when the node started, or writes are refused with `StoreFailedError` (0xA701;
``spool_root_lost`` logged once, `/readyz` not ready): a spool volume unmounted under the running node (NFS/CephFS
mount lost, autofs expiry, ``umount -l``) leaves its bare mount point on the disk below, where files written would
be hidden once the volume is back and their index rows would name files no one can read; another volume mounted in
its place (a fresh one, another node's) is not this spool either. What names the spool is its marker, `MARKER` in
the root: a symbolic link whose target is a random id (a file holding it where the file system has no symbolic
links), made atomically at the spool's first start — a spool from before markers gets one at its first start with
them, its files being the node's — and only if no other process made it first (several listeners sharing one root
all read the same id). Device and inode numbers are not used: a volume that comes back under a new device number
(re-attached block device, NFS/CephFS remount) is the same spool, and every ext4/XFS/tmpfs root has the same inode.
Checked when a write makes its series' folder and otherwise at most every `ROOT_CHECK_SECONDS`: one ``readlink``,
~4 µs on a 2-core VM (the two ``stat`` calls it replaces: ~6 µs there); a write in between pays one clock read,
~0.25 µs. It recovers by itself as soon as the marker reads right again (``spool_root_back``). A marker removed by hand makes the node refuse writes until it is put back or the
node restarts (and marks the root anew). A root without a marker is marked only when the index holds no files in
it or some of them are there (``indexed_files``, looked at once): a node started before its spool volume is mounted
refuses writes until it is, rather than marking the bare mount point.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import math
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.errors import DatabaseError, SpoolFullError, StoreFailedError
from node.logs import get_logger
from node.uids import check_uid

ROOT_CHECK_SECONDS = 1.0  # a write into a folder already made re-checks the root's identity at most this often
MARKER = ".pacsnode-spool-id"  # in the root: the spool's id (module docstring)
_NO_SYMLINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})  # then a file holds the id


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    size: int  # of the whole file
    sha256: str  # of the dataset bytes only (`Spool.write`)
    staged: Path | None = None  # written here, not yet at ``path`` (which held a file): `Spool.place` / `discard`


def dataset_digest(data: bytes) -> str | None:
    """The sha256 `Spool.write` records for a spooled file's bytes: of its data set, after the preamble and the
    file meta (whose group length says where it ends); None for bytes that are not such a Part 10 file."""
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        return None
    return hashlib.sha256(memoryview(data)[144 + int.from_bytes(data[140:144], "little"):]).hexdigest()


class Spool:
    """Files under ``root/<study>/<series>/<sop>.dcm``; the root is made if missing, and must be writable. Its
    marker is read (made if missing) here; a root that cannot be read or marked now is refused (logged) until it
    can. ``clock`` (monotonic) is a seam for tests."""

    def __init__(self, root: Path, spool_id: str | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 indexed_files: Callable[[], Sequence[Path]] | None = None) -> None:
        self.root = Path(root)
        # Some files the index holds in this root (node.index.Index.sample_files), asked once before a root without
        # a marker is marked: when there are some and none of them is there, it is not the spool (module docstring).
        self._indexed_files = indexed_files
        self._expected: Sequence[Path] | None = None
        self.spool_id = spool_id  # set: the index records paths relative to root under this id (node.spools)
        self.root.mkdir(parents=True, exist_ok=True)
        self._synced: set[Path] = set()  # folders whose own entry (and their parent's) is known durable
        self._clock = clock
        self._marker: str | None = None  # the id in the root's marker, once read or made (normally here)
        self._lost: str | None = None  # why the root is not the one started on, while it is not
        self._root_ok_until = clock() + ROOT_CHECK_SECONDS if self.root_problem() is None else -math.inf

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The final path for an instance; raises `InvalidUIDError` for anything that is not a UID."""
        study = check_uid(study_uid, "StudyInstanceUID")
        series = check_uid(series_uid, "SeriesInstanceUID")
        sop = check_uid(sop_uid, "SOPInstanceUID")
        return self.root / study / series / f"{sop}.dcm"

    def write(self, study_uid: str, series_uid: str, sop_uid: str, chunks: Iterable[bytes], *,
              header: bytes = b"", sync_dir: bool = True, stage_replacement: bool = False) -> SpooledFile:
        """Write ``header`` and then ``chunks`` durably as the instance's file, replacing an older copy atomically;
        the sha256 returned covers ``chunks`` only (the dataset as sent, without the preamble and file meta the
        node writes, which name the sending AE: the same instance from another sender hashes the same). With
        ``sync_dir=False`` the rename is durable only once the caller has passed the file's folder to
        `sync_dirs` (folders this call created are synced here either way). With ``stage_replacement`` a file
        already at the path is not replaced yet: the new one stays under its temporary name (``staged``) until
        the caller, its index row committed, calls `place` (or `discard` when the commit failed) — so an
        acknowledged instance is never overwritten by a re-send that is then refused."""
        final = self.path_for(study_uid, series_uid, sop_uid)
        folder = final.parent
        digest = hashlib.sha256()
        size = 0
        tmp = folder / f".{final.name}.{secrets.token_hex(6)}.tmp"
        self._check_root(force=folder not in self._synced)  # before a folder is made: it may be a bare mount point
        try:
            new_dirs = self._make_dirs(folder)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            except FileNotFoundError:  # a folder remembered as made was removed since (retention, another host)
                self._synced.discard(folder)
                self._check_root(force=True)  # or the volume under the root went away
                new_dirs = self._make_dirs(folder)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for i, chunk in enumerate(itertools.chain([header], chunks)):
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    if i:  # not the header
                        digest.update(chunk)
                    size += len(chunk)
                # fdatasync: the data and what is needed to read it back (size, blocks), without the times.
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if stage_replacement and os.path.lexists(final):
                return SpooledFile(path=final, size=size, sha256=digest.hexdigest(), staged=tmp)
            os.replace(tmp, final)
            for d in [folder, *new_dirs] if sync_dir else new_dirs:
                _fsync_dir(d)
            if new_dirs:
                if len(self._synced) >= self._SYNCED_MAX:
                    self._synced.clear()
                self._synced.add(folder)
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(f"spool is full writing {sop_uid}: {exc.strerror}") from exc
            raise StoreFailedError(f"spool write failed for {sop_uid}: {exc.strerror or exc}") from exc
        return SpooledFile(path=final, size=size, sha256=digest.hexdigest())

    @staticmethod
    def place(spooled: SpooledFile) -> None:
        """Move a staged file to its path, durably (the folder fsync'd). Raises like `write`."""
        if spooled.staged is None:
            return
        try:
            os.replace(spooled.staged, spooled.path)
            _fsync_dir(spooled.path.parent)
        except OSError as exc:
            raise StoreFailedError(f"spool replace failed for {spooled.path.stem}: {exc.strerror or exc}") from exc

    @staticmethod
    def discard(spooled: SpooledFile) -> None:
        """Drop a staged file (its row was not committed); the file at its path stays as it was."""
        if spooled.staged is not None:
            _unlink_quietly(spooled.staged)

    def key(self, path: Path) -> str:
        """What the index records as the file's path: relative to the root when this spool has an id (a reader
        on another host resolves it through node.spools), else absolute."""
        return Path(path).relative_to(self.root).as_posix() if self.spool_id is not None else str(path)

    @staticmethod
    def sync_dirs(folders: Iterable[Path]) -> None:
        """fsync each folder once: every rename into it before this call is then durable. Raises `SpoolFullError`
        or `StoreFailedError` like `write`."""
        for folder in dict.fromkeys(folders):
            try:
                _fsync_dir(folder)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SpoolFullError(f"spool is full syncing a folder: {exc.strerror}") from exc
                raise StoreFailedError(f"spool folder sync failed: {exc.strerror or exc}") from exc

    def root_problem(self) -> str | None:
        """Check the root now: None while its marker holds the id read (or made) at start, else why not; logs
        each change (``spool_root_lost`` / ``spool_root_back``)."""
        problem = self._judge()
        if problem != self._lost:
            log = get_logger(component="spool", root=str(self.root))
            if problem is not None:
                log.error("spool_root_lost", problem=problem)
            else:
                log.info("spool_root_back")
            self._lost = problem
        return problem

    def _check_root(self, *, force: bool) -> None:
        """Raise `StoreFailedError` (0xA701) when the root is not the one started on; checked when ``force`` and
        at most every `ROOT_CHECK_SECONDS` otherwise (a failing check is repeated at each write)."""
        now = self._clock()
        if not force and now < self._root_ok_until:
            return
        problem = self.root_problem()
        if problem is not None:
            self._root_ok_until = -math.inf
            raise StoreFailedError(f"{problem}; nothing written")
        self._root_ok_until = now + ROOT_CHECK_SECONDS

    def _judge(self) -> str | None:
        try:
            if self._marker is None:  # at start, or the root could not be read then
                if (unmarked := self._unmarked_problem()) is not None:
                    return unmarked
                self._marker = claim_marker(self.root)
                return None
            found = read_marker(self.root)
        except OSError as exc:
            return f"spool root {self.root} cannot be read or marked ({MARKER}): {exc.strerror or exc}"
        if found == self._marker:
            return None
        what = f"no {MARKER}" if found is None else f"{MARKER} {found[:40]!r}, not {self._marker!r}"
        return (f"spool root {self.root} is no longer the spool it started on (it has {what}): is its volume "
                f"unmounted, or another volume mounted there?")

    def _unmarked_problem(self) -> str | None:
        """Why a root without a marker must not be marked now: the index holds files in it and none of them is
        there — the spool's volume not mounted yet, its bare mount point in its place. None otherwise (a new spool,
        one from before markers, a root that has its marker). Raises OSError."""
        if self._indexed_files is None or read_marker(self.root) is not None:
            return None
        if self._expected is None:
            try:
                self._expected = self._indexed_files()
            except DatabaseError as exc:
                return f"spool root {self.root} has no {MARKER} and the index cannot be read to judge it: {exc}"
        if not self._expected or any(p.exists() for p in self._expected):
            return None
        return (f"spool root {self.root} has no {MARKER} and none of {len(self._expected)} files the index holds in "
                f"it: is its volume not mounted? Writes resume once it is. If its files are gone for good, mark the "
                f"root by hand: ln -s $(openssl rand -hex 16) {self.root / MARKER}")

    def _make_dirs(self, folder: Path) -> list[Path]:
        """Create missing folders below the root; return the parents to fsync before a file in ``folder`` may be
        acknowledged: on the first write into ``folder`` in this process, whoever created it (another thread may
        have made it a moment ago and not yet synced its parent)."""
        if folder in self._synced:
            return []
        for d in (folder.parent, folder):
            if not d.is_dir():
                with contextlib.suppress(FileExistsError):
                    d.mkdir()
        return [folder.parent.parent, folder.parent]

    _SYNCED_MAX = 4096  # folders remembered as durable (one per series); forgetting one costs two fsyncs


def read_marker(root: Path) -> str | None:
    """The id in ``root``'s `MARKER`, None where there is none. Raises OSError (the root unreadable)."""
    path = root / MARKER
    try:
        try:
            return os.readlink(path)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not a link but the file `claim_marker` writes without links
                raise
        with open(path, "rb") as f:
            return f.read(256).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None


def claim_marker(root: Path) -> str:
    """The id in ``root``'s `MARKER`, made first if there is none: a symbolic link to a new random id, created
    only if no other process (another node on a shared root, another of this node's processes) made one first —
    then its id is the spool's — and durable (the folder fsync'd). Where the file system has no symbolic links,
    a file created with O_EXCL holds the id; one found empty is waited on up to a second (its creator writes the
    id at once). Raises OSError."""
    found = read_marker(root)
    if found is None:
        with contextlib.suppress(FileExistsError):  # another process was first: its id is the one read below
            _make_marker(root / MARKER, secrets.token_hex(16))
        _fsync_dir(root)
        found = read_marker(root)
    for _ in range(20):
        if found:
            return found
        time.sleep(0.05)
        found = read_marker(root)
    raise OSError(errno.EINVAL, f"{root / MARKER} is empty or gone; remove it if no node is starting on this spool")


def _make_marker(path: Path, marker: str) -> None:
    try:
        os.symlink(marker, path)  # atomic, and refused (EEXIST) when there is one: no one reads half an id
    except OSError as exc:
        if exc.errno not in _NO_SYMLINKS:
            raise
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, f"{marker}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
