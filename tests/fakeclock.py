"""An injectable clock for the stages that take ``clock: Callable[[], float]`` (tests set ``now`` or `advance`)."""

from __future__ import annotations


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
