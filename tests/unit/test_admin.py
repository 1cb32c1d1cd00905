"""The admin status page over a real SQLite database filled by the real stages — ingest, completion (routes),
queue, worker (fixed-output model runner) and dispatcher (senders at their seam: one PACS that takes everything,
one archive that refuses every object) — served by Starlette's TestClient: what the page shows, what it never
shows, escaping, and the retry action's token, CSRF and input rules."""

from __future__ import annotations

import time
import tomllib
import warnings
from pathlib import Path

import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.routing import Mount

from node.admin import MAX_FORM_BYTES, admin_routes
from node.completion import CompletionSweeper
from node.config import DestinationKind, NodeConfig
from node.db import create_engine_for, init_schema, metadata
from node.dispatch import Dispatcher
from node.errors import SendError
from node.index import Index
from node.ingest import Ingestor, Origin
from node.queue import JobQueue, jobs
from node.reachability import Reachability
from node.senders import PermanentSendError, Sender
from node.spool import Spool
from node.states import DeliveryState, JobState, SeriesState
from node.worker import Worker
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes
from tests.fakeclock import FakeClock
from tests.unit.test_worker import FixedRunner, RecordingSender, queue_job

with warnings.catch_warnings():
    # starlette 1.x prefers the httpx2 package for its TestClient; httpx still works and is what we install.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from starlette.testclient import TestClient

TOKEN = "admin-s3cret-token"
ARCHIVE_TOKEN = "archive-upload-s3cret"
HOSTILE = "<script>alert('x')</script> & \"quoted\""  # an error text a peer could have sent back
REPO = Path(__file__).resolve().parents[2]


class RefusingSender(Sender):
    """A PACS that refuses the objects themselves: every delivery is dead-lettered at once with this error."""

    def send(self, destination, files):
        raise PermanentSendError(f"0xA900 refused by {destination.name}: {HOSTILE}")


class Site:
    """A node's stages over one database, the clock faked; `series` runs one series through all of them."""

    def __init__(self, tmp_path: Path, token: str | None = TOKEN) -> None:
        self.tmp_path = tmp_path
        self.clock = FakeClock(1_790_000_000.0)
        self.config = NodeConfig.model_validate({
            "node": {"data_dir": str(tmp_path / "data"), "ae_title": "NODE-AE",
                     **({"dicomweb_token": token} if token else {})},
            "completion": {"stable_seconds": 5},
            "queue": {"max_attempts": 1, "retry_delay_seconds": 0},
            "gate": {"min_slices": 8, "scope_check": False},  # the fixed runner's masks are no real lungs
            "retention": {"max_disk_percent": None},
            "destinations": [
                {"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                {"name": "archive", "kind": "dicomweb", "url": "http://archive.invalid/dicom-web",
                 "token": ARCHIVE_TOKEN},
            ],
        })
        self.engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
        init_schema(self.engine)
        self.index = Index(self.engine, clock=self.clock)
        self.ingestor = Ingestor(Spool(self.config.node.spool_dir), self.index)
        self.queue = JobQueue(self.engine, self.config.queue, clock=self.clock)
        self.sender = RecordingSender()
        self.dispatcher = Dispatcher(
            self.config, self.engine,
            {DestinationKind.DIMSE: self.sender, DestinationKind.DICOMWEB: RefusingSender()}, clock=self.clock,
        )
        self.sweeper = CompletionSweeper(self.config, self.engine, self.queue, clock=self.clock)
        self.token = token

    def series(self, name: str, seed: int, *, runner: FixedRunner | None = None) -> str:
        """Receive a 10-slice chest CT, let the quiet timer complete it (routes decide), run its job, deliver."""
        made = write_ct_series(self.tmp_path / name, size=32, slices=10, seed=seed)
        for path in made.paths:
            self.ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT-ROOM-1", f"assoc-{name}"))
        self.clock.advance(10)
        assert [uid for uid, _, _ in self.sweeper.sweep()] == [made.series_uid]
        Worker(self.config, self.engine, self.queue, self.dispatcher, lambda: runner or FixedRunner(0.9),
               clock=self.clock).run_pending()
        self.dispatcher.run_once()
        return made.series_uid

    def client(self, *, token: str | None = None) -> TestClient:
        routes = admin_routes(lambda: self.config, self.engine, token=token if token is not None else self.token,
                              dispatcher=self.dispatcher, queue=self.queue, index=self.index, clock=self.clock)
        app = Starlette(routes=[Mount("/admin", routes=routes)])
        return TestClient(app, base_url="http://node.local", follow_redirects=False)

    def dump(self) -> dict[str, list[tuple]]:
        """Every row of every table, to show that a request changed nothing."""
        with self.engine.connect() as conn:
            return {t.name: sorted(map(tuple, conn.execute(sa.select(t))), key=repr) for t in metadata.sorted_tables
                    if sa.inspect(self.engine).has_table(t.name)}

    def jobs_of(self, series_uid: str) -> list[sa.Row]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(jobs).where(jobs.c.series_uid == series_uid).order_by(jobs.c.version)))

    def delivery(self, series_uid: str, destination: str) -> sa.Row:
        (row,) = [d for d in self.dispatcher.for_series(series_uid) if d.destination == destination]
        return row


