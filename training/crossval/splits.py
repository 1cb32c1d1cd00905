"""The case splits: outer folds (stratified, patient-grouped) and the inner validation part of a training part."""

from __future__ import annotations

import numpy as np

from training.dataset import DatasetError


def outer_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs: stratified by label, no group (patient) in two folds. Raises DatasetError."""
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2:
        raise DatasetError(f"folds must be >= 2, got {folds}")
    per_class = {int(k): len({g for g, yy in zip(groups, y, strict=True) if yy == k}) for k in (0, 1)}
    if min(per_class.values()) < folds:
        raise DatasetError(f"{folds} folds need at least {folds} patients of each class",
                           [f"patients with label {k}: {n}" for k, n in per_class.items()])
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.sort(a), np.sort(b)) for a, b in splitter.split(np.zeros(len(y)), y, groups)]


def inner_split(
    y: np.ndarray, groups: np.ndarray, train_idx: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices into (fit, validation), about ``fraction`` for validation, patient-grouped and
    stratified; no validation (empty) when ``fraction`` is 0 or a class has fewer than two patients."""
    from sklearn.model_selection import StratifiedGroupKFold

    empty = np.array([], dtype=np.int64)
    if fraction <= 0:
        return train_idx, empty
    yt, gt = y[train_idx], groups[train_idx]
    smallest = min(len(set(gt[yt == k].tolist())) for k in (0, 1))
    n_splits = min(max(2, round(1.0 / fraction)), smallest)
    if n_splits < 2:
        return train_idx, empty
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fit, val = next(iter(splitter.split(np.zeros(len(yt)), yt, gt)))
    return np.sort(train_idx[fit]), np.sort(train_idx[val])
