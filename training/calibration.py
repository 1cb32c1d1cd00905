"""Post-hoc calibration of the classifier's probability: temperature scaling fitted on the inner validation split.

:func:`fit_temperature` finds T minimising the validation negative log-likelihood of sigmoid(logit(p) / T) (one
parameter, so ranking, ROC AUC and the decision at a transformed threshold are unchanged);
:func:`calibration_block` is what a model card records under ``calibration`` (method, T, validation ECE and
NLL before and after, and the threshold on both scales); the registry applies it at inference
(:func:`models.registry.apply_temperature`). :func:`ece` is the expected calibration error over equal-width bins.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.registry import apply_temperature

ECE_BINS = 10
T_RANGE = (0.05, 20.0)


def ece(y: Any, p: Any, bins: int = ECE_BINS) -> float:
    """Expected calibration error: Σ_bins (n_b / n) · |mean p_b − observed rate_b| over ``bins`` equal-width bins."""
    y, p = np.asarray(y, dtype=np.float64).reshape(-1), np.asarray(p, dtype=np.float64).reshape(-1)
    if len(y) == 0:
        return float("nan")
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() / len(y) * abs(float(p[m].mean()) - float(y[m].mean()))
    return float(total)


def nll(y: Any, p: Any) -> float:
    y, p = np.asarray(y, dtype=np.float64), np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def fit_temperature(y: Any, p: Any) -> float:
    """T in :data:`T_RANGE` minimising the NLL of the temperature-scaled ``p`` on labels ``y`` (1.0 when ``y``
    holds one class only: nothing to fit)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.float64)
    if len(set(y.tolist())) < 2:
        return 1.0
    res = minimize_scalar(lambda lt: nll(y, apply_temperature(p, float(np.exp(lt)))),
                          bounds=tuple(np.log(T_RANGE)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def calibration_block(y: Any, p: Any, threshold: float, *, fitted_on: str) -> dict[str, Any]:
    """The card's ``calibration``: temperature T fitted on (y, p) — the validation split — with ECE/NLL before
    and after on that split, and ``threshold`` (chosen on uncalibrated p) on the calibrated scale."""
    t = fit_temperature(y, p)
    q = apply_temperature(np.asarray(p, dtype=np.float64), t)
    return {
        "method": "temperature",
        "temperature": round(t, 6),
        "fitted_on": fitted_on,
        "cases": int(len(np.asarray(y))),
        "ece_bins": ECE_BINS,
        "validation_ece_before": ece(y, p),
        "validation_ece_after": ece(y, q),
        "validation_nll_before": nll(y, p),
        "validation_nll_after": nll(y, q),
        "threshold_uncalibrated": float(threshold),
        "threshold": float(apply_temperature(float(threshold), t)),
    }
