"""The CT series writer lives in `peers.ctgen` (the benchmarks use it too); the tests import it from here."""

from peers.ctgen import CtSeries, write_ct_series

__all__ = ["CtSeries", "write_ct_series"]
