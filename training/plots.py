"""The cross-validation report's figures as PNG files (matplotlib Agg, no display needed).

Each ``plot_*`` function draws one figure from arrays and writes it to ``path``; :func:`make_figures` draws them
all for :func:`training.crossval.evaluate` and returns ``{name: {"file", "caption"}}`` (or ``{"skipped": why}``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training import stats

if TYPE_CHECKING:
    from training.dataset import Dataset
    from training.prepared import Prepared

DPI = 90
COLOURS = {"normal": "#2b7bba", "pneumonia": "#d7301f", "model": "#1b9e77", "reader": "#7570b3"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def plot_hu_histograms(edges: np.ndarray, counts: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    """Mean share of body voxels per HU bin, normal vs pneumonia, with the 10-90th percentile band of cases."""
    plt = _plt()
    centres = 0.5 * (edges[:-1] + edges[1:])
    width = float(edges[1] - edges[0])
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) / width  # density per HU
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, k in (("normal", 0), ("pneumonia", 1)):
        f = frac[labels == k]
        if not len(f):
            continue
        mean = f.mean(axis=0)
        lo, hi = np.percentile(f, [10, 90], axis=0)
        for ax in axes:
            ax.plot(centres, mean, color=COLOURS[name], label=f"{name} (n={len(f)})")
            ax.fill_between(centres, lo, hi, color=COLOURS[name], alpha=0.18, linewidth=0)
    axes[0].set_yscale("log")
    axes[0].set_title("HU within the body (log scale)")
    lung = (centres >= -1000) & (centres <= -100)
    axes[1].set_xlim(-1000, -100)
    top = float(frac[:, lung].mean(axis=0).max()) if lung.any() else 1.0
    axes[1].set_ylim(0, 1.3 * top)
    axes[1].set_title("lung range, -1000 to -100 HU (linear)")
    for ax in axes:
        ax.set_xlabel("HU")
        ax.set_ylabel("share of body voxels per HU")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(histories: list[dict[str, list[float]]], path: Path) -> Path:
    """Loss (training solid, validation dashed) and accuracy / validation AUC per epoch, one colour per fold."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    cmap = plt.get_cmap("tab10")
    for k, h in enumerate(histories):
        c = cmap(k % 10)
        for key, ax, style in (("loss", 0, "-"), ("val_loss", 0, "--"), ("accuracy", 1, "-"),
                               ("val_accuracy", 1, "--"), ("val_auc", 1, ":")):
            v = h.get(key) or []
            if v:
                axes[ax].plot(range(1, len(v) + 1), v, style, color=c, marker="o", markersize=3,
                              label=f"fold {k + 1}" if key in ("loss", "accuracy") else None)
    axes[0].set_title("loss per epoch (— training, -- inner validation)")
    axes[1].set_title("accuracy (— training, -- validation), validation AUC (···)")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if histories:
        axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def mean_roc(curves: list[tuple[np.ndarray, np.ndarray]], grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertical average of ROC curves on ``grid`` of false-positive rates, with the 95 % CI of the mean."""
    from scipy import stats as sps

    tprs = []
    for fpr, tpr in curves:
        t = np.interp(grid, fpr, tpr)
        t[0] = 0.0
        tprs.append(t)
    arr = np.array(tprs)
    mean = arr.mean(axis=0)
    mean[-1] = 1.0
    k = len(arr)
    if k < 2:
        return mean, mean.copy(), mean.copy()
    half = float(sps.t.ppf(0.975, k - 1)) * arr.std(axis=0, ddof=1) / np.sqrt(k)
    return mean, np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1)


def plot_roc(
    y: np.ndarray, p: np.ndarray, fold_of: np.ndarray, reader: np.ndarray, thr: np.ndarray, path: Path
) -> Path:
    """Per-fold ROC curves, their vertical mean with a 95 % CI band, the model's and the reader's operating points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 6))
    curves, aucs = [], []
    for k in np.unique(fold_of):
        m = fold_of == k
        if len(np.unique(y[m])) < 2:
            continue
        fpr, tpr, _ = stats.roc_curve(y[m], p[m])
        curves.append((fpr, tpr))
        aucs.append(stats.roc_auc(y[m], p[m]))
        ax.plot(fpr, tpr, color="grey", alpha=0.35, linewidth=1, label="folds" if len(curves) == 1 else None)
    grid = np.linspace(0, 1, 201)
    if curves:
        mean, lo, hi = mean_roc(curves, grid)
        ms = stats.mean_sd(aucs)
        ax.plot(grid, mean, color=COLOURS["model"], linewidth=2.2,
                label=f"mean of folds, AUC {ms['mean']:.3f} ± {ms['sd']:.3f} (SD)")
        ax.fill_between(grid, lo, hi, color=COLOURS["model"], alpha=0.2, label="95 % CI of the mean curve")
    pred = p >= thr
    d = stats.decision_metrics(y, pred)
    ax.plot(1 - d["specificity"], d["sensitivity"], "o", color=COLOURS["model"], markersize=9,
            markeredgecolor="black", label="model at its fold thresholds (pooled)")
    has_r = reader >= 0
    if has_r.any():
        r = stats.decision_metrics(y[has_r], reader[has_r])
        ax.plot(1 - r["specificity"], r["sensitivity"], "s", color=COLOURS["reader"], markersize=9,
                markeredgecolor="black", label="reader (pooled)")
    ax.plot([0, 1], [0, 1], ":", color="black", linewidth=0.8)
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title("ROC, out-of-fold")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(y: np.ndarray, pred: np.ndarray, reader: np.ndarray, path: Path) -> Path:
    """Confusion matrices (counts and row shares) of the model and, where present, the reader."""
    plt = _plt()
    has_r = reader >= 0
    panels = [("model", y, pred)] + ([("reader", y[has_r], reader[has_r])] if has_r.any() else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (name, yy, dd) in zip(axes[0], panels, strict=True):
        c = stats.confusion(yy, dd)
        mat = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        share = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, f"{mat[i, j]}\n{share[i, j]:.1%}", ha="center", va="center",
                        color="white" if share[i, j] > 0.6 else "black", fontsize=12)
        ax.set_xticks([0, 1], ["normal", "pneumonia"])
        ax.set_yticks([0, 1], ["normal", "pneumonia"])
        ax.set_xlabel(f"{name} says")
        ax.set_ylabel("truth")
        ax.set_title(f"{name} (n={len(yy)})")
    fig.tight_layout()
    return _save(fig, path)


