"""The node's lifecycle: build every stage from one `NodeConfig`, run until a signal, shut down in two stages.

`Service(config)` wires database → spool → index → ingest → DIMSE server. `start()` returns once the node
listens; `run_forever()` blocks until SIGINT/SIGTERM: the first stops accepting and drains, a second forces exit.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

from node.config import NodeConfig
from node.db import create_engine_for, init_schema
from node.dimse import DimseServer
from node.index import Index
from node.ingest import Ingestor
from node.logs import get_logger
from node.spool import Spool


class Service:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.log = get_logger(component="service")
        config.node.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine_for(config.database_url)
        init_schema(self.engine)
        self.spool = Spool(config.node.spool_dir)
        self.index = Index(self.engine)
        self.ingestor = Ingestor(self.spool, self.index)
        self.dimse = DimseServer(config, self.ingestor, self.index)
        self._stop = threading.Event()
        self._signals = 0

    def start(self) -> None:
        dangling = self.index.close_dangling_associations()
        if dangling:
            self.log.warning("associations_left_open_by_previous_run", count=dangling)
        self.dimse.start()

    def stop(self) -> None:
        self.dimse.stop()
        self.engine.dispose()
        self.log.info("node_stopped")

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            self.log.warning("forced_exit", signal=signal.Signals(signum).name)
            raise SystemExit(130)
        self.log.info("shutting_down", signal=signal.Signals(signum).name)
        self._stop.set()

    def run_forever(self, on_started: Callable[[], None] | None = None) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        self.start()
        if on_started is not None:
            on_started()
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.stop()
