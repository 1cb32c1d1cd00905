"""Operations review: `pacsnode serve` refusing to start as radiology IT meets it — a port another program holds, a
data folder it cannot write, a database that is not there, no config file. Each run is the real command line (the
supervisor of role processes and the one-process model) against a real socket or path; what must hold: one line on
stderr naming the cause, a non-zero exit within seconds (not a restart loop ending in 70, which systemd's
``Restart=on-failure`` takes for "start me again"), no traceback, no secret, and no process of it left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

MODELS = ("processes", "threads")


def serve(config: Path, timeout: float = 90) -> tuple[subprocess.CompletedProcess[str], float]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(config)], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env=environ)
    return done, time.monotonic() - t0


def write_config(tmp_path: Path, model: str, *, data_dir: Path | None = None, port: int | None = None,
                 http_port: int | None = None, extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
host = "127.0.0.1"
port = {port or free_port()}
http_port = {http_port or free_port()}
data_dir = "{data_dir or tmp_path / 'data'}"
process_model = "{model}"
[worker]
enabled = false
[admission]
min_free_percent = 0
reserve_free_percent = 0
{extra}""")
    return path


def left_running(config: Path) -> list[int]:
    """Processes still running with ``config`` on their command line (a forked child keeps its supervisor's)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(config).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def assert_refused_at_once(done: subprocess.CompletedProcess[str], seconds: float, config: Path, *,
                           code: int, names: str) -> None:
    assert done.returncode == code, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    problem = [line for line in done.stderr.splitlines() if line.startswith("pacsnode:")]
    assert len(problem) == 1 and names in problem[0], done.stderr[-3000:]
    assert seconds < 20, f"took {seconds:.1f} s"  # not the supervisor's restart budget (~30 s) first
    assert left_running(config) == []


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program listens on (as a PACS or a second node would)."""
    port = free_port()
    sock = socket.create_server(("127.0.0.1", port))
    yield port
    sock.close()


@pytest.mark.parametrize("model", MODELS)
def test_http_port_in_use_is_one_line_and_exit_2(tmp_path, held_port, model):
    config = write_config(tmp_path, model, http_port=held_port)
    done, seconds = serve(config)
    assert_refused_at_once(done, seconds, config, code=2, names=f"127.0.0.1:{held_port}")


@pytest.mark.parametrize("model", MODELS)
def test_dimse_port_in_use_is_one_line_and_exit_2(tmp_path, held_port, model):
    config = write_config(tmp_path, model, port=held_port)
    done, seconds = serve(config)
    assert_refused_at_once(done, seconds, config, code=2, names=f"127.0.0.1:{held_port}")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("blocked", ["spool", "data_dir", "database"])
def test_a_data_folder_the_node_cannot_write_is_one_line_and_exit_2(tmp_path, model, blocked):
    # Root ignores permission bits, so a file where the folder must be stands for a folder the node cannot write
    # (a read-only mount, a wrong owner): both fail in mkdir/open with an OSError.
    data = tmp_path / "data"
    if blocked == "spool":
        data.mkdir()
        (data / "spool").write_text("not a folder")
    elif blocked == "data_dir":
        (tmp_path / "file").write_text("not a folder")
        data = tmp_path / "file" / "data"
    else:  # a SQLite file of its own, in a folder that cannot be made
        (tmp_path / "file").write_text("not a folder")
    url = f'[database]\nurl = "sqlite:///{tmp_path / "file" / "node.db"}"\n' if blocked == "database" else ""
    config = write_config(tmp_path, model, data_dir=data, extra=url)
    done, seconds = serve(config)
    named = str(tmp_path / "file") if blocked == "database" else str(data)
    assert_refused_at_once(done, seconds, config, code=2, names=named)


@pytest.mark.parametrize("model", MODELS)
def test_an_unreachable_database_is_one_line_without_its_password(tmp_path, model):
    url = f"postgresql+psycopg://pacs:s3cretPW@127.0.0.1:{free_port()}/pacs"  # nothing listens there
    config = write_config(tmp_path, model, extra=f'[database]\nurl = "{url}"\n')
    done, seconds = serve(config)
    assert done.returncode != 0 and "s3cretPW" not in done.stderr + done.stdout
    assert_refused_at_once(done, seconds, config, code=1, names="Connection refused")


