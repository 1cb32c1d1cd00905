"""Spool ids: which spool holds each received file, and where a process finds that spool on its own host.

A listener writes under its own spool root (``[node] data_dir``/spool) and, once ``[node] spool_id`` is set,
records each instance as (``instances.spool_id``, ``instances.path``): its spool id and the file's path *relative to
that root* (``<study>/<series>/<sop>.dcm``). Without a spool id (one machine, the default) rows keep an absolute
path and no spool id, as they did before spool ids. Any process reading the file — a worker on a GPU host, the completion sweep of
another listener, retention on the dispatcher's host — resolves it with `Spools.resolve`: its own spool id maps to
its own spool root, other ids to the mount points in ``[spools]`` (``<id> = "/mnt/..."``). An id it cannot map
raises `UnknownSpoolError` (the worker fails the job with that message; nothing crashes). Rows written before
spool ids (``spool_id`` NULL) keep their absolute path and are read as they are.

What a shared spool (NFS, CephFS, a Docker volume) must give, and why nothing more is needed:

* **Write once, then rename, in one directory.** `node.spool.Spool.write` writes a temp file with a random name
  (``O_CREAT | O_EXCL``) in the file's final folder, fdatasyncs it and ``rename``\\s it over the final name, then
  fsyncs the folder. Rename within one directory is atomic on POSIX file systems and on NFS (a single RENAME RPC),
  so a reader sees either no file, the previous complete file, or the new complete file — never a torn one.
* **Close-to-open consistency.** The index row is committed (and the C-STORE acknowledged) only after the close
  and the folder fsync; NFS clients revalidate on open, so a worker that opens the file after reading the row sees
  the whole data. No reader caches a file handle across jobs.
* **No locks.** Each file is written by one writer under a unique temp name; the only shared step is the rename.
  If two listeners receive the same SOP instance (a modality resending to the other listener after a cut), both
  write it under the same relative path: on one shared root the later rename wins with a complete file (the same
  bytes, or a conflicting resend that the index keeps as the latest, `node.index.RecordOutcome.REPLACED`); on two
  roots each listener has its own copy and the index row names whichever committed last. Either way the row
  points at a complete file and the instance is indexed once (``sop_uid`` is the primary key).
* fsync of a directory must be supported (it is on NFSv3/v4, where it commits the directory's metadata).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from node.config import NodeConfig
from node.errors import NodeError
from node.spool import read_marker


class UnknownSpoolError(NodeError):
    """An instance row names a spool this process has no mount point for (``[spools]``)."""


class Spools:
    """Maps spool ids to roots for one process: its own id to its spool dir, the others from ``[spools]``."""

    def __init__(self, config: NodeConfig) -> None:
        self.own_id = config.node.spool_id
        self.own_root = config.node.spool_dir
        self.roots: dict[str, Path] = {k: Path(v) for k, v in config.spools.items()}
        if self.own_id is not None:
            self.roots[self.own_id] = self.own_root

    def resolve(self, spool_id: str | None, path: str) -> Path:
        """Where this process reads a file recorded as (``spool_id``, ``path``); raises `UnknownSpoolError`."""
        if spool_id is None:
            return Path(path)  # no spool id (one machine, or written before spool ids): an absolute path
        root = self.roots.get(spool_id)
        if root is None:
            raise UnknownSpoolError(
                f"instance file is on spool {spool_id!r}, which this process cannot reach: map it in [spools] "
                f"(known: {', '.join(sorted(self.roots))})"
            )
        return root / path

    def rows(self, rows: Iterable[Any]) -> list[Any]:
        """Index rows (with ``spool_id`` and ``path``) whose ``path`` reads as the absolute local path; every other
        attribute is the row's. Raises `UnknownSpoolError` for a row on an unmapped spool."""
        return [ResolvedRow(row, str(self.resolve(getattr(row, "spool_id", None), row.path))) for row in rows]

    def unmounted(self, rows: Iterable[Any]) -> list[Path]:
        """The spool roots holding ``rows``' files (rows as the index or `rows` gives them) that have no readable
        marker now (node.spool: the volume not mounted, a lost NFS mount): while one has none, a file there that
        does not read is the node's trouble, not the series' (the worker waits instead of judging the series)."""
        roots: set[Path] = set()
        for row in rows:
            spool_id = getattr(row, "spool_id", None)
            if spool_id is not None and spool_id in self.roots:
                roots.add(self.roots[spool_id])
            elif spool_id is None and Path(row.path).is_relative_to(self.own_root):
                roots.add(self.own_root)
        return [root for root in sorted(roots) if not _marked(root)]


def results_unmounted(config: NodeConfig, files: Iterable[str | Path]) -> Path | None:
    """The results folder (``data_dir/results``) when ``files`` lie in it and it has no readable marker now (its
    volume not mounted here: the compose file's ``results`` volume), else None: a result file missing there is
    then the node's trouble, retried, not a reason to give the delivery up."""
    root = config.node.data_dir / "results"
    if not any(Path(f).is_relative_to(root) for f in files):
        return None
    return None if _marked(root) else root


def _marked(root: Path) -> bool:
    """Whether ``root`` has a readable marker (node.spool); one that cannot be read counts as none."""
    try:
        return read_marker(root) is not None
    except OSError:
        return False


class ResolvedRow:
    """A row seen through `Spools.rows`: ``path`` resolved, every other attribute the row's own."""

    __slots__ = ("_row", "path")

    def __init__(self, row: Any, path: str) -> None:
        self._row = row
        self.path = path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._row, name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ResolvedRow):
            return bool(self._row == other._row)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._row)


def resolve_all(config: NodeConfig, rows: Sequence[Any]) -> list[Any]:
    """`Spools.rows` for a one-off caller."""
    return Spools(config).rows(rows)


__all__ = ["ResolvedRow", "Spools", "UnknownSpoolError", "resolve_all", "results_unmounted"]
