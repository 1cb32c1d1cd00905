"""node.logs: each event is one JSON line written in one call, so role processes sharing stderr (unbuffered, as
under PYTHONUNBUFFERED in the Docker image) never glue their lines together."""

from __future__ import annotations

import json
import sys

from node.logs import configure_logging, get_logger


class Writes:
    """A text stream that records each ``write`` call as the OS would see it unbuffered."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_an_event_is_one_line_in_one_write():
    stream = Writes()
    configure_logging("INFO", stream)
    try:
        get_logger(component="test").info("instance_stored", sop_uid="1.2.3", size=9514, PatientName="X")
    finally:
        configure_logging("INFO", sys.stderr)
    assert len(stream.calls) == 1, stream.calls
    (line,) = stream.calls
    assert line.endswith("\n") and line.count("\n") == 1
    event = json.loads(line)
    assert event["event"] == "instance_stored" and event["sop_uid"] == "1.2.3"
    assert event.get("PatientName") in (None, "[removed]")  # the PHI filter still runs