def test_a_missing_config_file_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "absent.toml"
    done, seconds = serve(config)
    assert_refused_at_once(done, seconds, config, code=2, names="does not exist")


@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("retry",), ("purge", "--dry-run")])
def test_admin_commands_on_a_config_whose_database_is_not_there_say_so_and_create_nothing(tmp_path, command):
    # The node runs with data_dir set by its own environment (systemd Environment=PACSNODE_NODE__DATA_DIR=...);
    # the admin's shell reads the file alone. `pacsnode status` created an empty database there and reported
    # "series: none, jobs: none, deliveries: none" — a node that had received nothing — with exit 0.
    config = write_config(tmp_path, "threads")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    done = subprocess.run([sys.executable, "-m", "node.cli", *command, "--config", str(config)], capture_output=True,
                          text=True, cwd=REPO, timeout=60, env=environ)
    assert done.returncode == 2, (done.returncode, done.stdout[-1000:], done.stderr[-1000:])
    assert f"no database at {tmp_path / 'data' / 'node.db'}" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data" / "node.db").exists()


@pytest.mark.parametrize("model", MODELS)
def test_one_port_for_dimse_and_http_is_refused_in_one_line(tmp_path, model):
    # Accepted by the config check, then under process_model = processes the supervisor bound DIMSE and the listener
    # child died on its HTTP bind, restarted until exit 70 (~33 s, 6 tracebacks); threads: a traceback.
    port = free_port()
    config = write_config(tmp_path, model, port=port, http_port=port)
    done, seconds = serve(config)
    assert_refused_at_once(done, seconds, config, code=2, names=f"node.port {port} is also node.http_port")


@pytest.mark.parametrize("url, named", [
    ("postgres://pacs:s3cretPW@127.0.0.1/pacs", "'postgres' is not a database this node runs on"),  # pre-1.4 alias
    ("mysql://pacs:s3cretPW@127.0.0.1/pacs", "'mysql' is not a database this node runs on"),
    ("s3cretPW", "not a database URL"),
])
def test_a_database_url_the_node_cannot_use_is_one_line_without_its_password(tmp_path, url, named):
    # Accepted by the config check, then a traceback at start (NoSuchModuleError, ModuleNotFoundError, ArgumentError).
    config = write_config(tmp_path, "processes", extra=f'[database]\nurl = "{url}"\n')
    done, seconds = serve(config)
    assert "s3cretPW" not in done.stderr + done.stdout
    assert_refused_at_once(done, seconds, config, code=2, names=named)


@pytest.mark.parametrize("model", MODELS)
def test_a_sighup_while_the_node_starts_is_a_reload_not_its_end(tmp_path, model):
    # A deploy that restarts and then reloads the node (systemctl restart; systemctl reload: kill -HUP $MAINPID)
    # sent SIGHUP in the ~1.2-1.5 s before its handler was installed: SIGHUP's default action ended the node, and
    # systemd counts SIGHUP as a clean exit, so Restart=on-failure left it down.
    from tests.conftest import wait_for_port

    port, http_port = free_port(), free_port()
    config = write_config(tmp_path, model, port=port, http_port=http_port)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    log = (tmp_path / "node.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)], cwd=REPO,
                            env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        maps = Path(f"/proc/{proc.pid}/maps")
        deadline = time.monotonic() + 60
        while "pydantic_core" not in maps.read_text():  # the command has begun importing its config code
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        while not all(_listening(p) for p in (port, http_port)):
            assert proc.poll() is None, f"ended by SIGHUP while starting: {proc.returncode}"
            assert time.monotonic() < deadline
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.02)  # the storm's pace, not a wait for the node
        wait_for_port(http_port, 30, proc)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    text = (tmp_path / "node.log").read_text()
    assert "config_reloaded" in text or "config_reload_forwarded" in text  # the SIGHUPs were a reload


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
