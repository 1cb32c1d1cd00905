"""node/adminsummary.py: the status page's retention summary is computed in a background thread, at most one at a
time and at most once per interval, and a view never waits for it."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from node.adminsummary import DUTY_FACTOR, MIN_INTERVAL_SECONDS, RetentionPreview, RetentionView
from node.config import NodeConfig
from tests.fakeclock import FakeClock

CONFIG = NodeConfig.model_validate({"node": {"data_dir": "/nonexistent/pacsnode"}})
REPORT = {"dry_run": True, "series": 3, "instance_files": 30}


class HeldDryRun:
    """A dry run that runs until the test lets it end; counts its calls."""

    def __init__(self, result: dict[str, Any] | Exception = REPORT) -> None:
        self.result = result
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, config: NodeConfig) -> dict[str, Any]:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(10), "the test never let the dry run end"
        if isinstance(self.result, Exception):
            raise self.result
        return dict(self.result)


def settled(preview: RetentionPreview) -> RetentionView:
    """The view once no dry run is under way (waited on, bounded)."""
    deadline = time.monotonic() + 10
    while (view := preview.view(CONFIG)).running:
        assert time.monotonic() < deadline, "the dry run never ended"
        time.sleep(0.005)
    return view


def test_a_view_answers_at_once_while_one_dry_run_runs_in_the_background():
    clock = FakeClock(1_790_000_000.0)
    dry_run = HeldDryRun()
    preview = RetentionPreview(dry_run, clock)
    started = time.monotonic()
    views = [preview.view(CONFIG) for _ in range(50)]  # a page reloaded 50 times while the dry run is held
    assert time.monotonic() - started < 1.0
    assert dry_run.entered.wait(5) and dry_run.calls == 1
    assert all(v.at is None and v.report is None and v.error is None and v.running for v in views)
    dry_run.release.set()
    view = settled(preview)
    assert view.report == REPORT and view.at == clock() and view.error is None and dry_run.calls == 1


def test_the_summary_is_reused_until_the_interval_has_passed():
    clock = FakeClock(1_790_000_000.0)
    dry_run = HeldDryRun()
    dry_run.release.set()
    preview = RetentionPreview(dry_run, clock)
    preview.view(CONFIG)
    first = settled(preview)
    clock.advance(MIN_INTERVAL_SECONDS - 1)
    assert settled(preview) == first and dry_run.calls == 1
    clock.advance(1)
    preview.view(CONFIG)  # due: starts the next one, answers with the last one meanwhile
    again = settled(preview)
    assert dry_run.calls == 2 and again.at == clock() and again.at != first.at


def test_a_failing_dry_run_is_shown_and_the_next_one_starts_after_the_interval():
    clock = FakeClock(1_790_000_000.0)
    dry_run = HeldDryRun(OSError("spool gone"))
    dry_run.release.set()
    preview = RetentionPreview(dry_run, clock)
    preview.view(CONFIG)
    view = settled(preview)
    assert view.error == "OSError" and view.report is None and view.at == clock()
    dry_run.result = REPORT
    clock.advance(MIN_INTERVAL_SECONDS)
    preview.view(CONFIG)
    assert settled(preview).report == REPORT and dry_run.calls == 2


def test_a_slow_dry_run_is_repeated_less_often():
    clock = FakeClock(1_790_000_000.0)

    def slow(config: NodeConfig) -> dict[str, Any]:
        time.sleep(0.05)
        return REPORT

    preview = RetentionPreview(slow, clock, min_interval=0.001)
    assert preview.interval == 0.001
    preview.view(CONFIG)
    view = settled(preview)
    assert preview.interval >= DUTY_FACTOR * 0.05 and view.interval == preview.interval


def test_the_constructor_fails_fast():
    with pytest.raises(TypeError, match="dry_run"):
        RetentionPreview(REPORT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_interval"):
        RetentionPreview(lambda config: REPORT, min_interval=0)
