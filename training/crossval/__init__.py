"""Stratified, patient-grouped k-fold cross-validation of the classifier, compared with the readers' diagnoses.

:func:`evaluate` loads a labelled dataset (:mod:`training.dataset`), preprocesses it once (cached), splits it with
``StratifiedGroupKFold`` (no patient in two folds), trains one classifier per fold with
:func:`training.train.train_classifier_cases` (an inner, also patient-grouped, validation split of the training
folds picks the best epoch and the Youden threshold, so the test fold is touched only once), predicts the test fold
and writes ``out/``: ``metrics.json`` (deterministic for a seed), ``run.json`` (timings, environment),
``predictions.csv`` (out-of-fold), ``folds/fold-NN/`` (model, card, history), ``figures/*.png``, ``report.md`` and
``report.html``. :func:`train_final` trains the model to ship on all cases with the same settings.

The stages, one module each: :mod:`.settings` (one frozen object per subcommand), :mod:`.splits` (outer folds,
inner validation), :mod:`.folds` (train, reuse and predict each fold), :mod:`.claims` (the claim files that let
processes share the folds), :mod:`.metrics` (the numbers of ``metrics.json``), :mod:`.outputs` (writing JSON, CSV,
logs), :mod:`.run` (one evaluation from its settings), :mod:`.final` (the model to ship) and :mod:`.cli`.

``register(subparsers)`` adds the ``evaluate`` and ``train-final`` subcommands; ``python -m training.crossval``
runs them alone. Raises :class:`training.dataset.DatasetError` / :class:`training.common.TrainingError`.
"""

from training.common import TrainingError
from training.crossval.cli import cmd_evaluate, cmd_train_final, main, register
from training.crossval.final import run_final, train_final
from training.crossval.folds import Fitted, fit, predict, set_determinism
from training.crossval.metrics import METRICS, explanations, summarise
from training.crossval.run import evaluate, run_evaluation
from training.crossval.settings import (
    BOOTSTRAP,
    REPORT_DIR,
    VAL_FRACTION,
    EvaluateSettings,
    FinalSettings,
    classifier_settings,
)
from training.crossval.splits import inner_split, outer_folds
from training.dataset import DatasetError

__all__ = [
    "BOOTSTRAP", "METRICS", "REPORT_DIR", "VAL_FRACTION", "DatasetError", "EvaluateSettings", "FinalSettings",
    "Fitted", "classifier_settings", "cmd_evaluate", "cmd_train_final", "evaluate", "explanations", "fit",
    "inner_split", "main", "outer_folds", "predict", "register", "run_evaluation", "run_final",
    "set_determinism", "summarise", "train_final", "TrainingError",
]
