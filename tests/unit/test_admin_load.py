"""The status page under load, behind the real uvicorn server (`node.http.HttpServer`): no amount of ``GET /admin/``
delays the probes, whose handlers share Starlette's thread pool with it. The retention dry run never runs while a
request waits (the page shows the last summary), at most ``MAX_RENDERS`` pages render at once (the rest: 503 with
Retry-After, at once), and the page's reads of the ever-growing series and deliveries tables go through indexes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.routing import Mount

from node import retention
from node.admin import MAX_RENDERS, admin_routes
from node.http import HealthProbe, HttpServer
from tests.conftest import free_port
from tests.unit.test_admin import TOKEN, Site

FLOOD_CONNECTIONS = 48  # more than the 40 threads of Starlette's default pool
FLOOD_SECONDS = 3.0
READYZ_BOUND_SECONDS = 2.0  # idle it answers in milliseconds; a held pool made it wait for the whole dry run
HELD_SECONDS = 20.0  # how long a held dry run (or render) waits for the test at most


class Served:
    """A site's admin routes behind the real HTTP server, with ``/readyz`` (its checks run in the shared pool)."""

    def __init__(self, site: Site) -> None:
        node = site.config.node.model_copy(update={"host": "127.0.0.1", "http_port": free_port(),
                                                   "http_max_connections_per_peer": 4 * FLOOD_CONNECTIONS})
        config = site.config.model_copy(update={"node": node})
        routes = admin_routes(lambda: site.config, site.engine, token=TOKEN, dispatcher=site.dispatcher,
                              queue=site.queue, index=site.index, clock=site.clock)
        health = HealthProbe(site.engine, site.config.node.spool_dir, lambda: True)
        self.server = HttpServer(config, Starlette(routes=[Mount("/admin", routes=routes)]), health=health,
                                 graceful_seconds=2)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.port}"

    def readyz_seconds(self) -> float:
        with httpx.Client(timeout=HELD_SECONDS + 10) as client:
            started = time.monotonic()
            assert client.get(f"{self.url}/readyz").status_code == 200
            return time.monotonic() - started


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    s.engine.dispose()


@pytest.fixture
def served(site: Site) -> Iterator[Served]:
    s = Served(site)
    yield s
    s.server.stop(5)


