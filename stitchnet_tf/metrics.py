"""Evaluation metrics of the paper's Table 1 (docs/DESIGN.md §5), pure NumPy.

Scoring is per image and per *scored class*. A scored class is a set of model classes
(`stitchnet_tf.data.classes`), given as allowed-set bits:

- scheme ``multiclass`` (masks that tell GGO from consolidation, e.g. MedSeg): ``ggo``,
  ``con`` and ``background`` = no lesion (background or healthy lung), as in Table 1;
- scheme ``lesion`` (binary lesion masks, e.g. zenodo20 infection masks): ``lesion``
  (GGO or consolidation) and ``background`` (no lesion).

Ground truth is given per pixel as its allowed-class set (bits 1..15). For a scored class
``c`` a truth pixel is *positive* if its set is a subset of ``c``'s classes, *negative* if it
is disjoint from them, and *ignored* otherwise. So unknown pixels (15) are always ignored, and
a binary-lesion pixel (``LESION`` = 12) is positive for ``lesion`` but ignored for ``ggo`` and
``con``. A predicted pixel (class id 0..3) is positive for ``c`` if its class is one of
``c``'s classes. Over the non-ignored pixels:

    IoU = TP / (TP + FP + FN)         F1 (Dice) = 2 TP / (2 TP + FP + FN)
    Recall = TP / (TP + FN)           Precision = TP / (TP + FP)

Policies, explicit because the paper states none:

- *Empty ground truth* (``absent``), when the class has no positive truth pixel in an image
  (TP + FN = 0; this includes a class whose truth pixels are all ignored, e.g. ``ggo`` on a
  binary-lesion mask, so use the ``lesion`` scheme for such masks):

  - ``exclude`` (default, the common choice): all four metrics are ``None`` and the image is
    left out of that class's means; the number left out is reported per class;
  - ``zero``: all four metrics are 0 whatever was predicted (the authors' code, which adds
    1e-7 to the denominators);
  - ``one``: all four are 1.0 if nothing was predicted for the class either (TP + FP = 0),
    else 0 (as in several challenge rules).

- *Nothing predicted while truth is present* (TP + FP = 0 < TP + FN): precision = 0 (so are
  IoU, F1 and recall, whose denominators are then positive).

`Table1` accumulates per-image scores and reports per class the mean and the population
standard deviation (``numpy.std``, ``ddof=0``) over the images kept, and an ``Overall`` row:
per metric the mean of the class means (the paper's Overall row).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from stitchnet_tf.data.classes import ALL, CON, GGO, LESION, NO_LESION, NUM_CLASSES, bits
from stitchnet_tf.fileio import atomic_write_text

#: Scored classes per scheme: (name, allowed-set bits of the model classes it covers).
SCHEMES: dict[str, tuple[tuple[str, int], ...]] = {
    "multiclass": (("ggo", bits(GGO)), ("con", bits(CON)), ("background", NO_LESION)),
    "lesion": (("lesion", LESION), ("background", NO_LESION)),
}
#: The scored classes that are lesions (what the mean lesion Dice averages).
LESION_CLASSES: tuple[str, ...] = ("ggo", "con", "lesion")
METRICS: tuple[str, ...] = ("iou", "f1", "recall", "precision")
ABSENT_POLICIES: tuple[str, ...] = ("exclude", "zero", "one")

#: How tables name the scored classes and metrics (the paper's spelling).
CLASS_LABELS = {"ggo": "GGO", "con": "CON", "background": "Background", "lesion": "Lesion"}
METRIC_LABELS = {"iou": "IoU", "f1": "F1", "recall": "Recall", "precision": "Precision"}

_ABSENT_TEXT = {
    "exclude": "images where a class is absent from the ground truth are left out of that "
    "class's means",
    "zero": "a class absent from an image's ground truth scores 0 (the authors' code)",
    "one": "a class absent from an image's ground truth scores 1 if it is not predicted "
    "either, else 0",
}

Scores = dict[str, dict[str, float | None]]
Counts = dict[str, tuple[int, int, int]]


def _check_options(scheme: str, absent: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    if absent not in ABSENT_POLICIES:
        raise ValueError(
            f"unknown absent policy {absent!r}: use one of {', '.join(ABSENT_POLICIES)}"
        )


def confusion_counts(
    predicted: np.ndarray, truth_bits: np.ndarray, scheme: str = "multiclass"
) -> Counts:
    """Per scored class (TP, FP, FN) over the non-ignored pixels of one image.

    Args:
        predicted: [H, W] integer class ids in 0..3 (any shape equal to `truth_bits`'s).
        truth_bits: [H, W] allowed-set bits in 1..15 (bit k = class k allowed).
        scheme: ``multiclass`` or ``lesion`` (see `SCHEMES`).

    Raises:
        ValueError: shapes differ, a predicted id is outside 0..3, or a truth set is empty
            or outside 1..15.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    predicted = np.asarray(predicted)
    truth_bits = np.asarray(truth_bits)
    if predicted.shape != truth_bits.shape:
        raise ValueError(
            f"predicted shape {predicted.shape} does not match truth shape {truth_bits.shape}"
        )
    for name, a in (("predicted", predicted), ("truth_bits", truth_bits)):
        if a.size and not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    if predicted.size:
        lo, hi = int(predicted.min()), int(predicted.max())
        if lo < 0 or hi >= NUM_CLASSES:
            raise ValueError(f"predicted class ids must be in 0..{NUM_CLASSES - 1}, got {lo}..{hi}")
        lo, hi = int(truth_bits.min()), int(truth_bits.max())
        if lo < 1 or hi > ALL:
            raise ValueError(f"truth bits must be in 1..{ALL}, got {lo}..{hi}")
    pred_bits = np.left_shift(1, predicted.astype(np.int64))
    truth = truth_bits.astype(np.int64)
    counts: Counts = {}
    for name, cbits in SCHEMES[scheme]:
        positive = (truth & ~cbits) == 0  # truth set within the class's classes
        negative = (truth & cbits) == 0  # truth set disjoint from them
        hit = (pred_bits & cbits) != 0
        tp = int(np.count_nonzero(positive & hit))
        fp = int(np.count_nonzero(negative & hit))
        fn = int(np.count_nonzero(positive & ~hit))
        counts[name] = (tp, fp, fn)
    return counts


def scores_from_counts(tp: int, fp: int, fn: int, absent: str = "exclude") -> dict[str, Any]:
    """IoU, F1, recall, precision from counts, applying the empty-truth policy `absent`.

    Returns metric -> float, or None for every metric when the class is absent (TP + FN = 0)
    and ``absent='exclude'``. Precision is 0 when nothing is predicted but truth is present.
    """
    if absent not in ABSENT_POLICIES:
        raise ValueError(
            f"unknown absent policy {absent!r}: use one of {', '.join(ABSENT_POLICIES)}"
        )
    if tp + fn == 0:
        if absent == "exclude":
            return dict.fromkeys(METRICS)
        value = 1.0 if absent == "one" and fp == 0 else 0.0
        return dict.fromkeys(METRICS, value)
    return {
        "iou": tp / (tp + fp + fn),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "recall": tp / (tp + fn),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
    }


def image_scores(
    predicted: np.ndarray,
    truth_bits: np.ndarray,
    scheme: str = "multiclass",
    absent: str = "exclude",
) -> Scores:
    """Scores of one image: scored class -> metric -> value (None = left out).

    Args:
        predicted: [H, W] integer class ids in 0..3.
        truth_bits: [H, W] allowed-set bits (1..15); see the module docstring for which
            pixels count as positive, negative or ignored.
        scheme: ``multiclass`` (ggo, con, background) or ``lesion`` (lesion, background).
        absent: empty-truth policy, ``exclude``, ``zero`` or ``one``.
    """
    _check_options(scheme, absent)
    counts = confusion_counts(predicted, truth_bits, scheme)
    return {name: scores_from_counts(*c, absent=absent) for name, c in counts.items()}


def overall_row(class_means: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """The Overall row: per metric the mean of the class means.

    Classes without a mean (every image left out) are skipped; None if no class has one.
    """
    row: dict[str, float | None] = {}
    for m in METRICS:
        values = [c[m] for c in class_means.values() if c.get(m) is not None]
        row[m] = float(np.mean(values)) if values else None
    return row


def lesion_dice(summary: dict[str, Any]) -> dict[str, float | None]:
    """The per-image mean F1 (Dice) of each lesion class of a `Table1.summary()`: ``ggo`` and
    ``con`` (scheme multiclass) or ``lesion`` (scheme lesion); None where no image was kept."""
    return {
        name: entry["f1"]["mean"]
        for name, entry in summary["classes"].items()
        if name in LESION_CLASSES
    }


def mean_lesion_dice(summary: dict[str, Any]) -> float | None:
    """Mean lesion Dice of a `Table1.summary()`: the mean of the lesion classes' per-image mean
    F1 (GGO and CON, or lesion), skipping a class without a mean; None if none has one."""
    values = [v for v in lesion_dice(summary).values() if v is not None]
    return float(np.mean(values)) if values else None


def format_cell(mean: float | None, std: float | None = None, digits: int = 3) -> str:
    """``"0.391 ± 0.280"`` (or ``"0.593"`` without std; ``"n/a"`` without a mean)."""
    if mean is None:
        return "n/a"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _class_label(name: str) -> str:
    return CLASS_LABELS.get(name, name)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


class Table1:
    """Accumulates per-image scores into the paper's Table 1.

    Args:
        scheme: ``multiclass`` or ``lesion`` (see `SCHEMES`).
        absent: empty-truth policy, ``exclude`` (default), ``zero`` or ``one``.

    Example:
        >>> t = Table1()
        >>> _ = t.add("slice-1", np.array([[0, 2], [2, 3]]), np.array([[3, 4], [4, 8]], np.uint8))
        >>> t.summary()["overall"]["iou"]
        1.0
    """

    def __init__(self, scheme: str = "multiclass", absent: str = "exclude"):
        _check_options(scheme, absent)
        self.scheme = scheme
        self.absent = absent
        self.class_names: tuple[str, ...] = tuple(name for name, _ in SCHEMES[scheme])
        self._counts: dict[str, Counts] = {}  # image id -> class -> (tp, fp, fn)
        self._scores: dict[str, Scores] = {}  # image id -> class -> metric -> value

    def __len__(self) -> int:
        return len(self._scores)

    def add(self, image_id: str, predicted: np.ndarray, truth_bits: np.ndarray) -> Scores:
        """Score one image ([H, W] class ids against [H, W] truth bits); returns its scores.

        Raises:
            ValueError: `image_id` was already added, or the arrays are invalid (see
                `confusion_counts`).
        """
        image_id = str(image_id)
        if image_id in self._scores:
            raise ValueError(f"image {image_id!r} was already added")
        counts = confusion_counts(predicted, truth_bits, self.scheme)
        scores = {name: scores_from_counts(*c, absent=self.absent) for name, c in counts.items()}
        self._counts[image_id] = counts
        self._scores[image_id] = scores
        return scores

    def summary(self) -> dict[str, Any]:
        """Means and population stds over the images kept, per class, and the Overall row.

        Returns ``{"scheme", "absent", "n_images", "classes": {class: {metric: {"mean",
        "std"}, "n_images", "n_left_out"}}, "overall": {metric: mean of the class means}}``;
        a class with every image left out has None for mean and std.
        """
        classes: dict[str, Any] = {}
        for name in self.class_names:
            kept = [s[name] for s in self._scores.values() if s[name]["iou"] is not None]
            entry: dict[str, Any] = {}
            for m in METRICS:
                values = np.array([k[m] for k in kept], dtype=np.float64)
                entry[m] = {
                    "mean": float(values.mean()) if values.size else None,
                    "std": float(values.std(ddof=0)) if values.size else None,
                }
            entry["n_images"] = len(kept)
            entry["n_left_out"] = len(self._scores) - len(kept)
            classes[name] = entry
        means = {n: {m: c[m]["mean"] for m in METRICS} for n, c in classes.items()}
        return {
            "scheme": self.scheme,
            "absent": self.absent,
            "n_images": len(self._scores),
            "classes": classes,
            "overall": overall_row(means),
        }

    def policy_line(self, summary: dict[str, Any] | None = None) -> str:
        """One sentence naming the empty-truth policy and the images left out per class."""
        return policy_line(self.summary() if summary is None else summary)

    def to_markdown(self, title: str | None = None, model_name: str = "model") -> str:
        """The paper's Table 1 layout, one row per class, ``mean ± std`` cells.

        ``| class | model | IoU | F1 | Recall | Precision |``, then the Overall row (class
        means' mean, no ±), then a line with the empty-truth policy and images left out.
        """
        return merge_markdown({model_name: self}, title)

    def per_image_rows(self) -> list[dict[str, Any]]:
        """One row per image and class: image, class, iou, f1, recall, precision, tp, fp, fn,
        left_out (metrics None when left out)."""
        rows = []
        for image_id, scores in self._scores.items():
            for name in self.class_names:
                tp, fp, fn = self._counts[image_id][name]
                s = scores[name]
                rows.append(
                    {
                        "image": image_id,
                        "class": name,
                        **{m: s[m] for m in METRICS},
                        "tp": tp,
                        "fp": fp,
                        "fn": fn,
                        "left_out": s["iou"] is None,
                    }
                )
        return rows

    def summary_rows(self, model_name: str = "model") -> list[dict[str, Any]]:
        """The summary as flat rows (the CSV): class, model, <metric>_mean, <metric>_std,
        n_images, n_left_out; the last row is ``overall`` (no std, no counts)."""
        s = self.summary()
        rows = []
        for c, e in s["classes"].items():
            row: dict[str, Any] = {"class": c, "model": model_name}
            for m in METRICS:
                row[f"{m}_mean"] = e[m]["mean"]
                row[f"{m}_std"] = e[m]["std"]
            row["n_images"] = e["n_images"]
            row["n_left_out"] = e["n_left_out"]
            rows.append(row)
        row = {"class": "overall", "model": model_name}
        for m in METRICS:
            row[f"{m}_mean"] = s["overall"][m]
            row[f"{m}_std"] = None
        row["n_images"] = s["n_images"]
        row["n_left_out"] = None
        rows.append(row)
        return rows

    def write(
        self, output_dir: str | os.PathLike, stem: str = "metrics", model_name: str = "model"
    ) -> dict[str, Path]:
        """Write ``<stem>.md``, ``<stem>.csv`` (summary table), ``<stem>.json`` (summary, with
        ``model``) and ``<stem>_per_image.csv``, each atomically.

        Returns ``{"markdown", "csv", "json", "per_image_csv"}`` -> path. Missing values are
        empty CSV cells and JSON nulls.
        """
        out = Path(output_dir)
        paths = {
            "markdown": out / f"{stem}.md",
            "csv": out / f"{stem}.csv",
            "json": out / f"{stem}.json",
            "per_image_csv": out / f"{stem}_per_image.csv",
        }
        summary = {"model": model_name, **self.summary()}
        atomic_write_text(paths["markdown"], self.to_markdown(model_name=model_name))
        atomic_write_text(paths["csv"], _to_csv(self.summary_rows(model_name)))
        atomic_write_text(paths["json"], json.dumps(summary, indent=2) + "\n")
        atomic_write_text(paths["per_image_csv"], _to_csv(self.per_image_rows()))
        return paths


def _to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if not rows:
        return ""
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def policy_line(summary: dict[str, Any]) -> str:
    """One sentence naming a summary's empty-truth policy and the images left out per class."""
    absent = summary["absent"]
    line = f"Empty ground truth: policy `{absent}` ({_ABSENT_TEXT[absent]})"
    if absent == "exclude":
        n = summary["n_images"]
        left = ", ".join(
            f"{_class_label(c)} {e['n_left_out']} of {n}" for c, e in summary["classes"].items()
        )
        line += f"; left out: {left}"
    else:
        line += f"; no image left out ({summary['n_images']} images)"
    return line + "."


def _summary_cells(model_name: str, summary: dict[str, Any]) -> dict[str, list[str]]:
    """class (and "overall") -> the markdown cells after the class column."""
    rows: dict[str, list[str]] = {}
    for c, e in summary["classes"].items():
        cells = [format_cell(e[m]["mean"], e[m]["std"]) for m in METRICS]
        rows[c] = [_md_escape(model_name), *cells]
    overall = [format_cell(summary["overall"][m]) for m in METRICS]
    rows["overall"] = [_md_escape(model_name), *overall]
    return rows


def summaries_markdown(summaries: dict[str, dict[str, Any]], title: str | None = None) -> str:
    """Several models' `Table1.summary()` dicts (e.g. read back from ``metrics.json``) in one
    Table-1 markdown: rows grouped by class, one row per model, in the dict's order.

    The Overall rows follow the classes, then the policy line (a bullet per model when there
    are several).
    """
    if not summaries:
        raise ValueError("no tables to merge")
    schemes = {s["scheme"] for s in summaries.values()}
    if len(schemes) > 1:
        raise ValueError(f"tables use different schemes: {', '.join(sorted(schemes))}")
    rows = {name: _summary_cells(name, s) for name, s in summaries.items()}
    class_names = list(next(iter(summaries.values()))["classes"])
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| class | model | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |")
    lines.append("| --- " * (2 + len(METRICS)) + "|")
    for c in (*class_names, "overall"):
        label = "Overall" if c == "overall" else _class_label(c)
        for name in summaries:
            lines.append(f"| {label} | " + " | ".join(rows[name][c]) + " |")
    lines.append("")
    for name, s in summaries.items():
        policy = policy_line(s)
        lines.append(policy if len(summaries) == 1 else f"- {_md_escape(name)}: {policy}")
    return "\n".join(lines) + "\n"


def merge_markdown(tables: dict[str, Table1], title: str | None = None) -> str:
    """Several models in one Table-1 markdown: rows grouped by class, one row per model.

    Args:
        tables: model name -> its `Table1` (all with the same scheme), in row order.
        title: optional heading line (``### title``).
    """
    if not tables:
        raise ValueError("no tables to merge")
    return summaries_markdown({name: t.summary() for name, t in tables.items()}, title)