def plot_pr(prevalence: dict[str, Any], path: Path) -> Path:
    """PR curves of the pooled out-of-fold predictions at the data's prevalence and at the target prevalence
    (negatives reweighted), with each one's chance level."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    for key, label, colour, base in (("pr_observed", f"data ({prevalence['observed_prevalence']:.0%} pneumonia)",
                                      COLOURS["model"], prevalence["observed_prevalence"]),
                                     ("pr_target", f"at {prevalence['target_prevalence']:.0%} prevalence",
                                      COLOURS["reader"], prevalence["target_prevalence"])):
        c = prevalence[key]
        if c["recall"]:
            ax.plot(c["recall"], c["precision"], color=colour, linewidth=2, label=f"{label}, PR AUC {c['pr_auc']:.3f}")
            ax.axhline(base, color=colour, linestyle=":", linewidth=0.9)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_title("Precision–recall, out-of-fold")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(y: np.ndarray, p: np.ndarray, path: Path, bins: int = 10) -> Path:
    """Reliability diagram (observed share of pneumonia per predicted-probability bin) over the predictions'
    histogram per class; the Brier score and ECE in the title."""
    plt = _plt()
    rel = stats.reliability(y, p, bins=bins)
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(6, 6.6), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    ax.plot([0, 1], [0, 1], ":", color="black", linewidth=0.8, label="perfect calibration")
    mp, ob, n = np.array(rel["mean_predicted"]), np.array(rel["observed"]), np.array(rel["count"])
    ok = n > 0
    ax.plot(mp[ok], ob[ok], "o-", color=COLOURS["model"], label="model (out-of-fold)")
    for x_, y_, c in zip(mp[ok], ob[ok], n[ok], strict=True):
        ax.annotate(str(c), (x_, y_), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_ylabel("observed share of pneumonia")
    ax.set_title(f"reliability: Brier {stats.brier(y, p):.3f}, ECE {rel['ece']:.3f} ({bins} bins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    edges = np.array(rel["edges"])
    for name, k in (("normal", 0), ("pneumonia", 1)):
        hx.hist(p[y == k], bins=edges, color=COLOURS[name], alpha=0.55, label=name)
    hx.set_xlabel("predicted P(pneumonia)")
    hx.set_ylabel("cases")
    hx.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_fold_accuracy(metrics: dict[str, Any], path: Path) -> Path:
    """Per-fold accuracy of the model and the reader on the same test cases (what the paired t-test compares)."""
    plt = _plt()
    folds = metrics["folds"]
    k = np.arange(1, len(folds) + 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(folds) + 3), 3.8))
    ax.bar(k - 0.2, [f["accuracy"] for f in folds], 0.4, color=COLOURS["model"], label="model")
    if all(f.get("reader") for f in folds):
        ax.bar(k + 0.2, [f["reader"]["accuracy"] for f in folds], 0.4, color=COLOURS["reader"], label="reader")
    ax.set_xticks(k)
    ax.set_xlabel("fold")
    ax.set_ylabel("accuracy")
    lo = min([f["accuracy"] for f in folds] + [f["reader"]["accuracy"] for f in folds if f.get("reader")])
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.set_title("accuracy per test fold")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_examples(examples: list[dict[str, Any]], path: Path, *, note: str | None = None) -> Path:
    """Per example: the top-attention slice (lung window) with the U-Net's lungs (contour) and lesion (fill) when
    given, and the classifier's attention over the slices (true lesion slices shaded when known)."""
    plt = _plt()
    n = len(examples)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 7.0), squeeze=False, gridspec_kw={"height_ratios": [3, 1.3]})
    for j, ex in enumerate(examples):
        ax, bx = axes[0, j], axes[1, j]
        att = np.asarray(ex["attention"])
        k = int(np.argmax(att))
        img = np.asarray(ex["hu"][k], dtype=np.float32)
        ax.imshow(np.clip((img + 1350.0) / 1500.0, 0, 1), cmap="gray", vmin=0, vmax=1)
        seg = ex.get("segmentation")
        if seg is not None:
            lungs, lesion = seg[k] >= 1, seg[k] == 2
            ax.contour(lungs, levels=[0.5], colors=["#00d0ff"], linewidths=0.8)
            from matplotlib.colors import ListedColormap

            ax.imshow(np.ma.masked_where(~lesion, lesion.astype(float)), cmap=ListedColormap(["#ff7f00"]), alpha=0.6,
                      vmin=0, vmax=1)
        ax.set_title(f"{ex['case_id']}: {ex['kind']}\ntruth {ex['truth']}, P={ex['probability']:.2f}, slice {k}",
                     fontsize=9)
        ax.axis("off")
        lesion_slices = ex.get("lesion_slices")
        if lesion_slices is not None:
            for s in np.flatnonzero(lesion_slices):
                bx.axvspan(s - 0.5, s + 0.5, color=COLOURS["pneumonia"], alpha=0.15, linewidth=0)
        bx.plot(att, color=COLOURS["model"])
        bx.axvline(k, color="black", linewidth=0.8, linestyle=":")
        bx.set_xlabel("slice (feet → head)")
        bx.set_ylabel("attention")
        bx.grid(alpha=0.3)
    if note:
        fig.text(0.01, 0.005, note, fontsize=8, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, path)


