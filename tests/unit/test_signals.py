"""node.signals: the two-stage stop and SIGHUP's reload, with real signals sent to this process."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from node.logs import get_logger
from node.signals import StopSignals

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture
def restore_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.usefixtures("restore_handlers")
@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGINT)])
def test_the_first_signal_asks_for_a_stop_and_a_second_forces_exit_130(tmp_path, first, second):
    stop, forced = threading.Event(), []
    pid_file = tmp_path / "pacsnode.pid"
    pid_file.write_text("1")
    with capture_logs() as logs:
        StopSignals(get_logger(component="test"), stop, pid_file, lambda: None,
                    on_force=lambda: forced.append(pid_file.exists())).install()
        signal.raise_signal(first)
        assert stop.is_set() and pid_file.exists() and forced == []
        with pytest.raises(SystemExit) as exited:
            signal.raise_signal(second)
    assert exited.value.code == 130
    assert forced == [True]  # on_force (the supervisor's kill) runs before the pid file goes
    assert not pid_file.exists()
    assert [e["event"] for e in logs] == ["shutting_down", "forced_exit"]
    assert logs[0]["signal"] == first.name and logs[1]["signal"] == second.name


@pytest.mark.usefixtures("restore_handlers")
def test_sighup_reloads_in_its_own_thread(tmp_path):
    reloaded: list[str] = []
    done = threading.Event()

    def reload() -> bool:
        reloaded.append(threading.current_thread().name)
        done.set()
        return True

    stop = threading.Event()
    StopSignals(get_logger(component="test"), stop, tmp_path / "pacsnode.pid", reload).install()
    signal.raise_signal(signal.SIGHUP)
    assert done.wait(5)
    assert reloaded == ["config-reload"] and not stop.is_set()
