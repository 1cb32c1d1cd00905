"""Operations review of config reload against a running node (the supervisor of role processes, as `pacsnode serve`
runs by default) with DCMTK as the modality: every kind of invalid file an admin saves is refused — by `pacsnode
config reload` (exit 2, the reason) and by a raw SIGHUP (``config_reload_refused``) — without a secret in any
message, the node serving on the old config meanwhile and the next good file applied; a changed port or AE title is
named as needing a restart while the old ones keep serving; a storm of SIGHUPs during transfers, and SIGTERM in the
middle of one, lose nothing acknowledged."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from peers import dcmtk
from peers.process import peer_env
from tests.conftest import REPO, free_port, require_tool, wait_until
from tests.ctgen import write_ct_series

pytestmark = pytest.mark.integration

SECRET = "tok-S3CRET-4711"
MODELS = ("processes", "threads")
LEAN = f'dicomweb_token = "{SECRET}"\n[worker]\nenabled = false\n[completion]\nstable_seconds = 3600\n'


def events(node, name: str) -> list[dict]:
    out = []
    for line in node.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            out.append(record)
    return out


def reload_cli(node) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    return subprocess.run([sys.executable, "-m", "node.cli", "config", "reload", "--config", str(node.config_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=60, env=environ)


def echo_ok(node, calling: str = "ECHOSCU") -> bool:
    return dcmtk.echoscu(node.port, called_ae=node.ae_title, calling_ae=calling).returncode == 0


def bad_files(good: str, port: int) -> dict[str, tuple[str, str]]:
    """name → (file text, what `config reload`'s message must name)."""
    dest = '\n[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
    return {
        "toml syntax": (good + "\n[gate\n", "not valid TOML"),
        "unknown key": (good.replace("[worker]", "[worker]\nenabeld = true", 1), "unknown key"),
        "bad port": (good.replace(f"port = {port}\n", "port = 70000\n", 1), "node.port"),
        "duplicate ae_title key": (good.replace("[node]\n", '[node]\nae_title = "OTHER"\n', 1), "not valid TOML"),
        "duplicate destination": (good + dest + dest, "destination names must be unique"),
        "route to an unknown pipeline": (good + '\n[[routes]]\nname = "r"\npipeline = "no-such"\n', "routes"),
        "unreadable TLS key": (good + '\n[tls]\ncertificate = "/nonexistent/node.pem"\n'
                                      'private_key = "/nonexistent/node.key"\n', "tls.certificate"),
        "destination url with password, bad key": (
            good + f'\n[[destinations]]\nname = "web"\nkind = "dicomweb"\nurl = "https://u:{SECRET}@pacs/dw"\n'
                   f'token = "{SECRET}"\nbogus = 1\n', "unknown key"),
    }


@pytest.mark.one_backend  # the reload's refusal; the database is not its subject
def test_every_invalid_file_is_refused_the_old_config_serves_and_the_next_good_one_applies(start_node):
    require_tool("echoscu")
    node = start_node(allowed=["ECHOSCU"], extra_toml=LEAN)
    good = node.config_path.read_text()
    for name, (text, named) in bad_files(good, node.port).items():
        node.config_path.write_text(text)
        cli = reload_cli(node)
        assert cli.returncode == 2 and named in cli.stderr, (name, cli.returncode, cli.stderr)
        assert SECRET not in cli.stdout + cli.stderr, name
        before = len(events(node, "config_reload_refused"))
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)  # the node itself refuses it too
        wait_until(lambda b=before: len(events(node, "config_reload_refused")) > b, 30, f"{name} refused",
                   node.log_tail)
        assert echo_ok(node) and not echo_ok(node, "INTRUDER"), name  # the old allow-list, still served
    assert SECRET not in node.log_text()
    assert node.proc.poll() is None

    node.config_path.write_text(good.replace('["ECHOSCU"]', '["ECHOSCU", "SCANNER-B"]'))
    cli = reload_cli(node)
    assert cli.returncode == 0, cli.stderr
    wait_until(lambda: echo_ok(node, "SCANNER-B"), 30, "the good file applied", node.log_tail)


