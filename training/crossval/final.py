"""The model to ship (``train-final``): the classifier trained on every case with the cross-validation's
settings, its card recording the cross-validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.crossval.folds import describe_part, fit, set_determinism
from training.crossval.outputs import logger
from training.crossval.run import load_prepared
from training.crossval.settings import REPORT_DIR, FinalSettings
from training.crossval.splits import inner_split


def run_final(st: FinalSettings) -> dict[str, Any]:
    """Train and write the final model as ``st`` says; returns its card (see :func:`train_final`)."""
    from training.report import update_model_card

    out = Path(st.out)
    set_determinism(st.seed)
    ds, s, prep = load_prepared(st, REPORT_DIR / "cache")
    fit_idx, val_idx = inner_split(ds.labels, ds.groups, np.arange(len(ds.cases)), st.val_fraction, st.seed)
    fitted = fit([prep.cases[i] for i in fit_idx], [prep.cases[i] for i in val_idx], s, out,
                 describe_train=describe_part(ds, fit_idx, "training"),
                 describe_val=describe_part(ds, val_idx, "validation"),
                 version=st.version, progress=st.progress, log=logger(out / "train.log", st.progress))
    card = fitted.card
    if st.cv_metrics is not None:
        from models.registry import CARD_FILE

        card = update_model_card(out / CARD_FILE, Path(st.cv_metrics))
    return card


def train_final(data: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """Train the classifier to ship on every case with the cross-validation's settings (same inner validation
    share for the best epoch and threshold) and write it to ``out`` (model.keras + model_card.json via
    :func:`training.common.write_model`). ``options`` are the fields of :class:`FinalSettings`; with ``cv_metrics``
    (a metrics.json from :func:`training.crossval.evaluate`) the card's ``metrics.cross_validation`` is filled from
    it. Returns the card."""
    return run_final(FinalSettings(data=data, out=out, **options))
