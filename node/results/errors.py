"""The one exception type of `node.results`: a result object could not be built (a `NodeError`)."""

from __future__ import annotations

from node.errors import NodeError


class ResultsError(NodeError):
    """Raised when an SR or SEG cannot be built from the given inputs.

    The message names the offending parameter or the step that failed; errors raised by highdicom or pydicom are
    chained (``raise ResultsError(...) from exc``).
    """
