"""Fitting the two-threshold rule (`models.threshold.ThresholdRule`) on labelled slices: a
grid search maximising the mean per-image lesion Dice that `evaluation.evaluate` reports, the
best pairs rescored exactly. Apart from the rule itself so that the model layer does not import
the evaluation pipeline."""

from __future__ import annotations

import math
import warnings

import numpy as np

from stitchnet_tf.data.classes import CON, GGO
from stitchnet_tf.data.preprocess import DEFAULT_MARGIN
from stitchnet_tf.evaluation import SliceScorer, lung_field_source
from stitchnet_tf.metrics import LESION_CLASSES, SCHEMES
from stitchnet_tf.models.threshold import ThresholdRule, threshold_grid


def fit_threshold_rule(
    dataset,
    size: int,
    segmenter=None,
    *,
    step: float = 0.01,
    refine: int = 25,
    absent: str = "exclude",
    margin: float = DEFAULT_MARGIN,
    intensity: str = "none",
    log=None,
) -> ThresholdRule:
    """Choose (low, high) on labelled slices (a training `Dataset`) by grid search.

    The slices are prepared as for evaluation (label-free lung field: supplied lung masks,
    else `segmenter`). Every pair low <= high on the grid 0, step, ..., 1 is scored at
    model size from per-image histograms (`grid_objective`: the mean per-image lesion
    Dice, Table-1 definitions); the `refine` best pairs are then rescored exactly as
    `evaluate` scores (`SliceScorer`, original geometry), and the best of those is kept.
    """
    scorer = SliceScorer(
        dataset, size, segmenter, absent=absent, margin=margin, intensity=intensity
    )
    grid = threshold_grid(step)
    objective = grid_objective(scorer, grid)
    flat = np.argsort(-np.nan_to_num(objective, nan=-1.0), axis=None, kind="stable")
    candidates = [np.unravel_index(i, objective.shape) for i in flat[: max(1, refine)]]
    best, best_score, best_summary = None, -math.inf, None
    for lo, hi in candidates:
        rule = ThresholdRule(grid[lo], grid[hi], size, intensity=intensity)
        summary = scorer.score(rule)
        value = summary["mean_lesion_dice"]
        value = -1.0 if value is None else value
        if log:
            log(f"low {rule.low:.2f} high {rule.high:.2f}: train mean lesion Dice {value:.4f}")
        if value > best_score:
            best, best_score, best_summary = (lo, hi), value, summary
    lo, hi = best
    info = {
        "method": "grid search of low <= high, then exact rescoring of the best pairs",
        "objective": f"mean per-image lesion Dice (Table 1 F1, absent={absent})",
        "step": step,
        "refined": len(candidates),
        "train_slices": len(scorer),
        "train_mean_lesion_dice": best_score,
        "train_lesion_dice": best_summary["lesion_dice"],
        "grid_objective": float(objective[lo, hi]),
        "scheme": scorer.scheme,
        "lung_field": lung_field_source(dataset),
        "segmenter": type(scorer.segmenter).__name__,
        "margin": margin,
    }
    return ThresholdRule(grid[lo], grid[hi], scorer.size, info, intensity)


def _dice(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, positives: int, absent: str):
    """Per-image F1 over the grid, NaN where the image is left out (Table-1 policies)."""
    if positives == 0:
        if absent == "exclude":
            return np.full(tp.shape, np.nan)
        if absent == "one":
            return (fp == 0).astype(np.float64)
        return np.zeros(tp.shape)
    return 2 * tp / np.maximum(2 * tp + fp + fn, 1)


def grid_objective(scorer, grid: np.ndarray) -> np.ndarray:
    """Mean per-image lesion Dice [G, G] of `ThresholdRule(grid[i], grid[j])` at model size on
    a `SliceScorer`'s prepared slices (NaN where i > j or nothing is scored).

    Per image and lesion class, a histogram of x over the grid's bins, inside the model-size
    lung field, for the class's positive and negative truth pixels (Table-1 definitions:
    ignored pixels drop out); positives outside the field are misses. GGO is predicted in the
    bins [i, j), consolidation in [j, G), a lesion in [i, G).
    """
    edges = np.asarray(grid, np.float32)  # binned in x's precision, as the rule compares
    n = len(edges)
    classes = [(name, b) for name, b in SCHEMES[scorer.scheme] if name in LESION_CLASSES]
    lo = np.arange(n)[:, None]
    hi = np.arange(n)[None, :]
    per_class: dict[str, list[np.ndarray]] = {name: [] for name, _ in classes}
    for chunk in scorer.batches():
        for s in chunk:
            p = s.prepared
            field = np.asarray(p.lung, bool)
            bins = np.clip(np.searchsorted(edges, p.x, side="right") - 1, 0, n - 1)
            truth = p.allowed.astype(np.int64)
            for name, cbits in classes:
                positive = (truth & ~cbits) == 0
                negative = (truth & cbits) == 0
                pos = np.concatenate([[0], np.cumsum(np.bincount(bins[positive & field], None, n))])
                neg = np.concatenate([[0], np.cumsum(np.bincount(bins[negative & field], None, n))])
                start = lo if cbits & (1 << GGO) else hi
                end = np.full_like(hi, n) if cbits & (1 << CON) else hi
                start, end = np.broadcast_to(start, (n, n)), np.broadcast_to(end, (n, n))
                tp = pos[end] - pos[start]
                fp = neg[end] - neg[start]
                total = int(np.count_nonzero(positive))
                per_class[name].append(_dice(tp, fp, total - tp, total, scorer.absent))
    with warnings.catch_warnings():  # "Mean of empty slice": all-NaN entries stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        means = [np.nanmean(np.stack(v), axis=0) for v in per_class.values() if v]
        objective = np.nanmean(np.stack(means), axis=0)
    objective[lo > hi] = np.nan
    return objective
