"""`pacsnode config reload` signals only a running ``pacsnode serve``, and only after checking the file that node
will re-read with that node's own environment — read from ``/proc/<pid>``, not from the shell the command runs in.

The "nodes" here are real processes whose command lines look like the node's (``python -c … node.cli serve …``)
and which count the SIGHUPs they get; a stale pid file names an ordinary process, which SIGHUP would terminate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_until

# a stand-in node: writes one line per SIGHUP into the file named by its first argument
FAKE_NODE = (
    "import signal, sys, time\n"
    "out = open(sys.argv[1], 'a', buffering=1)\n"
    "signal.signal(signal.SIGHUP, lambda *_: out.write('hup\\n'))\n"
    "out.write('ready\\n')\n"
    "time.sleep(120)\n"
)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60, env={**environ, **(env or {})})


def write_config(path: Path, data_dir: Path, extra: str = "") -> Path:
    path.write_text(f'[node]\ndata_dir = "{data_dir}"\n{extra}')  # extra: more [node] keys
    return path


@pytest.fixture
def spawn(tmp_path) -> Iterator:
    procs: list[subprocess.Popen] = []

    def start(*argv: str, cwd: Path = tmp_path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        hups = tmp_path / f"hups-{len(procs)}"
        proc = subprocess.Popen([sys.executable, "-c", FAKE_NODE, str(hups), *argv], cwd=cwd,
                                env={**os.environ, **(env or {})})
        procs.append(proc)
        wait_until(lambda: hups.exists() and "ready" in hups.read_text(), 20, "the stand-in process started")
        return proc, hups

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def hup_count(hups: Path) -> int:
    return hups.read_text().count("hup")


def test_stale_pid_file_naming_another_program_signals_nothing(tmp_path, spawn):
    config = write_config(tmp_path / "node.toml", tmp_path / "data")
    (tmp_path / "data").mkdir()
    other, hups = spawn("some", "other", "program")
    (tmp_path / "data" / "pacsnode.pid").write_text(f"{other.pid}\n")
    done = cli("config", "reload", "--config", str(config))
    assert done.returncode == 1, done.stderr
    assert "not a pacsnode serve" in done.stderr and "stale" in done.stderr
    time.sleep(0.3)
    assert other.poll() is None and hup_count(hups) == 0


def test_reload_with_another_file_is_refused_naming_the_nodes_file(tmp_path, spawn):
    data = tmp_path / "data"
    data.mkdir()
    running = write_config(tmp_path / "node.toml", data)
    edited = write_config(tmp_path / "new.toml", data, 'allowed_calling_aes = ["SCANNER-A"]\n')
    node, hups = spawn("node.cli", "serve", "--config", "node.toml")  # relative to its own working directory
    (data / "pacsnode.pid").write_text(f"{node.pid}\n")

    done = cli("config", "reload", "--config", str(edited))
    assert done.returncode == 2
    assert str(running) in done.stderr and str(edited) in done.stderr
    time.sleep(0.3)
    assert hup_count(hups) == 0

    ok = cli("config", "reload", "--config", str(running))  # the node's own file: checked, then signalled
    assert ok.returncode == 0, ok.stderr
    wait_until(lambda: hup_count(hups) == 1, 10, "one SIGHUP")


def test_the_nodes_file_from_its_environment_and_its_overrides_are_what_is_checked(tmp_path, spawn):
    data = tmp_path / "data"
    data.mkdir()
    running = write_config(tmp_path / "node.toml", data)
    # the node was started with $PACSNODE_CONFIG and an override its file alone would not need: the shell running
    # the reload has neither
    node, hups = spawn("pacsnode", "serve", env={"PACSNODE_CONFIG": str(running),
                                                 "PACSNODE_NODE__PORT": "not-a-port"})
    (data / "pacsnode.pid").write_text(f"{node.pid}\n")
    done = cli("config", "reload", "--config", str(running))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "port" in done.stderr
    time.sleep(0.3)
    assert hup_count(hups) == 0

    node.kill()
    node.wait()
    good, good_hups = spawn("pacsnode", "serve", env={"PACSNODE_CONFIG": str(running)})
    (data / "pacsnode.pid").write_text(f"{good.pid}\n")
    ok = cli("config", "reload", "--config", str(running))
    assert ok.returncode == 0, ok.stderr
    wait_until(lambda: hup_count(good_hups) == 1, 10, "one SIGHUP")


def test_without_a_named_file_the_nodes_own_file_is_checked(tmp_path, spawn):
    """Found by this session's second review: with neither --config nor $PACSNODE_CONFIG the command compared the
    default file with the node's and refused (exit 2) a node started on another file — though no other file was
    named. Now it checks and reloads the node's own file. (The command finds the pid file through its default
    config; its data_dir is pointed at this test's folder by an override.)"""
    data = tmp_path / "data"
    data.mkdir()
    write_config(tmp_path / "site.toml", data)
    node, hups = spawn("node.cli", "serve", "--config", "site.toml")
    (data / "pacsnode.pid").write_text(f"{node.pid}\n")
    done = cli("config", "reload", env={"PACSNODE_NODE__DATA_DIR": str(data)})
    assert done.returncode == 0, done.stderr
    wait_until(lambda: hup_count(hups) == 1, 10, "one SIGHUP")
