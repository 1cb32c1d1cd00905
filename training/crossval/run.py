"""One cross-validation run from its settings: load and prepare the dataset, run the folds, write metrics,
predictions, figures, ``run.json`` and the report."""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.clinical_table import disagreement_note
from training.common import TrainingError
from training.crossval.folds import FoldResults, run_folds, set_determinism
from training.crossval.metrics import build_metrics, reader_labels
from training.crossval.outputs import environment, logger, write_json, write_predictions
from training.crossval.settings import EvaluateSettings, RunSettings
from training.crossval.splits import outer_folds
from training.dataset import Dataset, load_dataset
from training.phi import file_ref
from training.prepared import Prepared, prepare
from training.train import ClassifierSettings


def load_prepared(st: RunSettings, cache_default: Path, log: Callable[[str], None] | None = None,
                  check: Callable[[Dataset], object] | None = None) -> tuple[Dataset, ClassifierSettings, Prepared]:
    """The dataset, the classifier settings it implies (slice supervision only with masks) and its cases on the
    model grid (cached); ``check`` sees the dataset before its cases are preprocessed (it raises to stop there).
    Raises DatasetError / ValueError."""
    ds = load_dataset(st.data, st.labels, allow_unlabelled=st.allow_unlabelled, progress=st.progress)
    if log is not None:
        for note in ds.notes[:20]:
            log(f"note: {note}")
        for rel, why in ds.unreadable[:20]:
            log(f"unreadable: {file_ref(ds.root, rel)}: {why}")
    if check is not None:
        check(ds)
    s0 = st.classifier(slice_labels=ds.has_masks)
    prep = prepare(ds, s0.grid, st.cache(cache_default), progress=st.progress)
    if log is not None:
        log(f"{len(prep.cases)} cases on a {s0.grid}² grid {'from the cache' if prep.from_cache else 'preprocessed'} "
            f"in {prep.seconds:.0f} s ({prep.path.name})")
        if note := disagreement_note(prep.age_sex_disagreements, len(prep.cases), "note: "):
            log(note)
    return ds, s0, prep


def _run_record(st: EvaluateSettings, started: str, t_start: float, ds: Dataset, prep: Prepared,
                res: FoldResults, image_only: FoldResults | None = None) -> dict[str, Any]:
    """``run.json``: when, how long, what was reused, the command, the machine, what the dataset skipped."""
    return {
        "started_utc": started,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "prepare_seconds": round(prep.seconds, 1),
        "prepare_from_cache": prep.from_cache,
        "fold_train_seconds": res.fold_seconds,
        "resumed_folds": res.resumed,
        "image_only_fold_train_seconds": image_only.fold_seconds if image_only is not None else None,
        "image_only_resumed_folds": image_only.resumed if image_only is not None else None,
        "command": st.command_line(),
        "environment": environment(),
        "dataset_notes": ds.notes,
        "unreadable_files": [[file_ref(ds.root, rel), why] for rel, why in ds.unreadable],
        "age_sex_disagreements": prep.age_sex_disagreements,
    }


def _lesion_arm(st: EvaluateSettings, ds: Dataset, prep: Prepared, res: FoldResults, out: Path,
                log: Callable[[str], None]) -> dict[str, Any]:
    """``metrics.json``'s ``lesion_evidence`` block, or ``{"skipped": why}`` (see training.crossval.lesion)."""
    import json

    from models.lesion_evidence import FEATURE_SETS, WITHOUT_CANDIDATES
    from training.crossval.lesion import Fused, fuse_folds, lesion_block, segmenter_features
    from training.crossval.outputs import json_default

    feats = segmenter_features(prep, st.weights_dir, st.cache(out / "cache"), log, st.segmenter_version)
    fused = fuse_folds(ds.labels, res.fold_of, res.p, res.validation, feats.of(), feats.names) \
        if not isinstance(feats, str) else feats
    if isinstance(fused, str) or isinstance(feats, str):
        log(f"lesion evidence arm skipped: {fused}")
        return {"skipped": fused}
    without = None
    if feats.feature_set != WITHOUT_CANDIDATES:  # the candidate stage's own gain, on the same folds
        names = FEATURE_SETS[WITHOUT_CANDIDATES]
        plain = fuse_folds(ds.labels, res.fold_of, res.p, res.validation, feats.of(names), names)
        without = plain if isinstance(plain, Fused) else None
    block = lesion_block(ds, ds.labels, res.fold_of, (res.p, res.thr), fused, feats, bootstrap=st.bootstrap,
                         seed=st.seed, without_candidates=without)
    return dict(json.loads(json.dumps(block, default=json_default)))


def run_evaluation(st: EvaluateSettings) -> dict[str, Any]:
    """Cross-validate as ``st`` says and write the report to ``st.out`` (see :func:`training.crossval.evaluate`).

    Returns the metrics, or ``{"only_folds", "reused"}`` with ``only_folds``.
    """
    from training import plots, report

    t_start = time.perf_counter()
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    out = Path(st.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(f"--out {out}: cannot make the report folder there ({exc.strerror})") from exc
    log = logger(out / "run.log", st.progress)
    set_determinism(st.seed)
    ds, s0, prep = load_prepared(st, out / "cache", log,  # a fold count the labels cannot fill: before preprocessing
                                 check=lambda d: outer_folds(d.labels, d.groups, st.folds, st.seed))
    res = run_folds(st, ds, prep, s0, log)
    image_only = run_folds(st, ds, prep, replace(s0, clinical_inputs=()), log, variant="image-only") \
        if st.ablation and s0.clinical_inputs else None
    if st.only_folds is not None:
        return {"only_folds": res.order, "reused": res.resumed}
    metrics = build_metrics(st, ds, prep, s0, res, image_only)
    if st.lesion_evidence:
        metrics["lesion_evidence"] = _lesion_arm(st, ds, prep, res, out, log)
    write_json(out / "metrics.json", metrics)
    write_predictions(out / "predictions.csv", ds, res.p, res.thr, res.fold_of, res.attention)
    figures = plots.make_figures(out / "figures", ds=ds, prep=prep, p=res.p, thr=res.thr, fold_of=res.fold_of,
                                 reader=reader_labels(ds), attention=res.attention, histories=res.histories,
                                 metrics=metrics, weights_dir=Path(st.weights_dir) if st.weights_dir else None,
                                 segmenter_version=st.segmenter_version,
                                 log=log)
    run = _run_record(st, started, t_start, ds, prep, res, image_only)
    write_json(out / "run.json", run)
    report.write_report(out, metrics, run, figures)
    log(f"wrote {out / 'report.md'} in {run['wall_seconds']:.0f} s")
    return metrics


def evaluate(data: str | Path, **options: Any) -> dict[str, Any]:
    """Cross-validate the classifier on ``data`` and write the report to ``out`` (see :mod:`training.crossval`);
    ``options`` are the fields of :class:`EvaluateSettings` (``folds``, ``out``, ``seed``, ``quick``, ...).

    With ``resume``, a fold whose model an earlier run finished in ``out`` for the same cases, split and
    settings is loaded instead of retrained (each fold reseeds, so the numbers are the same). The example-slice
    figure overlays the latest segmenter under ``weights_dir`` (default: the shipped weights). Returns the
    metrics (as written to metrics.json). With ``only_folds`` it trains just those folds (in that order, skipping
    any another process has claimed) and writes no report: several processes or machines sharing ``out`` can
    split the folds, and a final run without it waits for claimed folds and assembles the report. Raises
    DatasetError / TrainingError / ValueError (TypeError for an unknown option).
    """
    return run_evaluation(EvaluateSettings(data=data, **options))
