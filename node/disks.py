"""The file systems the node writes to, each measured once: its spool root, ``data_dir`` itself (audit trail, pid
files), ``data_dir/results``, ``data_dir/incoming`` (spilled C-STOREs, STOW-RS bodies) and the SQLite database's
folder. Folders on one file system (the same ``st_dev``) count once; a folder not made yet counts on the
file system of its nearest existing parent. Admission control, retention's ``max_disk_percent``, the disk metric
and ``/readyz`` judge by these, so a separate volume mounted on any of them (docker-compose.scale.yml's spool
volume, NFS, CephFS) is seen, not only the file system of ``data_dir``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from node.config import NodeConfig

SPOOL, RESULTS, INCOMING, DATA, DATABASE = "spool", "results", "incoming", "data", "database"

Usage = Callable[[Path], tuple[int, int]]  # two byte counts of the file system holding a folder, e.g. (free, total)
Locate = Callable[[Path], tuple[int, Path]]  # (st_dev, the existing folder to measure it at)


def statvfs_usage(path: Path) -> tuple[int, int]:
    """(free, total) bytes of the file system holding ``path``; free as an unprivileged writer sees it (root's
    reserved blocks do not count). Raises OSError."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def locate(path: Path) -> tuple[int, Path]:
    """(``st_dev``, folder) of ``path``, or of its nearest existing parent while it does not exist (the file system
    it will be made on). Raises OSError other than a missing folder."""
    current = path if isinstance(path, Path) else Path(path)  # no re-parse: admission reads this every interval
    while True:
        try:
            return os.stat(current).st_dev, current
        except FileNotFoundError:
            if current.parent == current:
                raise
            current = current.parent


def sqlite_folder(database_url: str) -> Path | None:
    """The folder of a SQLite database file (where it and its WAL grow), None for another database or in memory."""
    try:
        url = make_url(database_url)
    except ArgumentError:
        return None
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).parent


def folders(data_dir: Path, database_url: str | None = None) -> dict[str, Path]:
    """What a node with ``data_dir`` writes to, by role (`SPOOL`, `DATA`, `RESULTS`, `INCOMING`, `DATABASE`): the
    database's folder when ``database_url`` is SQLite (without one: the default, ``data_dir/node.db``). A file system
    is named by the first of these on it."""
    data_dir = Path(data_dir)
    out = {SPOOL: data_dir / "spool", DATA: data_dir, RESULTS: data_dir / "results", INCOMING: data_dir / "incoming"}
    database = sqlite_folder(database_url) if database_url is not None else data_dir
    if database is not None:
        out[DATABASE] = database
    return out


def node_folders(config: NodeConfig) -> dict[str, Path]:
    """`folders` of a node's config (admission control, the disk metric, `pacsnode status`)."""
    return folders(config.node.data_dir, config.database_url)


def purge_folders(config: NodeConfig) -> dict[str, Path]:
    """What retention frees, by role: the spool roots this process reaches (its own and ``[spools]``' mount
    points, node.spools), ``data_dir`` and its results."""
    out = {SPOOL: config.node.spool_dir}
    out.update({f"{SPOOL} {sid}": Path(root) for sid, root in sorted(config.spools.items())})
    out.update({DATA: config.node.data_dir, RESULTS: config.node.data_dir / "results"})
    return out


@dataclass(frozen=True)
class Group:
    """The folders (role → folder) on one file system and where to measure it; ``error`` when it could not be
    told (the folder's parent chain unreadable)."""

    folders: tuple[tuple[str, Path], ...]
    at: Path
    error: OSError | None = None

    @property
    def path(self) -> Path:
        """The folder that names this file system in reports: its first (the spool before the others)."""
        return self.folders[0][1]


def group(by_role: Mapping[str, Path], locate: Locate = locate) -> list[Group]:
    """``by_role``'s folders grouped by file system (``st_dev``), in order of first appearance."""
    devices: dict[int, list[tuple[str, Path]]] = {}
    at: dict[int, Path] = {}
    out: list[Group] = []
    for role, folder in by_role.items():
        try:
            dev, existing = locate(folder)
        except OSError as exc:
            out.append(Group(((role, folder),), folder, exc))
            continue
        devices.setdefault(dev, []).append((role, folder))
        at.setdefault(dev, existing)
    return [Group(tuple(members), at[dev]) for dev, members in devices.items()] + out


@dataclass(frozen=True)
class Volume:
    """One file system the node writes to, measured: its folders, free and total bytes (None: unreadable, then
    ``error`` says why)."""

    folders: tuple[tuple[str, Path], ...]
    free: int | None
    total: int | None
    error: str | None = None

    @property
    def path(self) -> Path:
        return self.folders[0][1]

    def holds(self, role: str) -> bool:
        return any(r == role for r, _ in self.folders)

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "folders": {r: str(p) for r, p in self.folders}, "free_bytes": self.free,
                "total_bytes": self.total, **({"error": self.error} if self.error else {})}


def measure(by_role: Mapping[str, Path], usage: Usage = statvfs_usage, locate: Locate = locate, *,
            strict: bool = False) -> list[Volume]:
    """Each file system under ``by_role`` once, with ``usage``'s (free, total); one that cannot be read has None
    and its error (``strict``: raises that OSError instead)."""
    out = []
    for g in group(by_role, locate):
        error = g.error
        if error is None:
            try:
                free, total = usage(g.at)
            except OSError as exc:
                error = exc
            else:
                out.append(Volume(g.folders, free, total))
                continue
        if strict:
            raise error
        out.append(Volume(g.folders, None, None, f"{g.at}: {error.strerror or error}"))
    return out


def used_by_path(by_role: Mapping[str, Path], usage: Usage = statvfs_usage) -> dict[str, tuple[int, int]]:
    """{path naming a file system: (used, total) bytes} for each readable one (the disk metric)."""
    return {str(v.path): (v.total - v.free, v.total) for v in measure(by_role, usage)
            if v.free is not None and v.total is not None}


__all__ = ["Group", "Volume", "folders", "group", "locate", "measure", "node_folders", "purge_folders",
           "sqlite_folder", "statvfs_usage", "used_by_path"]
