"""Review of the in-place upgrade: the new release's package is installed while the older release's node still runs
on its SQLite database (the service is restarted after). Only ``pacsnode serve`` may upgrade the embedded database
by itself (README "Database": "the embedded database has one node"); any other command the administrator or a
monitoring script runs first — ``pacsnode status`` to look before the restart — upgraded it under the running node.

Checked by hand against the older release's own code (a worktree of 1a4a442, the 0006_purged_members release) on
SQLite: with that node serving, the new release's ``pacsnode status`` took the schema to 0007_admin_indexes; the next
time one of the node's processes was restarted (its listener killed) it refused "revision 0007_admin_indexes, which
this release of pacsnode does not know ... run that release", five times in ~25 s, and the whole node stopped with
exit 70 — taken down by a status query.

`node.statusreport.open_stages` (status, retry, purge) called `node.db.init_schema`, which upgrades SQLite; it
prepares with ``upgrade_older=False`` now, and the command stops naming ``pacsnode db upgrade``."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command

from node import migrate
from node.cli import main
from node.db import create_engine_for, init_schema

PREVIOUS = "0006_purged_members"  # the release before (tests/unit/test_migrate_downgrade.py checks it is)


@pytest.mark.parametrize("command_line", [["status"], ["retry"], ["purge", "--dry-run"]])
def test_a_command_other_than_serve_leaves_an_older_sqlite_schema_alone(tmp_path: Path, command_line: list[str],
                                                                        capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "data"
    data.mkdir()
    engine = create_engine_for(f"sqlite:///{data / 'node.db'}")
    try:
        init_schema(engine)
        with engine.begin() as conn:  # the schema of the release still serving on it
            command.downgrade(migrate._config(conn), PREVIOUS)
        config = tmp_path / "node.toml"
        config.write_text(f'[node]\ndata_dir = "{data}"\n')
        assert main([*command_line, "--config", str(config)]) == 1
        assert "pacsnode db upgrade" in capsys.readouterr().err
        assert migrate.inspect(engine).revision == PREVIOUS, "upgraded under the running older node"
    finally:
        engine.dispose()
