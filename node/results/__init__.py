"""Result objects for the PACS: a TID 1500 SR (Comprehensive 3D SR), a lungs/lesion SEG and a key-images KOS, built
with highdicom.

Public surface: `build_results`, `build_skipped_sr`, `result_uid`, their inputs (`AlgorithmIdentity`, `Findings`,
`ModelNotes`, `SkipReason`, `Superseded`), the output `ResultSet`, and `ResultsError` (the only exception raised).
Modules, imported one way: codes → uids → attributes → content/geometry → seg → kos → sr.
"""

from node.results.codes import ResultKind, SkipReason
from node.results.content import AlgorithmIdentity, Findings, ModelNotes, ResultSet
from node.results.errors import ResultsError
from node.results.kos import build_key_images_kos, build_rejection_kos
from node.results.sr import Superseded, build_results, build_skipped_sr
from node.results.uids import result_uid

__all__ = [
    "AlgorithmIdentity",
    "Findings",
    "ModelNotes",
    "ResultKind",
    "ResultSet",
    "ResultsError",
    "SkipReason",
    "Superseded",
    "build_key_images_kos",
    "build_rejection_kos",
    "build_results",
    "build_skipped_sr",
    "result_uid",
]