@pytest.fixture
def held_dry_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Every retention dry run waits until the test sets ``release`` (at most HELD_SECONDS): a dry run over a long
    history, which takes seconds. ``calls`` counts them."""
    state: dict[str, Any] = {"calls": 0, "release": threading.Event()}
    real = retention.Retention.purge

    def purge(self: retention.Retention, *, dry_run: bool = False, scheduled: bool = False) -> retention.PurgeReport:
        if dry_run:
            state["calls"] += 1
            state["release"].wait(HELD_SECONDS)
        return real(self, dry_run=dry_run, scheduled=scheduled)

    monkeypatch.setattr(retention.Retention, "purge", purge)
    yield state
    state["release"].set()


async def _flood(url: str, until: float) -> list[httpx.Response]:
    """FLOOD_CONNECTIONS clients reloading the page back to back until ``until`` (monotonic)."""
    answers: list[httpx.Response] = []
    limits = httpx.Limits(max_connections=FLOOD_CONNECTIONS)
    async with httpx.AsyncClient(timeout=HELD_SECONDS + 10, limits=limits) as client:
        async def reload() -> None:
            while time.monotonic() < until:
                answers.append(await client.get(f"{url}/admin/"))

        await asyncio.gather(*(reload() for _ in range(FLOOD_CONNECTIONS)))
    return answers


def test_an_admin_flood_during_a_slow_retention_dry_run_never_delays_readyz(site, served, held_dry_run):
    idle = served.readyz_seconds()
    answers: list[httpx.Response] = []
    flood = threading.Thread(target=lambda: answers.extend(
        asyncio.run(_flood(served.url, time.monotonic() + FLOOD_SECONDS))))
    flood.start()
    try:
        under_flood = []
        while flood.is_alive() and len(under_flood) < 5:
            under_flood.append(served.readyz_seconds())
    finally:
        flood.join(HELD_SECONDS + 15)
    assert under_flood and max(under_flood) < READYZ_BOUND_SECONDS, (idle, under_flood)
    statuses = Counter(a.status_code for a in answers)
    assert set(statuses) <= {200, 503} and statuses[200] >= 1, statuses
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers["retry-after"].isdigit() and "busy" in answer.text
        else:  # every page answered from what was computed so far: nothing yet, the one dry run still held
            assert "not computed yet" in answer.text and "a new one is under way" in answer.text
    assert held_dry_run["calls"] == 1  # hundreds of page views, one background dry run
    held_dry_run["release"].set()
    deadline = time.monotonic() + 10
    with httpx.Client(timeout=10) as client:
        while "A purge would delete" not in (page := client.get(f"{served.url}/admin/").text):
            assert time.monotonic() < deadline, page
            time.sleep(0.02)
    assert held_dry_run["calls"] == 1


def test_pages_beyond_the_render_cap_get_503_with_retry_after_at_once(site, served, monkeypatch):
    inside, release = threading.Semaphore(0), threading.Event()
    real_counts = site.queue.counts

    def slow_counts() -> dict[str, int]:  # a render stuck on a slow database
        inside.release()
        release.wait(HELD_SECONDS)
        return real_counts()

    monkeypatch.setattr(site.queue, "counts", slow_counts)
    answers: list[httpx.Response] = []

    def get() -> None:
        with httpx.Client(timeout=HELD_SECONDS + 10) as client:
            answers.append(client.get(f"{served.url}/admin/"))

    renders = [threading.Thread(target=get) for _ in range(MAX_RENDERS)]
    try:
        for thread in renders:
            thread.start()
        for _ in renders:
            assert inside.acquire(timeout=10), "a render never started"
        with httpx.Client(timeout=5) as client:  # the old code queued it behind the others: a timeout here
            started = time.monotonic()
            busy = client.get(f"{served.url}/admin/")
            took = time.monotonic() - started
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5" and took < READYZ_BOUND_SECONDS
        assert "no-store" in busy.headers["cache-control"] and busy.headers["x-frame-options"] == "DENY"
        assert served.readyz_seconds() < READYZ_BOUND_SECONDS
    finally:
        release.set()
        for thread in renders:
            thread.join(HELD_SECONDS + 10)
    assert [a.status_code for a in answers] == [200] * MAX_RENDERS
    with httpx.Client(timeout=10) as client:  # the slots are free again
        assert client.get(f"{served.url}/admin/").status_code == 200


def test_the_pages_reads_of_series_and_deliveries_use_indexes(site, monkeypatch):
    """Series rows are never deleted: "recent series", the per-route counts and the dead letters must not scan or
    sort the whole table (SQLite's query plans of every statement the page runs)."""
    monkeypatch.setattr(retention.Retention, "purge", lambda self, **kw: retention.PurgeReport(dry_run=True))
    statements: list[tuple[str, Any]] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    sa.event.listen(site.engine, "before_cursor_execute", record)
    with site.client() as client:
        assert client.get("/admin/").status_code == 200
    sa.event.remove(site.engine, "before_cursor_execute", record)
    plans = {}
    with site.engine.connect() as conn:
        for statement, parameters in statements:
            details = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)]
            plans[" ".join(statement.split())[:120]] = details
    assert any("ORDER BY series.last_received_at DESC" in s for s, _ in statements)
    for statement, details in plans.items():
        for detail in details:
            for table in ("series", "deliveries", "jobs"):
                assert detail != f"SCAN {table}", (statement, details)  # a whole-table scan, no index
            assert "TEMP B-TREE FOR ORDER BY" not in detail, (statement, details)  # sorting every row for a LIMIT