def page_with_retention(client: TestClient) -> str:
    """The page once its retention summary is in: the first view starts the dry run in the background, and a view
    shows the last one computed (node.adminsummary)."""
    deadline = time.monotonic() + 30
    while True:
        html = client.get("/admin/").text
        if "A purge would delete" in html or time.monotonic() > deadline:
            return html
        time.sleep(0.02)


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """One site with: a series delivered to the PACS and dead at the archive; a series whose model failed (dead job,
    its "processing failed" SR delivered); a job that died without any report (an alert)."""
    site = Site(tmp_path_factory.mktemp("admin"))
    good = site.series("good", seed=1)
    failed = site.series("failed", seed=2, runner=FixedRunner(fail=True))
    orphan = write_ct_series(site.tmp_path / "orphan", size=32, slices=10, seed=3)
    for path in orphan.paths:
        site.ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT-ROOM-2", "assoc-orphan"))
    queue_job(site.queue, orphan.series_uid)
    job = site.queue.claim("test-worker")
    assert job is not None and site.queue.fail(job, "test-worker", "worker lost the series") is JobState.DEAD
    yield site, {"good": good, "failed": failed, "orphan": orphan.series_uid}
    site.engine.dispose()


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.engine.dispose()


def test_the_page_lists_series_queue_deliveries_dead_letters_alerts_disk_retention_and_config(filled):
    site, uids = filled
    before = site.dump()
    with site.client() as client:
        page = client.get("/admin/")
        html = page_with_retention(client)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    good = site.index.get_series(uids["good"])
    assert (good.state, good.version, good.route) == (SeriesState.COMPLETE, 1, "chest-ct")
    for uid in uids.values():
        assert uid in html
    assert "chest-ct" in html and "CT-ROOM-1" in html and "NODE-AE" in html
    assert ">10<" in html  # instance count
    # deliveries per destination by state, and the dead letters with their errors
    assert site.delivery(uids["good"], "pacs").state == DeliveryState.DELIVERED
    dead = site.delivery(uids["good"], "archive")
    assert dead.state == DeliveryState.DEAD
    assert f'id="delivery-{dead.id}"' in html and f'name="delivery" value="{dead.id}"' in html
    assert "0xA900 refused by archive" in html
    (dead_job,) = [j for j in site.queue.last_errors(10) if j.series_uid == uids["failed"]]
    assert dead_job.state == JobState.DEAD and f'name="job" value="{dead_job.id}"' in html
    assert "model exploded" in html
    # the alert: a dead job with no report at all
    assert "ALERT" in html and "worker lost the series" in html
    # disk and retention dry run, the config with its secrets masked
    assert f"Fullest file system retention frees (<code>{site.config.node.spool_dir}</code>)" in html
    assert "A purge would delete" in html and "0 s old" in html  # the fake clock stands still
    assert '&#34;ae_title&#34;: &#34;NODE-AE&#34;' in html and "********" in html
    assert TOKEN not in html and ARCHIVE_TOKEN not in html
    # nothing that identifies the patient, nor the series description
    for value in ("TEST^CTGEN", "CTGEN-0001", "19700101", "CTGEN1", "ctgen test series"):
        assert value not in html
    assert site.dump() == before  # reading the page (and the retention dry run) changed nothing


def test_text_from_the_database_is_escaped_and_the_page_runs_no_scripts(filled):
    site, _ = filled
    with site.client() as client:
        page = client.get("/admin/")
    assert "<script" not in page.text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &#34;quoted&#34;" in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src" not in csp
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"