def _pick_examples(y: np.ndarray, p: np.ndarray, thr: np.ndarray) -> list[tuple[int, str]]:
    """Up to four telling cases: the surest true positive, the worst false negative (else the least sure true
    positive), the worst false positive (else the least sure true negative), the surest true negative."""
    pred = p >= thr
    idx = np.arange(len(y))
    picks: list[tuple[int, str]] = []

    def take(mask: np.ndarray, key: np.ndarray, kind: str) -> bool:
        cand = idx[mask & ~np.isin(idx, [i for i, _ in picks])]
        if len(cand):
            picks.append((int(cand[np.argmax(key[cand])]), kind))
            return True
        return False

    take((y == 1) & pred, p, "true positive")
    take((y == 1) & ~pred, -p, "false negative") or take((y == 1) & pred, -p, "least sure true positive")
    take((y == 0) & pred, p, "false positive") or take((y == 0) & ~pred, p, "least sure true negative")
    take((y == 0) & ~pred, -p, "true negative")
    return picks


def _segmenter(weights_dir: Path | None, version: str | None = None) -> tuple[Any, str | None]:
    from models.errors import ModelError
    from models.registry import Registry

    try:
        seg = Registry(weights_dir).segmenter(version)
    except ModelError as exc:
        return None, f"U-Net overlay skipped: no shipped segmenter ({str(exc).splitlines()[0]})"
    return seg, None