@pytest.mark.one_backend  # restart-only settings; no database path
def test_a_changed_port_or_ae_title_is_named_as_needing_a_restart_and_the_old_ones_serve(start_node):
    require_tool("echoscu")
    node = start_node(extra_toml=LEAN)
    new_port = free_port()
    text = node.config_path.read_text()
    node.config_path.write_text(text.replace(f"port = {node.port}\n", f"port = {new_port}\n", 1)
                                .replace('ae_title = "PACSNODE"', 'ae_title = "NEWNAME"', 1))
    cli = reload_cli(node)
    assert cli.returncode == 0, cli.stderr
    applied = wait_until(lambda: [r for r in events(node, "config_reloaded") if r.get("needs_restart")], 30,
                         "config_reloaded with needs_restart", node.log_tail)
    assert {"port", "ae_title"} <= set(applied[0]["needs_restart"])
    assert echo_ok(node)  # old port, old AE title
    assert dcmtk.echoscu(node.port, called_ae="NEWNAME").returncode != 0
    assert dcmtk.echoscu(new_port, called_ae="NEWNAME").returncode != 0


def indexed(db_url: str) -> set[str]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return {r.sop_uid for r in conn.execute(sa.text("select sop_uid from instances"))}
    finally:
        engine.dispose()


def acknowledged(log: str) -> list[str]:
    done, current = [], None
    for line in log.splitlines():
        if m := re.match(r"I: Sending file: (.+)$", line):
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


def senders(node, tmp_path, n: int, slices: int):
    storescu = require_tool("storescu")
    series = [write_ct_series(tmp_path / f"feed{i}", slices=slices, size=32, seed=40 + i) for i in range(n)]
    sop_of = {str(p): sop for s in series for p, sop in zip(s.paths, s.sop_uids, strict=True)}
    logs = [tmp_path / f"storescu{i}.log" for i in range(n)]
    procs = []
    for i, (s, log) in enumerate(zip(series, logs, strict=True)):
        with log.open("w") as out:
            procs.append(subprocess.Popen(
                [storescu, "-v", "-aet", f"CT{i}", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                 *map(str, s.paths)], stdout=out, stderr=subprocess.STDOUT, env=peer_env()))
    return procs, logs, sop_of


@pytest.mark.one_backend  # the reload threads; the receive path runs on both backends elsewhere
@pytest.mark.parametrize("model", MODELS)
def test_a_sighup_storm_during_transfers_loses_nothing_and_restarts_nothing(start_node, tmp_path, model):
    node = start_node(allowed=["CT0", "CT1", "ECHOSCU"], extra_toml=f'process_model = "{model}"\n' + LEAN)
    good = node.config_path.read_text()
    wider = good.replace('["CT0", "CT1", "ECHOSCU"]', '["CT0", "CT1", "ECHOSCU", "OTHER"]')
    table = node.data_dir / "run"
    pids_before = sorted(p for p in _child_pids(node))
    procs, logs, sop_of = senders(node, tmp_path, 2, 300)
    assert node.proc is not None
    try:
        for i in range(60):  # an admin's script, logrotate and a config tool all at once
            node.config_path.write_text(wider if i % 2 else good)
            node.proc.send_signal(signal.SIGHUP)
            time.sleep(0.01)
        assert any(p.poll() is None for p in procs), "the transfers ended before the storm: nothing was tested"
    finally:
        codes = [p.wait(120) for p in procs]
    assert codes == [0, 0], [log.read_text()[-1500:] for log in logs]
    acked = [f for log in logs for f in acknowledged(log.read_text())]
    assert len(acked) == 600
    wait_until(lambda: {sop_of[f] for f in acked} <= indexed(node.db_url), 30, "every acknowledged instance indexed")
    assert node.proc.poll() is None and echo_ok(node)
    assert sorted(_child_pids(node)) == pids_before, table
    assert not events(node, "process_died")
    assert len(events(node, "config_reloaded")) >= 2  # the children did reload during it