def test_get_never_changes_state(filled):
    site, uids = filled
    before = site.dump()
    dead = site.delivery(uids["good"], "archive")
    with site.client() as client:
        for url in ("/admin/", "/admin/?refresh=10", "/admin/?deliveries_retried=3&jobs_retried=1",
                    f"/admin/retry?delivery={dead.id}&token={TOKEN}", f"/admin/retry?all=deliveries&token={TOKEN}"):
            answer = client.get(url)
            assert answer.status_code in (200, 405), url
        assert client.get(f"/admin/retry?delivery={dead.id}&token={TOKEN}").status_code == 405
        assert client.head("/admin/").status_code == 200
    assert site.dump() == before


def test_retry_needs_the_token_and_then_makes_the_dead_delivery_pending(site):
    uid = site.series("s", seed=4)
    dead = site.delivery(uid, "archive")
    assert dead.state == DeliveryState.DEAD
    before = site.dump()
    with site.client() as client:
        no_token = client.post("/admin/retry", data={"delivery": str(dead.id)})
        wrong = client.post("/admin/retry", data={"delivery": str(dead.id), "token": "guess"})
        wrong_bearer = client.post("/admin/retry", data={"delivery": str(dead.id)},
                                   headers={"Authorization": "Bearer guess"})
        client.cookies.set("token", TOKEN)  # a cookie is no credential here (a cross-site form would carry it)
        cookie_only = client.post("/admin/retry", data={"delivery": str(dead.id)})
        client.cookies.clear()
        for refused in (no_token, wrong, wrong_bearer, cookie_only):
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        assert "Nothing was changed" in wrong.text and wrong_bearer.json() == {"error": "a valid token is required"}
        assert site.dump() == before

        # a browser behind a proxy's Basic authentication still acts with the form's token
        answer = client.post("/admin/retry", data={"delivery": str(dead.id), "token": TOKEN},
                             headers={"Authorization": "Basic cHJveHk6cGFzcw=="})
        assert answer.status_code == 303
        assert answer.headers["location"] == "/admin/?deliveries_retried=1&jobs_retried=0#dead-letters"
        row = site.delivery(uid, "archive")
        assert (row.state, row.attempts, row.last_error) == (DeliveryState.PENDING, 0, None)
        assert site.delivery(uid, "pacs").state == DeliveryState.DELIVERED  # only the one asked for
        shown = client.get(answer.headers["location"])
        assert "Queued again: 1 deliveries, 0 jobs." in shown.text and f'id="delivery-{dead.id}"' not in shown.text


def test_bearer_token_answers_json_and_retries_jobs_and_all_dead_deliveries(site):
    first = site.series("a", seed=5, runner=FixedRunner(fail=True))
    second = site.series("b", seed=6)
    (job,) = [j for j in site.queue.last_errors(10) if j.state == JobState.DEAD]
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with site.client() as client:
        answer = client.post("/admin/retry", data={"job": str(job.id)}, headers=bearer)
        assert answer.status_code == 200 and answer.json() == {"deliveries": 0, "jobs": 1}
        # its "processing failed" SR was recorded: replayed as the series' next version (node.versions.reissue)
        assert (site.queue.get(job.id).state, site.queue.get(job.id).skip_reason) == (JobState.SKIPPED, "superseded")
        assert [(j.state, j.version) for j in site.jobs_of(job.series_uid)] == [
            (JobState.SKIPPED, job.version), (JobState.QUEUED, job.version + 1)]
        answer = client.post("/admin/retry", data={"all": "deliveries"}, headers=bearer)
        assert answer.json() == {"deliveries": 2, "jobs": 0}
    assert {site.delivery(u, "archive").state for u in (first, second)} == {DeliveryState.PENDING}
    assert {site.delivery(u, "pacs").state for u in (first, second)} == {DeliveryState.DELIVERED}


