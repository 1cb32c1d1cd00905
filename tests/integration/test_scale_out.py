"""Scale-out on one PostgreSQL: separate ``pacsnode serve --role ...`` processes, each with its own instance id, as
they would run on separate hosts — listeners (own data dir, own spool id, own port), workers (own data dir; the
listeners' spools reached through ``[spools]`` mount points) and a dispatcher — with DCMTK storescu as the
modalities and Orthanc as the PACS.

The full test (slow): 2 listeners, 2 workers, 1 dispatcher; 6 modalities send 6 series concurrently, 3 to each
listener. One listener is killed with SIGKILL after some of one modality's instances were acknowledged; it is
restarted, and that modality resends its whole series to the *other* listener (the same SOP instances now on two
spools). One worker is killed with SIGKILL while it holds a running job; the surviving worker takes the job over
once its lease expires (``[queue] lease_seconds`` short). Series complete when their association is released
(``mode = "release"``); the quiet timer is long, so a series cut short waits for its resend instead of completing
partly (which would make it a second version: a second SR). Afterwards Orthanc holds exactly one SR and one SEG per
series, and every acknowledged instance is indexed exactly once and readable byte for byte through its spool id.

The default-suite variant: 1 listener, 2 workers, 1 dispatcher, 2 series, one worker killed mid-job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from peers import dcmtk
from peers.ctgen import CtSeries, write_ct_series
from peers.pacsnode import HOST_DISK_ADMISSION, REPO, NodeProcess, node_env
from peers.process import wait_for_port
from tests.conftest import TEST_WEIGHTS_DIR, free_port, require_tool, require_weights, wait_until
from tests.dicomfiles import content
from tests.integration.test_end_to_end import results_by_study

pytestmark = pytest.mark.integration

# Short, so the takeover comes soon; not shorter: the worker beats its lease only around the models' run, and on a
# loaded machine a first job's loading before it took over 4 s (the lease expired, another worker took it over).
LEASE_SECONDS = 8.0


@dataclass(eq=False)
class RoleProcess(NodeProcess):
    """One ``serve --role`` process; a listener is ready when its DIMSE port answers, a worker once its models are
    loaded, a dispatcher once it logged its start."""

    role: str = "listener"

    def start(self, timeout: float = 180.0) -> RoleProcess:
        proc = self._spawn([sys.executable, "-m", "node.cli", "serve", "--role", self.role, "--config",
                            str(self.config_path)], cwd=REPO, env=node_env())
        if self.role == "listener":
            self._ready_or_stop(lambda: wait_for_port(self.port, timeout, proc, "the listener", self.log_tail))
        return self

    def wait_ready(self, timeout: float = 240.0) -> None:
        event = {"worker": '"models_loaded"', "dispatcher": '"node_starting"'}.get(self.role)
        if event is not None:
            wait_until(lambda: event in self.log_text() or not self.running and _died(self), timeout,
                       f"{self.role} {self.config_path.parent.name} ready", self.log_tail)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def _died(process: RoleProcess) -> None:
    raise AssertionError(f"{process.config_path.parent.name} exited\n{process.log_tail()}")


@dataclass
class Deployment:
    """The processes of one scale-out deployment and where each writes."""

    url: str
    tmp: Path
    orthanc_toml: str
    listeners: list[RoleProcess] = field(default_factory=list)
    workers: list[RoleProcess] = field(default_factory=list)
    dispatchers: list[RoleProcess] = field(default_factory=list)

    def spool_ids(self) -> dict[str, Path]:
        return {f"spool-{p.config_path.parent.name}": p.spool for p in self.listeners}

    def add(self, role: str, name: str) -> RoleProcess:
        workdir = self.tmp / name
        workdir.mkdir(parents=True)
        port, http_port = free_port(), free_port()
        process = RoleProcess(workdir / "node.toml", port, workdir / "node.log", "PACSNODE", workdir / "data",
                              http_port, role=role)
        {"listener": self.listeners, "worker": self.workers, "dispatcher": self.dispatchers}[role].append(process)
        return process

    def write_configs(self) -> None:
        """Every process's config, once all are known ([spools] names every listener's spool but one's own)."""
        for process in self.listeners + self.workers + self.dispatchers:
            name = process.config_path.parent.name
            spool_id = f"spool-{name}"
            mounts = "".join(f'"{sid}" = {json.dumps(str(root))}\n' for sid, root in self.spool_ids().items()
                             if sid != spool_id)
            weights = f'[worker]\nweights_dir = "{TEST_WEIGHTS_DIR}"\n' if TEST_WEIGHTS_DIR else ""
            process.config_path.write_text(f"""
[node]
ae_title = "PACSNODE"
host = "127.0.0.1"
port = {process.port}
http_port = {process.http_port}
data_dir = {json.dumps(str(process.data_dir))}
instance_id = "{name}"
spool_id = "{spool_id}"
wake_poll_seconds = 0.05
[spools]
{mounts}{weights}
[database]
url = "{self.url}"
[queue]
lease_seconds = {LEASE_SECONDS}
heartbeat_seconds = 1
retry_delay_seconds = 0
[completion]
stable_seconds = 30
sweep_seconds = 0.3
[[completion.senders]]
calling_ae = "MOD0"
mode = "release"
release_grace_seconds = 0.2
{"".join(f'[[completion.senders]]{chr(10)}calling_ae = "MOD{i}"{chr(10)}mode = "release"{chr(10)}'
         f'release_grace_seconds = 0.2{chr(10)}' for i in range(1, 6))}
[gate]
min_slices = 16
scope_check = false
[dispatch]
initial_backoff_seconds = 0.5
max_backoff_seconds = 2
{HOST_DISK_ADMISSION}
{self.orthanc_toml}""")

    def upgrade(self) -> None:
        """The schema once, before any process starts (`pacsnode db upgrade`)."""
        subprocess.run([sys.executable, "-m", "node.cli", "db", "upgrade", "--config",
                        str(self.listeners[0].config_path)], cwd=REPO, env=node_env(), capture_output=True,
                       text=True, timeout=120, check=True)

    def all(self) -> list[RoleProcess]:
        return self.listeners + self.workers + self.dispatchers

    def stop(self) -> None:
        for process in self.all():
            process.stop()


