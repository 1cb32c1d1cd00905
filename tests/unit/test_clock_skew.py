"""Clock skew against the database (node.db.clock_skew_seconds): hosts sharing a PostgreSQL database compare each
other's timestamps (completion's quiet timer, leases), so each measures its clock against the server's — read on a
real PostgreSQL, exported as a metric and shown in /readyz; SQLite (one host) has none."""

from __future__ import annotations

import time

from node.db import clock_skew_seconds, create_engine_for, init_schema
from node.http import HealthProbe
from node.metrics import Metrics


def test_the_skew_to_a_postgresql_server_is_measured(engine, tmp_path):
    if engine.dialect.name != "postgresql":
        assert clock_skew_seconds(engine) is None  # SQLite: the node's own clock is the only one
        return
    assert abs(clock_skew_seconds(engine)) < 0.5  # the same machine
    assert 39.5 < clock_skew_seconds(engine, clock=lambda: time.time() + 40) < 40.5  # a host 40 s ahead

    metrics = Metrics()
    metrics.bind(clock_skew=lambda: clock_skew_seconds(engine, clock=lambda: time.time() - 7))
    text = metrics.render()[0].decode()
    value = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("pacsnode_clock_skew_seconds "))
    assert -7.5 < value < -6.5
    report = HealthProbe(engine, tmp_path, lambda: True).report()
    assert report["ready"] and abs(report["clock_skew_seconds"]) < 0.5


def test_no_skew_is_exported_for_sqlite(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    metrics = Metrics()
    metrics.bind(clock_skew=lambda: clock_skew_seconds(engine))
    assert "pacsnode_clock_skew_seconds" not in metrics.render()[0].decode()
    assert "clock_skew_seconds" not in HealthProbe(engine, tmp_path, lambda: True).report()
    engine.dispose()
