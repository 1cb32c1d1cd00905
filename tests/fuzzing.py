"""Shared hypothesis settings and byte mutations for the fuzz tests (tests/unit/test_fuzz_*.py).

`QUICK` runs in the default suite: derandomized (the same examples every run, so a failure reproduces) with a
small example count; `LONG` is for ``pytest -m slow`` (random, many more examples). Every crash found is kept as an
``@example`` on the test (or as bytes under tests/fixtures/fuzz/), so it is replayed on every run."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FIXTURES = Path(__file__).parent / "fixtures" / "fuzz"
_COMMON = dict(
    deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
QUICK = settings(derandomize=True, **_COMMON)  # type: ignore[arg-type]
LONG = settings(derandomize=False, **_COMMON)  # type: ignore[arg-type]

_OPS = ("cut", "flip", "insert", "delete", "length", "byte")


@st.composite
def mutated(draw: st.DrawFn, seed: bytes, hot: int = 1024) -> bytes:
    """``seed`` with 1-4 random edits (cut short, flip bits, insert/delete bytes, overwrite a 16/32-bit length
    field, set one byte), placed in the first ``hot`` bytes (element headers live there) three times in four."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(_OPS))
        limit = min(len(data), hot) if draw(st.integers(0, 3)) else len(data)
        at = draw(st.integers(0, max(limit - 1, 0)))
        if op == "cut":
            del data[at:]
        elif op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "length":
            width = draw(st.sampled_from([2, 4]))
            value = draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF]) | st.integers(0, (1 << 8 * width) - 1))
            data[at : at + width] = (value % (1 << 8 * width)).to_bytes(width, "little")
        else:
            data[at] = draw(st.integers(0, 255))
    return bytes(data)
