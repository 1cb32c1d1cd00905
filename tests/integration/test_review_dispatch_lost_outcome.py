"""Review of result dispatch: a delivery whose outcome a database outage lost, whose destination a reload then
removes. The PACS (a real Orthanc) stored the objects, but PostgreSQL went away (``pg_ctl stop -m fast``) before
the dispatcher could write "delivered": the row stayed ``sending`` under a lease that then ran out. Such a row is
normally taken back by its destination's sending thread; a reload that removed the destination left no thread to
take it, and the sweep dead-lettered only waiting rows, so it stayed ``sending`` - on /admin, in
``pacsnode_deliveries{state="sending"}``, never given up, never dead-lettered - until the node restarted. Now the
sweep puts it back to waiting once its lease has run out (a later reload may bring the destination back) and its
give-up time dead-letters it as "destination not configured", as it does a waiting row's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from node.config import Destination, DestinationKind
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher
from node.errors import DatabaseError
from node.senders import DimseSender
from node.states import DeliveryState
from peers.orthanc import OrthancServer
from peers.postgres import PostgresServer
from tests.fakeclock import FakeClock
from tests.integration.test_dispatch_orthanc import ResultFiles
from tests.integration.test_review_db_outage import restartable_postgres  # noqa: F401 - the fixture
from tests.integration.test_review_dispatch_gaps import GIVE_UP, _config, _pacs, result  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


class _OutageAfterSend(DimseSender):
    """The node's own C-STORE sender; once its first send has reached the PACS, the database goes away."""

    def __init__(self, pg: PostgresServer) -> None:
        super().__init__("PACSNODE", 5)
        self.pg: PostgresServer | None = pg

    def send(self, destination: Destination, files: Sequence[Path]) -> None:
        super().send(destination, files)
        if (pg := self.pg) is not None:
            self.pg = None
            pg.pause()


def test_a_sending_row_whose_outcome_was_lost_is_given_up_once_its_destination_is_removed(
        restartable_postgres: PostgresServer,  # noqa: F811 - the fixture
        orthanc_factory: Callable[..., OrthancServer], result: ResultFiles) -> None:  # noqa: F811 - the fixture
    orthanc = orthanc_factory()
    pg = restartable_postgres
    engine: Any = create_engine_for(pg.create_database())
    init_schema(engine)
    try:
        clock = FakeClock(1_000_000.0)
        dispatcher = Dispatcher(_config(_pacs(orthanc, "ORTHANC")), engine,
                                {DestinationKind.DIMSE: _OutageAfterSend(pg)}, clock=clock, rng=lambda: 0.5)
        [delivery] = dispatcher.enqueue(result.series_uid, 1, result.paths, result.sop_uids)
        with pytest.raises(DatabaseError):  # the PACS has the objects; "delivered" could not be written
            dispatcher.run_once()
        pg.resume()
        assert sorted(orthanc.sop_instance_uids()) == sorted(result.sop_uids)
        row = dispatcher.get(delivery)
        assert row is not None and row.state == DeliveryState.SENDING
        dispatcher.apply_config(_config())  # the destination removed by a hot reload
        clock.advance(float(row.lease_until) - clock() + 1)  # its lease runs out
        dispatcher.run_once()
        row = dispatcher.get(delivery)
        assert row is not None and row.state == DeliveryState.PENDING, row.state  # as a removed one's waiting rows
        clock.advance(GIVE_UP)
        dispatcher.run_once()
        row = dispatcher.get(delivery)
        assert row is not None and row.state == DeliveryState.DEAD, row.state
        assert "destination not configured" in row.last_error
    finally:
        engine.dispose()