def _child_pids(node) -> list[int]:
    assert node.proc is not None
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(node.proc.pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def slow_sender(node, paths, acked: list[str], pause: float) -> None:
    """A modality that sends one instance every ``pause`` seconds on one association, noting each one answered
    Success, until the association ends (the node's stop) or every file is sent."""
    ae = AE(ae_title="SLOWCT")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    for path in paths:
        if not assoc.is_established:
            return
        status = assoc.send_c_store(pydicom.dcmread(path))
        if status and status.Status == 0:
            acked.append(str(path))
        time.sleep(pause)  # the modality's pace, not a wait for the node
    if assoc.is_established:
        assoc.release()


def running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


@pytest.mark.parametrize("model", MODELS)
def test_sigterm_in_the_middle_of_a_transfer_loses_nothing_acknowledged_and_leaves_no_process(start_node, tmp_path,
                                                                                               model):
    node = start_node(extra_toml=f'process_model = "{model}"\n' + LEAN)
    children = _child_pids(node)
    assert len(children) == (2 if model == "processes" else 0)
    series = write_ct_series(tmp_path / "feed", slices=400, size=16, seed=77)
    sop_of = dict(zip(map(str, series.paths), series.sop_uids, strict=True))
    acked: list[str] = []
    sender = threading.Thread(target=slow_sender, args=(node, series.paths, acked, 0.05))
    sender.start()
    try:
        wait_until(lambda: len(indexed(node.db_url)) >= 20, 60, "20 instances committed")
        assert node.proc is not None
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        code = node.proc.wait(60)
        stopped_in = time.monotonic() - t0
    finally:
        sender.join(60)
    assert code == 0 and stopped_in < 30, (code, stopped_in, node.log_tail())
    assert 0 < len(acked) < 400, "the transfer finished before the stop: nothing was tested"
    assert {sop_of[f] for f in acked} <= indexed(node.db_url)
    assert [pid for pid in children if running(pid)] == []
    assert "Traceback" not in node.log_text()


@pytest.mark.one_backend  # how the command finds the node
def test_a_reload_of_a_file_whose_data_dir_changed_finds_the_running_node(start_node, tmp_path):
    # An admin preparing a move to a new disk sets data_dir (restart-only) and, in the same edit, lets a new scanner
    # in. The command found its node by the pid file under the *file's* data_dir, so it said "no running node found"
    # (exit 1) while the node ran, and nothing was applied; it must find the node by its config file instead.
    require_tool("echoscu")
    node = start_node(allowed=["ECHOSCU"], extra_toml=LEAN)
    text = node.config_path.read_text().replace('["ECHOSCU"]', '["ECHOSCU", "SCANNER-B"]')
    node.config_path.write_text(text.replace(str(node.data_dir), str(tmp_path / "new-disk"), 1))
    cli = reload_cli(node)
    assert cli.returncode == 0, cli.stderr
    assert node.proc is not None and f"pid {node.proc.pid}" in cli.stdout
    wait_until(lambda: echo_ok(node, "SCANNER-B"), 30, "the new scanner let in", node.log_tail)
    applied = [r for r in events(node, "config_reloaded") if r.get("needs_restart")]
    assert applied and "data_dir" in applied[0]["needs_restart"]


@pytest.mark.one_backend  # the process's exit
def test_a_second_sigterm_ends_the_one_process_node_at_once_with_an_association_open(start_node):
    # "a second signal forces exit": the forced exit raised SystemExit, and the interpreter then waited for
    # pynetdicom's (non-daemon) DUL threads, so a modality holding an idle association kept the node alive until
    # the network timeout (60 s), logging apscheduler tracebacks every second meanwhile.
    node = start_node(extra_toml='process_model = "threads"\n' + LEAN)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established and node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: events(node, "shutting_down"), 30, "the first stop", node.log_tail)
    t0 = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    code = node.proc.wait(90)
    assert (code, time.monotonic() - t0 < 5) == (130, True), node.log_tail()
    assert events(node, "forced_exit") and "Traceback" not in node.log_text()
    assoc.abort()


def deliveries(db_url: str) -> list[dict]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(
                "select id, destination, state, last_error from deliveries order by id"))]
    finally:
        engine.dispose()