def test_bad_retry_requests_are_refused_and_change_nothing(site):
    uid = site.series("s", seed=7, runner=FixedRunner(fail=True))  # a dead job and a dead delivery
    dead = site.delivery(uid, "archive")
    before = site.dump()
    with site.client() as client:
        cases = [
            ({"token": TOKEN}, 400),  # nothing asked for: never "retry everything" by omission
            ({"token": TOKEN, "job": ""}, 400),  # an empty id (JobQueue.retry([]) would mean all)
            ({"token": TOKEN, "delivery": "1; DROP TABLE deliveries"}, 400),
            ({"token": TOKEN, "delivery": "-1"}, 400),
            ({"token": TOKEN, "all": "everything"}, 400),
            ({"token": [TOKEN, TOKEN], "delivery": str(dead.id)}, 401),  # one token, not several
        ]
        for data, status in cases:
            assert client.post("/admin/retry", data=data).status_code == status, data
        as_json = client.post("/admin/retry", json={"token": TOKEN, "delivery": dead.id})
        assert as_json.status_code == 415
        big = client.post("/admin/retry", content=b"token=" + b"x" * (MAX_FORM_BYTES + 1),
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert big.status_code == 413
    assert site.dump() == before


def test_digits_outside_ascii_are_bad_values_not_500s(site):
    """str.isdigit() takes '²' (int() then raises: a 500), '٣' and '１' (int() reads 3 and 1): the page ignores
    them as it ignores other bad values (no refresh, no notice), a retry naming them is 400 and retries nothing."""
    site.series("s", seed=9, runner=FixedRunner(fail=True))  # a dead job and a dead delivery
    before = site.dump()
    odd = ("\u00b2", "\u0663", "\uff11")
    with site.client() as client:
        for value in (*odd, "9" * 5000):
            page = client.get("/admin/", params={"refresh": value, "deliveries_retried": value, "jobs_retried": value})
            assert page.status_code == 200, ascii(value)
            assert 'http-equiv="refresh"' not in page.text and "Queued again" not in page.text
            for field in ("job", "delivery"):
                refused = client.post("/admin/retry", data={"token": TOKEN, field: value})
                assert refused.status_code == 400, (field, ascii(value))
    assert site.dump() == before


def test_without_a_configured_token_the_page_is_read_only_and_actions_are_off(tmp_path):
    site = Site(tmp_path, token=None)
    uid = site.series("s", seed=8)
    dead = site.delivery(uid, "archive")
    with site.client() as client:
        page = client.get("/admin/")
        assert page.status_code == 200 and "Retry actions are off" in page.text and "<form" not in page.text
        assert "0xA900 refused by archive" in page.text
        refused = client.post("/admin/retry", data={"delivery": str(dead.id), "token": "anything"})
        assert refused.status_code == 403
    assert site.delivery(uid, "archive").state == DeliveryState.DEAD
    site.engine.dispose()


def test_mounting_refresh_and_an_empty_node(tmp_path):
    site = Site(tmp_path)
    with site.client() as client:
        assert client.get("/admin").status_code in (307, 308)  # the mount answers at /admin/
        page = client.get("/admin/")
        assert page.status_code == 200 and "No series received yet" in page.text
        assert 'action="/admin/retry"' in page.text and 'http-equiv="refresh"' not in page.text
        assert '<meta http-equiv="refresh" content="10">' in client.get("/admin/?refresh=10").text
        assert 'content="5"' in client.get("/admin/?refresh=1").text  # clamped
        assert 'http-equiv="refresh"' not in client.get("/admin/?refresh=soon").text
    site.engine.dispose()


def test_a_database_that_does_not_answer_gives_503(site):
    with site.client() as client:
        site.engine.dispose()
        (site.tmp_path / "node.db").unlink()
        (site.tmp_path / "node.db").mkdir()  # not a database any more
        answer = client.get("/admin/")
    assert answer.status_code == 503 and "database does not answer" in answer.text


def test_the_factory_fails_fast_on_bad_arguments(site):
    kwargs = dict(dispatcher=site.dispatcher, queue=site.queue, index=site.index)
    with pytest.raises(ValueError, match="token"):
        admin_routes(lambda: site.config, site.engine, token="  ", **kwargs)
    with pytest.raises(TypeError, match="config_getter"):
        admin_routes(site.config, site.engine, token=None, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dispatcher"):
        admin_routes(lambda: site.config, site.engine, token=None, dispatcher=None, queue=site.queue,
                     index=site.index)  # type: ignore[arg-type]


def test_the_templates_ship_with_the_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "templates/*" in project["tool"]["setuptools"]["package-data"]["node"]
    assert any(d.startswith("jinja2") for d in project["project"]["dependencies"])
    assert (REPO / "node" / "templates" / "admin.html").exists()


def test_the_page_shows_each_destinations_reachability_and_uncommitted_deliveries(site):
    def check(dest, calling_ae, timeout):
        if dest.name == "archive":
            raise SendError("HTTP 503")

    Reachability(site.config, site.engine, check=check, clock=site.clock).check_all()
    with site.client() as client:
        page = client.get("/admin/").text
    pacs = page.split('id="destination-pacs"')[1].split("</tr>")[0]
    archive = page.split('id="destination-archive"')[1].split("</tr>")[0]
    assert ">yes<" in pacs and "NO" not in pacs
    assert ">NO<" in archive and "HTTP 503" in archive
    assert ">off<" in pacs  # commitment is off for both: no uncommitted count to show
