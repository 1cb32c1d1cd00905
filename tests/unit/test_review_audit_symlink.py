"""Review: root (``sudo pacsnode audit``, ``retry``, ``purge``, or a service misconfigured to run as root) opened the
audit file without O_NOFOLLOW. The node's own user owns the audit folder, so whoever holds that user (a less
privileged account) could replace ``audit.jsonl`` with a symbolic link, and root then appended its record to - or
created - any file the link named. The trail file is now opened without following a link; the write is refused
with an error naming the path (``audit_write_failed``), nothing is written through the link, and ``pacsnode
audit`` does not read (and print) the records of whatever file a link names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.test_review_audit_gaps import NOBODY, _as_nobody, audit_as_root, nobody_trail

VICTIM = b'{"event": "root-only-secret", "note": "root\'s file: never read or written through the trail"}\n'


@pytest.mark.parametrize("existing", [True, False], ids=["appends-to-a-root-file", "creates-a-root-file"])
def test_root_never_follows_a_link_planted_as_the_audit_file(tmp_path: Path, existing: bool) -> None:
    with nobody_trail("pacsnode-audit-link-") as (base, data, config):  # the node made audit/ and audit.jsonl
        secret = base / "root-only"
        secret.mkdir(mode=0o700)
        target = secret / "victim.conf"
        if existing:
            target.write_bytes(VICTIM)
            target.chmod(0o600)
        trail = data / "audit" / "audit.jsonl"
        trail.unlink()  # the node's user may: audit/ is its folder
        trail.symlink_to(target)
        os.lchown(trail, NOBODY, NOBODY)
        out = audit_as_root(config)
        if existing:
            assert target.read_bytes() == VICTIM
        else:
            assert not target.exists()
        assert trail.is_symlink()
        assert "root-only-secret" not in out.stdout  # nor read through it, and printed
        (failed,) = [line for line in out.stdout.splitlines() if "audit_write_failed" in line]
        assert f"the audit file {trail} is a symbolic link: not followed" in failed, out.stdout


def test_root_never_follows_a_link_planted_as_the_audit_folder(tmp_path: Path) -> None:
    """The same one level up: the node's user owns the data folder, so it could replace ``audit/`` with a link, and
    root created ``audit.jsonl`` (root's, 0640) in whatever folder the link named - or appended to one there. As
    root the folder is opened without following a link; the node's own user still follows one (a trail folder an
    admin moved to another volume)."""
    with nobody_trail("pacsnode-audit-link-") as (base, data, config):
        secret = base / "root-only"
        secret.mkdir(mode=0o700)
        folder = data / "audit"
        folder.rename(data / "audit-moved")  # the node's user may: data/ is its folder
        folder.symlink_to(secret)
        os.lchown(folder, NOBODY, NOBODY)
        out = audit_as_root(config)
        assert list(secret.iterdir()) == []
        (failed,) = [line for line in out.stdout.splitlines() if "audit_write_failed" in line]
        assert f"the audit folder {folder} is a symbolic link: root does not follow it" in failed, out.stdout
        folder.unlink()
        folder.symlink_to(data / "audit-moved")  # the node's user, following its own link, still writes its trail
        _as_nobody(config, False)
        assert (data / "audit-moved" / "audit.jsonl").read_text().count("application_stopped") == 1