def test_deliveries_of_a_destination_a_reload_removes_are_kept_then_dead_lettered_with_a_reason(start_node, tmp_path):
    from node.config import load_config
    from node.dispatch import Dispatcher

    dest = ('\n[[destinations]]\nname = "old-pacs"\nkind = "dimse"\nae_title = "OLD"\nhost = "127.0.0.1"\n'
            f'port = {free_port()}\n')  # nothing listens: each attempt fails, the rows wait
    dispatch = "\n[dispatch]\ninitial_backoff_seconds = 0.5\nmax_backoff_seconds = 1\ngive_up_after_seconds = 12\n"
    node = start_node(extra_toml=LEAN + dispatch + dest)
    series = write_ct_series(tmp_path / "res", slices=2, size=16, seed=5)
    engine = sa.create_engine(node.db_url)
    try:  # what the worker queues when a series' results are built
        Dispatcher(load_config(node.config_path), engine, {}).enqueue(series.series_uid, 1, series.paths,
                                                                         series.sop_uids)
    finally:
        engine.dispose()
    wait_until(lambda: all(d["last_error"] for d in deliveries(node.db_url)), 30, "an attempt failed", node.log_tail)
    node.config_path.write_text(node.config_path.read_text().replace(dest, ""))
    assert reload_cli(node).returncode == 0
    wait_until(lambda: events(node, "dispatch_config_applied"), 30, "the dispatcher reloaded", node.log_tail)
    wait_until(lambda: [d["state"] for d in deliveries(node.db_url)] == ["pending"], 10,  # an attempt may be ending
               "kept pending: a later reload may bring the destination back", node.log_tail)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    status = subprocess.run([sys.executable, "-m", "node.cli", "status", "--config", str(node.config_path)],
                            capture_output=True, text=True, cwd=REPO, timeout=60, env=environ)
    assert "deliveries to old-pacs: pending 1" in status.stdout, status.stdout
    # and the destination line says why nothing is sent (it said "old-pacs (None): not checked yet")
    assert "destination old-pacs: NOT IN THE CONFIG (removed or renamed); backlog 1 kept" in status.stdout
    dead = wait_until(lambda: [d for d in deliveries(node.db_url) if d["state"] == "dead"], 40, "dead-lettered",
                      node.log_tail)
    assert "gave up after 12 s" in dead[0]["last_error"], dead


def test_a_sighup_storm_adding_and_removing_a_destination_delivers_each_result_once(start_node, tmp_path):
    from node.config import load_config
    from node.dispatch import Dispatcher

    pacs = dcmtk.StoreScp(tmp_path / "pacs", options=("-v",), log_path=tmp_path / "storescp.log").start()
    try:
        dest = ('\n[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "STORESCP"\nhost = "127.0.0.1"\n'
                f'port = {pacs.port}\n')
        node = start_node(extra_toml=LEAN + dest)
        good = node.config_path.read_text()
        engine = sa.create_engine(node.db_url)
        try:  # 20 result sets queued as the worker queues them
            dispatcher = Dispatcher(load_config(node.config_path), engine, {})
            for i in range(20):
                s = write_ct_series(tmp_path / f"res{i}", slices=2, size=16, seed=100 + i)
                dispatcher.enqueue(s.series_uid, 1, s.paths, s.sop_uids)
        finally:
            engine.dispose()
        assert node.proc is not None
        for i in range(60):
            node.config_path.write_text(good if i % 2 else good.replace(dest, ""))
            node.proc.send_signal(signal.SIGHUP)
            time.sleep(0.02)
        node.config_path.write_text(good)
        node.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: [d["state"] for d in deliveries(node.db_url)] == ["delivered"] * 20, 90,
                   "every result set delivered", node.log_tail)
        assert node.proc.poll() is None and not events(node, "process_died")
        assert pacs.log_text().count("Received Store Request") == 40  # none sent twice
    finally:
        pacs.stop()


@pytest.mark.one_backend  # the allow-list; the receive path runs on both backends elsewhere
@pytest.mark.parametrize("model", MODELS)
def test_a_sender_removed_from_the_allow_list_mid_transfer_finishes_whole_and_is_refused_next(start_node, tmp_path,
                                                                                              model):
    node = start_node(allowed=["CT0", "ECHOSCU"], extra_toml=f'process_model = "{model}"\n' + LEAN)
    procs, logs, sop_of = senders(node, tmp_path, 1, 300)
    wait_until(lambda: len(indexed(node.db_url)) >= 20, 60, "the transfer under way")
    node.config_path.write_text(node.config_path.read_text().replace('["CT0", "ECHOSCU"]', '["ECHOSCU"]'))
    assert reload_cli(node).returncode == 0
    assert procs[0].wait(120) == 0, logs[0].read_text()[-1500:]
    acked = acknowledged(logs[0].read_text())
    assert len(acked) == 300 and {sop_of[f] for f in acked} <= indexed(node.db_url)
    timeline = sorted((r["timestamp"], r["event"]) for name in ("config_reloaded", "instance_stored")
                      for r in events(node, name))
    assert timeline[-1][1] == "instance_stored", "the transfer ended before the reload: nothing was tested"
    wait_until(lambda: not echo_ok(node, "CT0"), 30, "CT0 refused from now on", node.log_tail)
    assert echo_ok(node)
