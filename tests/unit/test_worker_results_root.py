"""The worker's results folder and retention (node.worker `_newest_results`): a folder without its spool marker
(a node upgraded from the release before markers) is marked only where the files the index holds in it are there,
else taken for an unmounted volume and every result waits. Retention deletes result files ``results_days`` after
their series settled and keeps the rows, so the files of older rows are missing from a well-mounted folder: only
rows younger than that may be asked for. The end-to-end case (the previous release's state, Orthanc, the real
pipeline) is tests/integration/test_review_upgrade.py, behind ``-m slow``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.config import NodeConfig
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher
from node.queue import JobQueue
from node.schema import results
from node.spool import MARKER
from node.worker import Worker

DAY = 86400.0


def _worker(tmp_path: Path, results_days: float) -> tuple[Worker, Path]:
    config = NodeConfig.model_validate({"node": {"data_dir": str(tmp_path / "data")},
                                        "retention": {"results_days": results_days}})
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    root = config.node.data_dir / "results"
    with engine.begin() as conn:  # results the release before wrote, their files since purged by retention
        for i, age in enumerate((40 * DAY, 35 * DAY)):
            conn.execute(results.insert().values(
                series_uid=f"1.2.3.{i}", version=1, job_id=i + 1, kind="sr", study_uid="1.2.3", sop_uid=f"1.2.4.{i}",
                result_series_uid=f"1.2.5.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                path=str(root / "1.2.3" / f"1.2.5.{i}" / f"1.2.4.{i}.dcm"), created_at=time.time() - age))
    worker = Worker(config, engine, JobQueue(engine, config.queue), Dispatcher(config, engine, {}), lambda: None)
    return worker, root


def test_results_purged_for_their_age_do_not_make_the_folder_look_unmounted(tmp_path: Path) -> None:
    worker, root = _worker(tmp_path, results_days=30)
    assert worker.results_store.root_problem() is None  # "has no .pacsnode-spool-id and none of 2 files" before
    assert (root / MARKER).is_symlink() or (root / MARKER).is_file()


@pytest.mark.parametrize("results_days", [60, 0])  # rows younger than results_days, or retention off: all asked for
def test_results_retention_has_not_reached_must_be_there(tmp_path: Path, results_days: float) -> None:
    worker, root = _worker(tmp_path, results_days=results_days)
    problem = worker.results_store.root_problem()
    assert problem is not None and "is its volume not mounted" in problem and "none of 2 files" in problem
    assert not (root / MARKER).exists()