def send(listener: RoleProcess, series: CtSeries, aet: str) -> dict[str, str]:
    """storescu -v over one association → {file: store response} for the files it got an answer for."""
    return dcmtk.store_responses(listener.port, series.paths[0].parent, calling_ae=aet, called_ae=listener.ae_title,
                                 timeout=180)


def acknowledged(answers: dict[str, str]) -> list[Path]:
    return [Path(f) for f, status in answers.items() if status == "Success"]


def query(engine: sa.Engine, sql: str, **params: object) -> list[sa.Row]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql), params))


def kill_a_worker_mid_job(engine: sa.Engine, deployment: Deployment) -> tuple[int, RoleProcess]:
    """SIGKILL the worker holding a running job (its holder names its pid); returns (job id, the killed worker).
    The job must still be running under the dead worker's lease afterwards: the kill landed mid-job."""
    pids = {w.pid: w for w in deployment.workers}

    def held() -> tuple[int, RoleProcess] | None:
        for row in query(engine, "select id, holder from jobs where state = 'running'"):
            pid = int(str(row.holder).split(":")[2])
            if pid in pids:
                return int(row.id), pids[pid]
        return None

    job_id, victim = wait_until(held, 240, "a job running in a worker", lambda: "\n".join(
        w.log_tail() for w in deployment.workers))
    victim.kill()
    victim.proc.wait(10)  # type: ignore[union-attr]
    (row,) = query(engine, "select state, holder from jobs where id = :i", i=job_id)
    assert row.state == "running" and f":{victim.pid}:" in row.holder, "the kill did not land mid-job"
    return job_id, victim


def check_results(engine: sa.Engine, orthanc, series: list[CtSeries], deployment: Deployment) -> None:
    """One SR and one SEG per series at Orthanc; each series' index rows are its slices, each readable."""
    def whole() -> bool:
        found = results_by_study(orthanc)
        return all(len(found.get(s.study_uid, {}).get("SEG", [])) >= 1 for s in series)

    wait_until(whole, 240, "SR and SEG for every series at Orthanc", lambda: "\n".join(
        p.log_tail(1500) for p in deployment.all()))
    wait_until(lambda: query(engine, "select count(*) as n from jobs where state not in ('done', 'skipped', 'dead')"
                             )[0].n == 0, 60, "every job ended")
    found = results_by_study(orthanc)
    for s in series:
        assert len(found[s.study_uid]["SR"]) == 1 and len(found[s.study_uid]["SEG"]) == 1, s.study_uid
    jobs = query(engine, "select series_uid, state, version from jobs")
    assert sorted(j.series_uid for j in jobs) == sorted(s.series_uid for s in series)  # one job each, version 1
    assert {j.state for j in jobs} == {"done"}


def check_indexed(engine: sa.Engine, acked: list[Path], deployment: Deployment) -> None:
    """Every acknowledged instance has its one row, and the file its spool id names is the one sent."""
    roots = deployment.spool_ids()
    rows = {r.sop_uid: r for r in query(engine, "select sop_uid, spool_id, path from instances")}
    for path in acked:
        row = rows[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID]
        assert not Path(row.path).is_absolute()
        assert content(roots[row.spool_id] / row.path) == content(path)


@pytest.fixture
def deployment(postgres_server, orthanc_factory, tmp_path):
    require_tool("storescu")
    require_weights()
    orthanc = orthanc_factory()
    made = Deployment(postgres_server.create_database(), tmp_path, orthanc.destination_toml())
    made.orthanc = orthanc  # type: ignore[attr-defined]
    try:
        yield made
    finally:
        made.stop()


