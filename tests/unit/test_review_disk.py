"""Review of the disk operations (spool, retention): a purge killed after its rows went must not leave the series'
files on disk for good, and the empty folders a purge leaves are removed on a node without a spool id (the
default)."""

from __future__ import annotations

import os

import pytest

from tests.unit.test_retention import DAY, Site


class Killed(BaseException):
    """kill -9 at that point: nothing after it runs (not even an ``except Exception``)."""


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.engine.dispose()


def _received_at_node_time(site: Site, uid: str) -> None:
    """The files' times as the node's (fake) clock had them when they were received."""
    for path in site.spool_files(uid):
        os.utime(path, (site.clock.now, site.clock.now))


def test_a_purge_killed_between_its_rows_and_its_files_is_finished_by_the_next(site, monkeypatch):
    """Retention deletes a series' rows, then its files ("a crash between the two leaves orphan files, swept by
    the next purge of the folder"). But the next purge skipped the series (its instance count is 0), so the
    files stayed on disk for good, named by nothing: on a full disk, space retention never frees again."""
    uid = site.series("a", seed=1)
    _received_at_node_time(site, uid)
    site.clock.now += 8 * DAY

    def killed(path, *args, **kwargs):
        raise Killed

    monkeypatch.setattr(os, "unlink", killed)
    with pytest.raises(Killed):
        site.retention.purge()
    monkeypatch.undo()
    assert site.index.get_series(uid).instance_count == 0 and len(site.spool_files(uid)) == 10  # the crash
    site.clock.now += 1 * DAY
    report = site.retention.purge()
    assert site.spool_files(uid) == [] and site.consistent()
    assert report.instance_files == 10
    assert not (site.config.node.spool_dir / site.index.get_series(uid).study_uid).exists()


def test_a_file_being_committed_in_a_purged_series_is_not_swept(site):
    """The sweep must not take a file written for a re-send whose row is not committed yet (it is renamed into
    place before its row commits): only files older than the grace period are."""
    uid = site.series("a", seed=2)
    site.clock.now += 8 * DAY
    site.retention.purge()
    study = site.index.get_series(uid).study_uid
    folder = site.config.node.spool_dir / study / uid
    folder.mkdir(parents=True, exist_ok=True)
    fresh = folder / "1.2.3.dcm"
    fresh.write_bytes(b"x")
    site.clock.now += 1 * DAY
    os.utime(fresh, (site.clock.now - 60, site.clock.now - 60))  # written a minute ago
    site.retention.purge()
    assert fresh.exists()


def test_a_purge_removes_the_empty_folders_of_the_spool_without_a_spool_id(site):
    """'Empty spool folders are removed': only under roots named by spool id, so a node without one (the default)
    kept a study and a series folder for every series it ever purged."""
    uid = site.series("a", seed=3)
    study = site.index.get_series(uid).study_uid
    site.clock.now += 8 * DAY
    assert site.retention.purge().instance_files == 10
    assert not (site.config.node.spool_dir / study).exists()
