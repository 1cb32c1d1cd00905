"""The ``evaluate`` and ``train-final`` subcommands: their arguments, the settings they build, and exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from training.common import TrainingError, existing_model
from training.crossval.final import run_final
from training.crossval.run import run_evaluation
from training.crossval.settings import BOOTSTRAP, REPORT_DIR, VAL_FRACTION, EvaluateSettings, FinalSettings


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The fields both subcommands' settings take from the common arguments."""
    return {"data": args.data, "labels": args.labels, "seed": args.seed, "quick": args.quick, "epochs": args.epochs,
            "warmup_steps": args.warmup_steps, "max_slices": args.max_slices, "val_fraction": args.val_fraction,
            "cache_dir": args.cache_dir, "allow_unlabelled": args.allow_unlabelled, "progress": not args.quiet,
            "class_weighting": args.class_weighting}


def cmd_evaluate(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from models.errors import ModelError
    from training.report import headline_table

    st = EvaluateSettings(**_run_settings(args), folds=args.folds, out=args.out, bootstrap=args.bootstrap,
                          resume=args.resume, only_folds=args.only_folds, weights_dir=args.weights_dir,
                          segmenter_version=args.segmenter_version,
                          ablation=args.ablation, prevalence=args.prevalence, lesion_evidence=args.lesion_evidence)
    try:
        m = run_evaluation(st)
    except (TrainingError, ModelError, ValueError) as exc:
        _err(str(exc))
        return 1
    if args.only_folds is not None:
        print(f"folds {m['only_folds']} done (reused {m['reused']}); run without --only-folds for the report")
        return 0
    print(headline_table(m))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_train_final(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from models.errors import ModelError

    if not args.overwrite and (why := existing_model(args.out)):
        _err(why)
        return 2
    st = FinalSettings(**_run_settings(args), out=args.out, version=args.version, cv_metrics=args.cv_metrics)
    try:
        card = run_final(st)
    except (TrainingError, ModelError, ValueError, OSError) as exc:
        _err(str(exc))
        return 1
    t = card["training"]
    print(f"wrote {card['name']} {card['version']} to {args.out} (training {t['train_seconds']:.0f} s, "
          f"best epoch {t['best_epoch']}, threshold {card['threshold']:.3f})")
    return 0


def _fold_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected fold numbers like 7,8,9, got {text!r}") from exc


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder: DICOM series in any layout + a label table")
    p.add_argument("--labels", help="label table CSV (default: clinical.csv or labels.csv in --data)")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, training and bootstrap (default 0)")
    p.add_argument("--quick", action="store_true", help="tiny model and epochs (tests, smoke runs)")
    p.add_argument("--epochs", type=int, help="epochs per model (default: the trainer's)")
    p.add_argument("--warmup-steps", type=int, help="slice warm-up steps per model (default: the trainer's)")
    p.add_argument("--max-slices", type=int, help="slices per series in a training step (default: the trainer's)")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                   help=f"inner validation share for best epoch and threshold (default {VAL_FRACTION})")
    p.add_argument("--cache-dir", help="preprocessed-array cache (default: evaluate: OUT/cache, "
                   f"train-final: {REPORT_DIR / 'cache'})")
    p.add_argument("--allow-unlabelled", action="store_true", help="ignore series the table does not label")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-class-weights", dest="class_weighting", action="store_false",
                   help="plain BCE instead of the inverse-class-frequency weighted series loss")


def register(subparsers: Any) -> None:
    """Add ``evaluate`` (cross-validation report) and ``train-final`` to an argparse subparsers object."""
    e = subparsers.add_parser("evaluate", help="k-fold cross-validation of the classifier with a full report")
    _common(e)
    e.add_argument("--folds", type=int, default=10, help="number of folds (default 10)")
    e.add_argument("--out", default=str(REPORT_DIR), help=f"report folder (default {REPORT_DIR})")
    e.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help=f"bootstrap resamples (default {BOOTSTRAP})")
    e.add_argument("--no-resume", dest="resume", action="store_false",
                   help="retrain every fold even where --out holds a finished fold with the same split and settings")
    e.add_argument("--only-folds", type=_fold_list, metavar="K[,K...]",
                   help="train only these folds (no report); a later run without it assembles the report")
    e.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="skip the image-only arm (the ablation trains a second model per fold)")
    e.add_argument("--no-lesion-evidence", dest="lesion_evidence", action="store_false",
                   help="skip the arm that fuses the classifier with the segmenter's lesion evidence")
    e.add_argument("--prevalence", type=float, default=0.10,
                   help="target prevalence of the imbalance section (default 0.10)")
    e.add_argument("--weights-dir",
                   help="weights folder whose segmenter gives the lesion evidence and draws the example overlays "
                        "(default: shipped)")
    e.add_argument("--segmenter-version", help="that segmenter's version (default: its newest released)")
    e.set_defaults(func=cmd_evaluate)

    t = subparsers.add_parser("train-final", help="train the classifier to ship on all cases (CV settings)")
    _common(t)
    t.add_argument("--out", required=True, help="model folder (model.keras, model_card.json)")
    t.add_argument("--overwrite", action="store_true", help="replace a model already in --out (refused otherwise)")
    t.add_argument("--version", default="0.0.0-dev", help="version recorded in the model card")
    t.add_argument("--cv-metrics", help="metrics.json of the cross-validation, recorded in the card")
    t.set_defaults(func=cmd_train_final)


def main(argv: list[str] | None = None) -> int:
    import training.crossval as package

    parser = argparse.ArgumentParser(prog="python -m training.crossval",
                                     description=(package.__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))
