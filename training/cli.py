"""``pacsnode`` subcommands for phantoms, training and model evaluation (``register`` adds them to a parser).

- ``phantom --out DIR --cases N --seed S [--prevalence P] [--size PX|MIN-MAX] [--slices N|MIN-MAX]``
- ``train classifier|segmenter --data DIR --out DIR [--val-data DIR] [--epochs N] [--seed S] [--version V]
  [--warmup-steps N (classifier)] [--steps N (segmenter)] [--lesion-sampling slice|case (segmenter)]
  [--lesion-fraction F (segmenter)] [--hard-negatives F (segmenter)]
  [--hard-positives F [--hard-positive-kind any|background] (segmenter)] [--init DIR (segmenter)]
  [--learning-rate LR (segmenter)]``
- ``train candidates --data DIR [--data DIR …] --cache-dir DIR --out DIR [--segmenter-version V] [--epochs N]
  [--seed S] [--members N] [--weighting class|size] [--version V]``: the candidate stage over a shipped U-Net's components (`training.candidates`)
- ``model-eval --data DIR [--weights-dir DIR] [--classifier-version V] [--segmenter-version V] [--json F]
  [--write-card] [--compare-with OTHER.json]``
- ``fuse-lesion --data DIR --base-version V --version NEW [--segmenter-version V] [--candidates-version V]
  [--weights-dir DIR]``: a new classifier version fusing the segmenter's lesion evidence and the candidate stage's
  scores (`training.lesion_fusion`)

Each subcommand sets ``func(args) -> int`` (exit code: 0 ok, 1 failed, 2 bad arguments). Runnable alone as
``python -m training.cli ...`` until the node's CLI wires it in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from models.errors import ModelError
from models.lesion_evidence import POOL_SPACING_MM


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _unwritable(path: str | Path, what: str, *, folder: bool = True) -> str:
    """Why ``path`` cannot be written (a file where a folder is wanted or the reverse, or a nearest existing folder
    this user cannot write), checked before minutes of work; "" when it can."""
    p = Path(path).absolute()
    if p.exists() and p.is_dir() != folder:
        return f"{what} {path} is {'a file' if folder else 'a folder'}"
    if p.exists():
        return "" if os.access(p, os.W_OK) else f"{what} {path} is not writable"
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{what} {path} cannot be created: {parent} is a file"
    return "" if os.access(parent, os.W_OK | os.X_OK) else f"{what} {path} cannot be created in {parent} (not writable)"


def _quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cmd_phantom(args: argparse.Namespace) -> int:
    from training.phantom import PhantomError, generate_dataset

    try:
        table = generate_dataset(
            args.out, cases=args.cases, seed=args.seed, prevalence=args.prevalence, size=args.size,
            slices=args.slices, progress=not args.quiet, pleural_lesions=args.pleural_lesions,
        )
    except PhantomError as exc:
        _err(str(exc))
        return 2 if "must" in str(exc) or "expected" in str(exc) else 1
    print(f"wrote {len(table)} phantom series ({int(table.label.sum())} pneumonia) to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _quiet_tf()
    from training import train
    from training.common import TrainingError, existing_model

    if args.model == "candidates":
        if not args.overwrite and (why := existing_model(args.out)):
            _err(why)
            return 2
        return _train_candidates(args)
    if len(args.data) != 1:
        _err(f"train {args.model} takes one --data")
        return 2
    args.data = args.data[0]
    if why := _unwritable(args.out, "--out") or ("" if args.overwrite else existing_model(args.out)):
        _err(why)
        return 2
    common: dict[str, Any] = {"val_data": args.val_data, "version": args.version, "progress": not args.quiet,
                              "limit": args.limit}
    try:
        if args.model == "classifier":
            s = train.ClassifierSettings(**{k: v for k, v in (("epochs", args.epochs), ("seed", args.seed),
                                                              ("pretrain_steps", args.warmup_steps)) if v is not None})
            card = train.train_classifier(Path(args.data), Path(args.out), settings=s, **common)
        else:
            from training import segmenter

            given = (("epochs", args.epochs), ("seed", args.seed), ("steps_per_epoch", args.steps),
                     ("lesion_sampling", args.lesion_sampling), ("lesion_fraction", args.lesion_fraction),
                     ("hard_negative_fraction", args.hard_negatives), ("hard_positive_fraction", args.hard_positives),
                     ("hard_positive_kind", args.hard_positive_kind),
                     ("learning_rate", args.learning_rate))
            g = segmenter.SegmenterSettings(**{k: v for k, v in given if v is not None})
            card = segmenter.train_segmenter(Path(args.data), Path(args.out), settings=g,
                                             init=Path(args.init) if args.init else None, **common)
    except (TrainingError, ModelError) as exc:
        _err(str(exc))
        return 1
    t = card["training"]
    print(f"wrote {card['name']} {card['version']} to {args.out} "
          f"(load {t['load_seconds']:.0f} s, training {t['train_seconds']:.0f} s, best epoch {t['best_epoch']})")
    if card["metrics"].get("validation"):
        v = {k: v for k, v in card["metrics"]["validation"].items() if isinstance(v, float)}
        print("validation: " + ", ".join(f"{k} {x:.3f}" for k, x in v.items()))
    return 0


def _train_candidates(args: argparse.Namespace) -> int:
    from models.registry import Registry
    from training.candidates import CandidateSettings, train_candidates
    from training.common import TrainingError

    if not args.cache_dir:
        _err("train candidates needs --cache-dir (the prepared-array cache)")
        return 2
    if args.members is not None and args.members < 1:
        _err(f"--members must be at least 1, got {args.members}")
        return 2
    s = CandidateSettings(**{k: v for k, v in (("epochs", args.epochs), ("seed", args.seed),
                                               ("members", args.members), ("weighting", args.weighting))
                                    if v is not None})
    command = "pacsnode train " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])
    try:
        card = train_candidates([Path(d) for d in args.data], Path(args.out), registry=Registry(),
                                segmenter_version=args.segmenter_version, cache_dir=Path(args.cache_dir),
                                settings=s, version=args.version, command=command.strip(),
                                log=(lambda _m: None) if args.quiet else print)
    except (TrainingError, ModelError, OSError) as exc:
        _err(str(exc))
        return 1
    t = card["training"]
    print(f"wrote {card['name']} {card['version']} to {args.out}: {t['candidates']} candidates "
          f"({t['lesion_candidates']} lesion) from {t['cases']} cases, best epoch "
          f"{t['best_epoch'] if 'best_epoch' in t else [m['best_epoch'] for m in t['members']]}, held-out "
          f"ROC AUC {t['held_out_roc_auc']:.3f} (peak probability alone {t['held_out_roc_auc_peak_probability']:.3f})")
    return 0


def cmd_model_eval(args: argparse.Namespace) -> int:
    _quiet_tf()
    from models.registry import Registry
    from training.common import TrainingError
    from training.evaluate import evaluate, format_table, record_in_cards

    other = None
    if args.compare_with:  # read before minutes of evaluation, not after
        try:
            other = json.loads(Path(args.compare_with).read_text())
        except (OSError, ValueError) as exc:
            _err(f"cannot read --compare-with {args.compare_with}: {exc}")
            return 1
    if args.json and (why := _unwritable(args.json, "--json", folder=False)):
        _err(why)
        return 2
    reg = Registry(Path(args.weights_dir) if args.weights_dir else None)
    try:
        res = evaluate(Path(args.data), reg, classifier_version=args.classifier_version,
                       segmenter_version=args.segmenter_version, limit=args.limit, progress=not args.quiet)
    except (TrainingError, ModelError) as exc:
        _err(str(exc))
        return 1
    print(format_table(res))
    compared = True
    if other is not None:
        from training.evaluate import compare, format_comparison

        try:
            res["comparison"] = compare(res, other)
        except (KeyError, TypeError, TrainingError) as exc:
            _err(f"cannot compare with {args.compare_with}: {exc}")
            compared = False
        else:
            print("\n" + format_comparison(res["comparison"]))
    if args.json:  # written even when the comparison failed: the evaluation itself is not lost
        Path(args.json).write_text(json.dumps(res, indent=1, default=float) + "\n")
    if not compared:
        return 1  # the cards are left alone
    if args.write_card:
        command = "pacsnode model-eval " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])
        for p in record_in_cards(res, reg, command.strip()):
            print(f"recorded test metrics in {p}")
    return 0


def cmd_fuse_lesion(args: argparse.Namespace) -> int:
    _quiet_tf()
    from models.registry import Registry
    from training.common import TrainingError
    from training.lesion_fusion import fit_lesion_fusion

    reg = Registry(Path(args.weights_dir) if args.weights_dir else None)
    command = "pacsnode fuse-lesion " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])
    try:
        card = fit_lesion_fusion(Path(args.data), reg, base_version=args.base_version,
                                 segmenter_version=args.segmenter_version, version=args.version,
                                 candidates_version=args.candidates_version, command=command.strip(),
                                 progress=not args.quiet, pool_spacing_mm=args.pool_spacing_mm or None)
    except (TrainingError, ModelError, OSError) as exc:
        _err(str(exc))
        return 1
    v = card["metrics"]["validation"]
    b = v["before_lesion_fusion"]
    print(f"wrote classifier {card['version']} (classifier {card['derived_from']['classifier']} + lesion evidence "
          f"of {card['lesion_fusion']['segmenter']['name']} {card['lesion_fusion']['segmenter']['version']}), "
          f"threshold {card['threshold']:.3f}")
    print(f"fit set ({v['dataset']['cases']} cases, out-of-fold): ROC AUC {v['roc_auc']:.3f} (base {b['roc_auc']:.3f}), "
          f"sensitivity {v['sensitivity']:.3f} ({b['sensitivity']:.3f}), specificity {v['specificity']:.3f} "
          f"({b['specificity']:.3f})")
    return 0


def register(subparsers: Any) -> None:
    """Add ``phantom``, ``train``, ``model-eval`` and ``fuse-lesion`` to an argparse subparsers object."""
    p = subparsers.add_parser("phantom", help="write synthetic chest-CT phantom series (DICOM + masks + clinical.csv)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cases", type=int, required=True, help="number of series")
    p.add_argument("--seed", type=int, required=True, help="seed (same seed, same bytes)")
    p.add_argument("--prevalence", type=float, default=0.5, help="share of pneumonia cases (default 0.5)")
    p.add_argument("--size", default="256-512", help="matrix size N or MIN-MAX (default 256-512)")
    p.add_argument("--slices", default="40-160", help="slices per series N or MIN-MAX (default 40-160)")
    p.add_argument("--pleural-lesions", type=float, default=0.0, metavar="P",
                   help="training sets only: add a small consolidation against the chest wall or mediastinum to "
                        "this share of the non-subtle pneumonia cases (default 0: the standard mix)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_phantom)

    t = subparsers.add_parser("train", help="train the classifier, the U-Net or the candidate stage on phantoms")
    t.add_argument("model", choices=("classifier", "segmenter", "candidates"))
    t.add_argument("--data", required=True, action="append",
                   help="training dataset (from the phantom command); candidates: repeat for several")
    t.add_argument("--cache-dir", help="candidates: the prepared-array cache (training.prepared)")
    t.add_argument("--segmenter-version", help="candidates: the U-Net whose candidates are scored (default: the "
                   "default segmenter)")
    t.add_argument("--val-data", help="validation dataset (best epoch, threshold, validation metrics)")
    t.add_argument("--out", required=True, help="output folder (model.keras, model_card.json, curves.png)")
    t.add_argument("--overwrite", action="store_true", help="replace a model already in --out (refused otherwise)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--steps", type=int, help="segmenter: steps per epoch")
    t.add_argument("--warmup-steps", type=int, help="classifier: slice warm-up steps before the series epochs")
    t.add_argument("--lesion-sampling", choices=("slice", "case"),
                   help="segmenter: draw lesion slices uniformly (slice, the default) or a lesion case first (case)")
    t.add_argument("--lesion-fraction", type=float,
                   help="segmenter: share of each batch drawn from lesion slices, the rest from lung slices without "
                        "lesion (default 0.5; lower shows it more normal lung)")
    t.add_argument("--hard-negatives", type=float, metavar="F",
                   help="segmenter: share of the lesion-free slices of each batch drawn from those where the model, at "
                        "the start of each epoch, calls lesion (its false positives; default 0)")
    t.add_argument("--hard-positives", type=float, metavar="F",
                   help="segmenter: share of the lesion slices of each batch drawn from those where the model, at the "
                        "start of each epoch, finds less than half of the lesion (its misses; default 0)")
    t.add_argument("--hard-positive-kind", choices=("any", "background"),
                   help="segmenter: which misses --hard-positives draws: any (the default), or only those the model "
                        "mostly calls background (a dense lesion taken for the wall), not lung (a faint one)")
    t.add_argument("--members", type=int, metavar="N",
                   help="candidates: average N CNNs (seeds S, S+1, …) into the one model (default 1)")
    t.add_argument("--weighting", choices=("class", "size"),
                   help="candidates: the loss weights — class (inverse class frequency, the default) or size (the "
                        "same class totals, each size band of the lesion class the same total)")
    t.add_argument("--learning-rate", type=float,
                   help="segmenter: initial learning rate of the cosine schedule (default 2e-3; lower when starting "
                        "from --init)")
    t.add_argument("--init", metavar="DIR",
                   help="segmenter: start from the weights of the U-Net in DIR (model.keras + model_card.json, e.g. "
                        "models/weights/segmenter/1.1.0) instead of random ones")
    t.add_argument("--version", default="0.0.0-dev", help="version recorded in the model card")
    t.add_argument("--limit", type=int, help="use only the first N training cases")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    e = subparsers.add_parser("model-eval", help="ROC AUC and Dice of the shipped models on a phantom dataset")
    e.add_argument("--data", required=True, help="phantom dataset (use a seed never used in training)")
    e.add_argument("--weights-dir", help="weights folder (default: the shipped weights)")
    e.add_argument("--classifier-version")
    e.add_argument("--segmenter-version")
    e.add_argument("--limit", type=int, help="only the first N cases")
    e.add_argument("--json", help="also write all metrics and per-case rows as JSON")
    e.add_argument("--write-card", action="store_true", help="record the test metrics in both model cards")
    e.add_argument("--compare-with", help="another model-eval --json on the same cases: a paired comparison "
                   "(ROC AUC difference with a bootstrap CI, McNemar), printed and kept in --json")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_model_eval)

    f = subparsers.add_parser("fuse-lesion", help="a new classifier version fusing the U-Net's lesion evidence, "
                              "fitted on phantoms new to both models")
    f.add_argument("--data", required=True, help="fit set (a phantom seed neither model card names)")
    f.add_argument("--base-version", required=True, help="the classifier version whose weights are fused")
    f.add_argument("--segmenter-version", help="default: the default segmenter")
    f.add_argument("--candidates-version", help="the candidate model whose scores are fused (default: the newest)")
    f.add_argument("--version", required=True, help="the new classifier version (a folder that does not exist)")
    f.add_argument("--pool-spacing-mm", type=float, default=POOL_SPACING_MM,
                   help=f"pool the lesion evidence at this slice spacing (default {POOL_SPACING_MM:g}; 0: every slice)")
    f.add_argument("--weights-dir", help="weights folder (default: the shipped weights)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_fuse_lesion)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.cli", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