def _start(deployment: Deployment) -> sa.Engine:
    deployment.write_configs()
    deployment.upgrade()
    for process in deployment.workers + deployment.dispatchers + deployment.listeners:
        process.start()
    for process in deployment.all():
        process.wait_ready()
    return sa.create_engine(deployment.url)


def test_two_workers_one_killed_mid_job(deployment, tmp_path):
    """Default suite: 1 listener, 2 workers, 1 dispatcher, 2 series; one worker killed mid-job."""
    t0 = time.monotonic()
    listener = deployment.add("listener", "listener-a")
    deployment.add("worker", "worker-a")
    deployment.add("worker", "worker-b")
    deployment.add("dispatcher", "dispatcher")
    engine = _start(deployment)
    try:
        series = [write_ct_series(tmp_path / f"s{i}", slices=24, size=64, seed=70 + i) for i in range(2)]
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda i: send(listener, series[i], f"MOD{i}"), range(2)))
        assert all(len(acknowledged(a)) == 24 for a in answers)
        job_id, victim = kill_a_worker_mid_job(engine, deployment)
        check_results(engine, deployment.orthanc, series, deployment)  # type: ignore[attr-defined]
        (job,) = query(engine, "select attempts, state from jobs where id = :i", i=job_id)
        assert job.state == "done" and job.attempts >= 2  # the survivor took it over after the lease expired
        check_indexed(engine, [p for a in answers for p in acknowledged(a)], deployment)
        print(f"\n1 listener, 2 workers ({victim.config_path.parent.name} killed mid-job {job_id}), 2 series: "
              f"{time.monotonic() - t0:.1f} s")
    finally:
        engine.dispose()


@pytest.mark.slow
def test_two_listeners_two_workers_six_modalities_with_kills(deployment, tmp_path):
    t0 = time.monotonic()
    listeners = [deployment.add("listener", "listener-a"), deployment.add("listener", "listener-b")]
    deployment.add("worker", "worker-a")
    deployment.add("worker", "worker-b")
    deployment.add("dispatcher", "dispatcher")
    engine = _start(deployment)
    try:
        # Modality 0 sends a longer series to listener a, which is killed once some of it is acknowledged.
        series = [write_ct_series(tmp_path / f"s{i}", slices=120 if i == 0 else 24, size=64, seed=80 + i)
                  for i in range(6)]
        cut, other = listeners
        with ThreadPoolExecutor(6) as pool:
            sending = [pool.submit(send, listeners[i % 2], series[i], f"MOD{i}") for i in range(6)]
            wait_until(lambda: query(engine, "select count(*) as n from instances where series_uid = :s",
                                     s=series[0].series_uid)[0].n >= 10, 120, "modality 0 half-way",
                       cut.log_tail)
            cut.kill()
            answers = [f.result() for f in sending]
        acked = [p for a in answers for p in acknowledged(a)]
        assert 0 < len(acknowledged(answers[0])) < 120, "the kill cut no transfer short"
        cut_short = [i for i in range(6) if len(acknowledged(answers[i])) < len(series[i].sop_uids)]
        assert all(i % 2 == 0 for i in cut_short)  # only listener a's modalities lost their association
        cut.proc.wait(10)  # type: ignore[union-attr]
        cut.start()  # restarted: it closes its own dangling associations
        # Each modality cut short resends its whole series, to the other listener (its first choice was down).
        with ThreadPoolExecutor(len(cut_short)) as pool:
            again = list(pool.map(lambda i: send(other, series[i], f"MOD{i}"), cut_short))
        assert all(len(acknowledged(a)) == len(series[i].sop_uids) for i, a in zip(cut_short, again, strict=True))
        acked += [p for a in again for p in acknowledged(a)]

        job_id, victim = kill_a_worker_mid_job(engine, deployment)
        check_results(engine, deployment.orthanc, series, deployment)  # type: ignore[attr-defined]
        (job,) = query(engine, "select attempts, state from jobs where id = :i", i=job_id)
        assert job.state == "done" and job.attempts >= 2
        check_indexed(engine, acked, deployment)
        counts = {r.series_uid: r.instance_count for r in query(engine, "select series_uid, instance_count from series")}
        assert counts == {s.series_uid: len(s.sop_uids) for s in series}  # each instance indexed once
        assert len(query(engine, "select sop_uid from instances")) == sum(len(s.sop_uids) for s in series)
        spools = {r.spool_id for r in query(engine, "select distinct spool_id from instances")}
        # Listener b's spool holds its own series and every resend; a's, what it had whole before the kill.
        assert "spool-listener-b" in spools and spools <= set(deployment.spool_ids())
        print(f"\n2 listeners ({cut.config_path.parent.name} killed after {len(acknowledged(answers[0]))}/120 "
              f"acknowledged; modalities {cut_short} resent), 2 workers ({victim.config_path.parent.name} killed mid-job {job_id}), 6 series: "
              f"{time.monotonic() - t0:.1f} s")
    finally:
        engine.dispose()

