"""The last step of ingest: spooled instances made durable and indexed in group commits, then acknowledged.

`InstanceCommitter(spool, index).commit(record, folder)` returns the index outcome of an instance whose file
`Spool.write(..., sync_dir=False)` has written, fdatasync'd and renamed into ``folder``, once both the rename
and the index row are durable; it raises `StoreFailedError`/`SpoolFullError` (C-STORE 0xA701/0xA700) when
either fails. Concurrent callers (several associations, STOW-RS requests) are batched by `node.groupcommit`:
per batch, one fsync of each folder the batch renamed files into, then one index transaction.

Why the guarantee holds (Success only once the file and its row survive kill -9 and power loss): each file's data
is on stable storage (fdatasync) before its rename; fsync of a folder makes every entry change made in it before
the call durable, whichever thread renamed it, so one fsync after the batch's renames covers all of them; the
index transaction commits (SQLite WAL with synchronous=FULL: the WAL is fsync'd at COMMIT; PostgreSQL: WAL
flush) only after those folder fsyncs returned; and `GroupCommitter` answers a caller only from the batch its own
item was committed in. So a committed row never names a file that could vanish, and nothing is acknowledged that
is not committed. A crash before the commit leaves at most a file without a row, which a re-send replaces.

A re-send of an instance already stored is written beside it (`Spool.write(stage_replacement=True)`) and moved
over it only once its row is committed (`Spool.place`: rename + folder fsync, before the acknowledgement); if the
commit fails, the staged file is dropped and the acknowledged instance keeps its file. A crash between the commit
and the move leaves the old file under a row describing the new one, unacknowledged: the sender's re-send is then
a duplicate of the row, and its `place` makes the file match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.errors import StoreFailedError
from node.groupcommit import DEFAULT_MAX_BATCH, GroupCommitter
from node.index import Index, InstanceRecord, RecordOutcome
from node.spool import Spool


@dataclass(frozen=True)
class _Pending:
    """A spooled instance waiting for the group commit: its index row and the folder its rename must sync."""

    record: InstanceRecord
    folder: Path


class InstanceCommitter:
    """Folder fsync + index commit for spooled instances, shared by concurrent callers."""

    def __init__(self, spool: Spool, index: Index, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.spool = spool
        self.index = index
        self.group: GroupCommitter[_Pending, RecordOutcome] = GroupCommitter(self._commit_batch, max_batch)

    def commit(self, record: InstanceRecord, folder: Path) -> RecordOutcome:
        """Return ``record``'s outcome once its file's folder is synced and its row committed."""
        return self.group.submit(_Pending(record, folder))

    def _commit_batch(self, batch: list[_Pending]) -> list[RecordOutcome | BaseException]:
        """A folder sync or batch commit that fails fails the whole batch (raised); a batch the database refuses
        is retried one instance at a time (PostgreSQL refusing one row's value fails the transaction), so one bad
        row fails only its own instance."""
        self.spool.sync_dirs(p.folder for p in batch)
        try:
            return list(self.index.record_instances([p.record for p in batch]))
        except StoreFailedError:
            if len(batch) == 1:
                raise
        outcomes: list[RecordOutcome | BaseException] = []
        for pending in batch:
            try:
                outcomes.append(self.index.record_instance(pending.record))
            except StoreFailedError as exc:
                outcomes.append(exc)
        return outcomes