def make_figures(
    fig_dir: Path,
    *,
    ds: Dataset,
    prep: Prepared,
    p: np.ndarray,
    thr: np.ndarray,
    fold_of: np.ndarray,
    reader: np.ndarray,
    attention: list[np.ndarray | None],
    histories: list[dict[str, list[float]]],
    metrics: dict[str, Any],
    weights_dir: Path | None = None,
    segmenter_version: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, str]]:
    """Draw every figure of the report into ``fig_dir``; returns name → {file (relative to the report), caption}
    or {skipped: reason}. The example slices use the segmenter under ``weights_dir`` (default: the
    shipped weights; ``segmenter_version``, else its default) for the U-Net overlay, and show the attention alone,
    with a note, when there is none."""
    y = ds.labels
    pred = (p >= thr).astype(np.int64)
    figs: dict[str, dict[str, str]] = {}

    def rel(path: Path) -> str:
        return f"{fig_dir.name}/{path.name}"

    figs["hu_histograms"] = {"file": rel(plot_hu_histograms(prep.hist_edges, prep.hist_counts, y,
                                                            fig_dir / "hu_histograms.png")),
                             "caption": "Grey levels (HU) inside the body, pneumonia against normal series: mean share "
                             "of body voxels per HU over the cases, with the 10–90th percentile band. Ground glass "
                             "and consolidation add voxels between the aerated-lung peak and soft tissue."}
    figs["training_curves"] = {"file": rel(plot_training_curves(histories, fig_dir / "training_curves.png")),
                               "caption": "Loss and accuracy per epoch in each fold (training part, and the inner "
                               "validation split that picks the epoch)."}
    figs["roc"] = {"file": rel(plot_roc(y, p, fold_of, reader, thr, fig_dir / "roc.png")),
                   "caption": "ROC curve of each test fold (grey), their mean with the 95 % CI of the mean, and "
                   "the operating points of the model and the reader."}
    figs["confusion"] = {"file": rel(plot_confusion(y, pred, reader, fig_dir / "confusion.png")),
                         "caption": "Confusion matrices of the pooled out-of-fold decisions and the reader's."}
    figs["reliability"] = {"file": rel(plot_reliability(y, p, fig_dir / "reliability.png")),
                           "caption": "Calibration of the out-of-fold probabilities (numbers: cases per bin)."}
    if metrics.get("prevalence"):
        figs["pr"] = {"file": rel(plot_pr(metrics["prevalence"], fig_dir / "pr.png")),
                      "caption": "Precision–recall curves of the pooled out-of-fold probabilities at the data's "
                      "prevalence and with the negatives reweighted to the target prevalence (dotted: chance)."}
    figs["fold_accuracy"] = {"file": rel(plot_fold_accuracy(metrics, fig_dir / "fold_accuracy.png")),
                             "caption": "Accuracy per test fold, model and reader on the same cases."}

    seg, note = _segmenter(weights_dir, segmenter_version)
    examples = []
    for i, kind in _pick_examples(y, p, thr):
        c, gc, a = ds.cases[i], prep.cases[i], attention[i]
        if a is None:
            continue
        ex: dict[str, Any] = {"case_id": c.case_id, "kind": kind, "truth": "pneumonia" if c.label else "normal",
                              "probability": float(p[i]), "attention": a, "hu": gc.hu}
        if ds.has_masks:
            ex["lesion_slices"] = gc.slice_lesion > 0
        if seg is not None:
            from models.preprocess import load_series, volume_grid

            vol = load_series(list(c.files))
            probs = seg.probabilities(vol)
            ex["hu"] = volume_grid(vol, seg.preprocess.grid)
            ex["segmentation"] = probs.argmax(-1)
        examples.append(ex)
    if examples:
        if seg is not None:
            note = (f"U-Net: {seg.name} {seg.version} from the registry (contour: lungs, orange: lesion); attention: the "
                    "out-of-fold classifier of each case's fold.")
        figs["examples"] = {"file": rel(plot_examples(examples, fig_dir / "examples.png", note=note)),
                            "caption": "Example cases at the slice the classifier attended to most; below, its "
                            "attention over the slices (shaded: slices with lesion in the ground truth)."
                            + (f" {note}" if note else "")}
    else:
        figs["examples"] = {"skipped": "no out-of-fold attention to show"}
    if note and seg is None:
        log(note)
    return figs
