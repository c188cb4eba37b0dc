"""Per-volume 3-D metrics beside the per-slice Table 1 (docs/DESIGN.md §5): Dice and HD95.

A *case* is a stack of axial label maps in the original slice geometry: one NIfTI / DICOM
volume (its slices in slice order), or the 2-D slices of one patient. Scored classes are sets
of model classes, as in `stitchnet_tf.metrics`: ``ggo``, ``con``, ``lesion`` (GGO or
consolidation) and ``lung`` (healthy lung or a lesion), and the same set semantics hold: a
truth voxel is positive for a class if its allowed set lies inside the class's classes,
negative if it is disjoint from them, and *ignored* otherwise (unknown voxels; a binary-lesion
voxel for GGO alone); a predicted voxel is positive if its class is one of the class's classes.
Ignored voxels take no part in either metric.

- `dice_3d` = 2 |P ∩ T| / (|P| + |T|) over all voxels of the case (so a case's Dice is the
  Dice of its pooled slices, not the mean of per-slice Dice).
- `hd95` = the symmetric 95th-percentile Hausdorff distance, in millimetres when the voxel
  spacing is known, else in voxels (pixels): the larger of the two directed 95th percentiles
  (``numpy.percentile``, linear) of the distances from each surface voxel of one mask to the
  nearest surface voxel of the other (the MedPy / MONAI reading). Surface = mask XOR its
  erosion by the face-connected (6-neighbour) cross, voxels outside the array counting as
  outside the mask; distances by `scipy.ndimage.distance_transform_edt` with
  ``sampling=spacing``.

Empty sets, pure functions: both empty → Dice 1.0 and HD95 0.0 (nothing to find and nothing
found); exactly one empty → Dice 0.0 and HD95 NaN (there is no surface to measure to).

`VolumeTable` applies the per-slice table's empty-truth policy (``absent``) to cases: a case
without the class in its truth is left out of that class's means under ``exclude`` (Dice and
HD95 empty, counted as left out); under ``zero`` its Dice is 0 and under ``one`` 1 if nothing
was predicted either, else 0 (`metrics.scores_from_counts`), while its HD95 keeps the function's
value (0 if nothing was predicted, else NaN). A NaN HD95 (one side empty) is left out of the
HD95 mean and counted as undefined. Means are over cases, with the population std.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from stitchnet_tf.data.classes import ALL, CON, GGO, LESION, LUNG, NUM_CLASSES, bits
from stitchnet_tf.metrics import ABSENT_POLICIES, format_cell, scores_from_counts

#: The classes a case can be scored for: name -> allowed-set bits of the model classes.
VOLUME_CLASSES: dict[str, int] = {
    "ggo": bits(GGO),
    "con": bits(CON),
    "lesion": LESION,
    "lung": LUNG,
}
#: How tables name them.
VOLUME_LABELS = {"ggo": "GGO", "con": "CON", "lesion": "Lesion", "lung": "Lung"}
#: The percentile of `hd95`.
PERCENTILE = 95.0


def volume_classes(scheme: str, mask_values: Iterable[int]) -> tuple[str, ...]:
    """The classes scored per case for masks of a per-slice `scheme` whose stored values mean
    the allowed sets `mask_values`: ``ggo``, ``con`` and ``lesion`` (``multiclass``) or
    ``lesion`` (``lesion``), then ``lung`` when the masks tell lung from background (some value
    means exactly background, some value lies inside the lung: e.g. `fourclass` or `bits`
    masks; not MedSeg masks, whose "no lesion" is background or healthy lung)."""
    names = ("ggo", "con", "lesion") if scheme == "multiclass" else ("lesion",)
    values = [int(v) for v in mask_values]
    if any(v & ~LUNG == 0 for v in values) and any(v & LUNG == 0 for v in values):
        names += ("lung",)
    return names


def _check_pair(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    if pred.shape != true.shape:
        raise ValueError(f"predicted shape {pred.shape} does not match truth shape {true.shape}")
    return pred, true


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    out = tuple(float(s) for s in spacing)
    if len(out) != ndim or not all(math.isfinite(s) and s > 0 for s in out):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {spacing}")
    return out


def dice_3d(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice 2 |P ∩ T| / (|P| + |T|) of two boolean masks of any shape (a volume [D, H, W]).

    Both empty: 1.0; one empty: 0.0.
    """
    pred, true = _check_pair(pred, true)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(true))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & true)) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """The surface voxels of a boolean mask: the mask XOR its erosion by the face-connected
    cross (outside the array counts as outside the mask, so voxels on its border are
    surface)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return mask.copy()
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=cross, border_value=0)


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a non-empty mask grown by one voxel (within the array)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.nonzero(mask.any(axis=other) if other else mask)[0]
        box.append(slice(max(0, idx[0] - 1), min(mask.shape[axis], idx[-1] + 2)))
    return tuple(box)


def surface_distances(
    pred: np.ndarray, true: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances of two non-empty boolean masks: (from each surface voxel of
    `pred` to the nearest surface voxel of `true`, and from `true` to `pred`), in the units of
    `spacing` (the voxel size per axis; None: 1 per axis, i.e. voxels).

    Computed on the masks' joint bounding box grown by one voxel, which changes no surface and
    no nearest distance.
    """
    pred, true = _check_pair(pred, true)
    sampling = _check_spacing(spacing, pred.ndim)
    if not pred.any() or not true.any():
        raise ValueError("surface distances need two non-empty masks")
    box = _box(pred | true)
    sp, st = surface(pred[box]), surface(true[box])
    forward = ndimage.distance_transform_edt(~st, sampling=sampling)[sp]
    backward = ndimage.distance_transform_edt(~sp, sampling=sampling)[st]
    return forward, backward


def _hd_from(forward: np.ndarray, backward: np.ndarray) -> float:
    return float(max(np.percentile(forward, PERCENTILE), np.percentile(backward, PERCENTILE)))


def hd95(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance of two boolean masks.

    The larger of the two directed 95th percentiles (`numpy.percentile`, linear
    interpolation) of `surface_distances`; in the units of `spacing` (the voxel size per axis,
    e.g. (slice, row, column) millimetres of a volume [D, H, W]; None: voxels).

    Both masks empty: 0.0; exactly one empty: NaN (no surface to measure to).
    """
    pred, true = _check_pair(pred, true)
    _check_spacing(spacing, pred.ndim)
    has_pred, has_true = bool(pred.any()), bool(true.any())
    if not has_pred and not has_true:
        return 0.0
    if not (has_pred and has_true):
        return math.nan
    return _hd_from(*surface_distances(pred, true, spacing))


@dataclass
class Block:
    """One contiguous stack of a case: predicted class ids [D, H, W] (0..3), truth as
    allowed-set bits [D, H, W] (1..15; `ALL` = unknown, e.g. a slice that was not scored) and
    the voxel spacing (slice, row, column) in millimetres, or None when unknown."""

    predicted: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, float, float] | None = None

    def __post_init__(self):
        self.predicted = np.asarray(self.predicted)
        self.truth = np.asarray(self.truth)
        if self.predicted.shape != self.truth.shape or self.predicted.ndim != 3:
            raise ValueError(
                f"a block needs predicted and truth [D, H, W] of one shape, got "
                f"{self.predicted.shape} and {self.truth.shape}"
            )
        for name, a in (("predicted", self.predicted), ("truth", self.truth)):
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
        if self.predicted.size:
            lo, hi = int(self.predicted.min()), int(self.predicted.max())
            if lo < 0 or hi >= NUM_CLASSES:
                raise ValueError(f"predicted class ids must be in 0..{NUM_CLASSES - 1}")
            lo, hi = int(self.truth.min()), int(self.truth.max())
            if lo < 1 or hi > ALL:
                raise ValueError(f"truth bits must be in 1..{ALL}, got {lo}..{hi}")
        self.predicted = self.predicted.astype(np.uint8, copy=False)
        self.truth = self.truth.astype(np.uint8, copy=False)
        if self.spacing is not None:
            self.spacing = _check_spacing(self.spacing, 3)

    def masks(self, cbits: int) -> tuple[np.ndarray, np.ndarray]:
        """(predicted, truth) boolean masks of a class over the voxels scored for it."""
        sets = np.arange(ALL + 1)
        positive = (sets & ~cbits) == 0
        scored = positive | ((sets & cbits) == 0)
        hit = (np.left_shift(1, np.arange(NUM_CLASSES)) & cbits) != 0
        return hit[self.predicted] & scored[self.truth], positive[self.truth]


def format_spacing(spacing: Sequence[float] | None) -> str:
    """``"2.5x0.8x0.6"`` (slice x row x column, mm) or ``"unknown"``."""
    if spacing is None:
        return "unknown"
    return "x".join(f"{s:.4g}" for s in spacing)


def _stats(values: list[float]) -> dict[str, float | None]:
    a = np.asarray(values, np.float64)
    if not a.size:
        return {"mean": None, "std": None}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=0))}


class VolumeTable:
    """Accumulates per-case 3-D Dice and HD95 (see the module docstring for the conventions).

    Args:
        classes: the scored classes (names of `VOLUME_CLASSES`, e.g. from `volume_classes`).
        absent: the per-slice table's empty-truth policy (``exclude``, ``zero``, ``one``).
    """

    def __init__(self, classes: Sequence[str] = ("ggo", "con", "lesion"), absent="exclude"):
        unknown = [c for c in classes if c not in VOLUME_CLASSES]
        if unknown or not classes:
            raise ValueError(f"unknown classes {unknown}: use {', '.join(VOLUME_CLASSES)}")
        if absent not in ABSENT_POLICIES:
            raise ValueError(f"unknown absent policy {absent!r}: use {', '.join(ABSENT_POLICIES)}")
        self.classes, self.absent = tuple(classes), absent
        self._rows: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(
        self,
        case: str,
        blocks: Block | Sequence[Block],
        *,
        kind: str = "volume",
        slices: int | None = None,
    ) -> dict:
        """Score one case made of one or more blocks (e.g. the volumes of a patient, or runs of
        slices of one size); returns its row. `kind` names what the case is (``volume``,
        ``patient``); `slices` is the number of slices scored (default: the blocks' depth).

        Dice counts every block's voxels; HD95 pools the directed surface distances of the
        blocks (each block measured within itself), and is NaN when some block has the class
        on one side only. HD95 is in mm when every block has a spacing, in voxels when none
        has, and NaN for a case that mixes the two.
        """
        blocks = [blocks] if isinstance(blocks, Block) else list(blocks)
        if not blocks:
            raise ValueError(f"case {case!r} has no slices")
        if any(r["case"] == case for r in self._rows):
            raise ValueError(f"case {case!r} was already added")
        spacings = {b.spacing for b in blocks}
        known = [b.spacing is not None for b in blocks]
        unit = "mm" if all(known) else "px" if not any(known) else "mixed"
        row: dict[str, Any] = {
            "case": str(case),
            "kind": kind,
            "slices": sum(b.truth.shape[0] for b in blocks) if slices is None else int(slices),
            "spacing": format_spacing(next(iter(spacings))) if len(spacings) == 1 else "mixed",
            "hd95_unit": unit,
        }
        for name in self.classes:
            row |= self._score(name, blocks, unit)
        self._rows.append(row)
        return row

    def _score(self, name: str, blocks: list[Block], unit: str) -> dict[str, Any]:
        tp = fp = fn = 0
        forward, backward, undefined = [], [], False
        for b in blocks:
            pred, true = b.masks(VOLUME_CLASSES[name])
            both = int(np.count_nonzero(pred & true))
            tp, fp, fn = tp + both, fp + int(pred.sum()) - both, fn + int(true.sum()) - both
            if pred.any() and true.any():
                sampling = b.spacing if unit == "mm" else None
                f, r = surface_distances(pred, true, sampling)
                forward.append(f)
                backward.append(r)
            elif pred.any() or true.any():
                undefined = True
        dice = scores_from_counts(tp, fp, fn, self.absent)["f1"]
        if dice is None:  # empty truth, left out
            hd = None
        elif undefined or unit == "mixed":
            hd = math.nan
        elif forward:
            hd = _hd_from(np.concatenate(forward), np.concatenate(backward))
        else:  # nothing in truth or prediction
            hd = 0.0
        return {
            f"{name}_dice": dice,
            f"{name}_hd95": hd,
            f"{name}_truth_voxels": tp + fn,
            f"{name}_predicted_voxels": tp + fp,
        }

    def rows(self) -> list[dict[str, Any]]:
        """One row per case: case, kind, slices, spacing, hd95_unit, then per class
        ``<class>_dice``, ``<class>_hd95`` (None = left out, NaN = undefined),
        ``<class>_truth_voxels`` and ``<class>_predicted_voxels`` (scored voxels only)."""
        return [dict(r) for r in self._rows]

    def columns(self) -> list[str]:
        cols = ["case", "kind", "slices", "spacing", "hd95_unit"]
        for c in self.classes:
            cols += [f"{c}_dice", f"{c}_hd95", f"{c}_truth_voxels", f"{c}_predicted_voxels"]
        return cols

    def summary(self) -> dict[str, Any]:
        """Means and population stds over cases, per class.

        ``{"n_cases", "absent", "hd95_unit", "kinds", "classes": {class: {"dice": {"mean",
        "std"}, "hd95": {"mean", "std"}, "n_cases", "n_left_out", "n_hd95",
        "n_hd95_undefined", "n_hd95_in_pixels"}}}``. ``hd95_unit`` is ``mm`` when some case
        has a known spacing (cases in pixels are then left out of the HD95 means and counted
        in ``n_hd95_in_pixels``), else ``px``; None without cases.
        """
        units = {r["hd95_unit"] for r in self._rows}
        unit = None if not self._rows else "mm" if "mm" in units else "px"
        classes: dict[str, Any] = {}
        for c in self.classes:
            kept = [r for r in self._rows if r[f"{c}_dice"] is not None]
            hds = [r for r in kept if not math.isnan(r[f"{c}_hd95"])]
            same = [r for r in hds if r["hd95_unit"] == unit]
            classes[c] = {
                "dice": _stats([r[f"{c}_dice"] for r in kept]),
                "hd95": _stats([r[f"{c}_hd95"] for r in same]),
                "n_cases": len(kept),
                "n_left_out": len(self._rows) - len(kept),
                "n_hd95": len(same),
                "n_hd95_undefined": len(kept) - len(hds),
                "n_hd95_in_pixels": len(hds) - len(same),
            }
        kinds: dict[str, int] = {}
        for r in self._rows:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        return {
            "n_cases": len(self._rows),
            "absent": self.absent,
            "hd95_unit": unit,
            "kinds": kinds,
            "classes": classes,
        }

    def to_csv(self) -> str:
        """The rows as CSV (a header alone without cases): left-out values are empty cells,
        undefined HD95 is ``nan``."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        for row in self._rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return buf.getvalue()


def summary_markdown(summary: dict[str, Any], note: str = "", title: str | None = None) -> str:
    """A `VolumeTable.summary()` as a markdown section: one row per class with the Dice and
    HD95 mean ± std over cases and the case counts, then `note` and the conventions."""
    lines = [f"### {title}", ""] if title else []
    n = summary["n_cases"]
    if not n:
        return "\n".join([*lines, note or "No cases."]) + "\n"
    unit = summary["hd95_unit"]
    lines.append(
        f"| class | Dice 3-D | HD95 ({unit}) | cases scored | left out (no truth) "
        "| HD95 undefined |"
    )
    lines.append("| --- " * 6 + "|")
    for c, e in summary["classes"].items():
        hd = format_cell(e["hd95"]["mean"], e["hd95"]["std"], digits=2)
        if e["n_hd95_in_pixels"]:
            hd += f" ({e['n_hd95_in_pixels']} in px left out)"
        dice = format_cell(e["dice"]["mean"], e["dice"]["std"])
        lines.append(
            f"| {VOLUME_LABELS.get(c, c)} | {dice} | {hd} | {e['n_cases']} of {n} "
            f"| {e['n_left_out']} | {e['n_hd95_undefined']} |"
        )
    lines.append("")
    if note:
        lines += [note, ""]
    lines.append(
        "Mean ± population std over cases. Dice of a case = Dice of all its voxels; HD95 = "
        "the larger of the two directed 95th percentiles of the surface distances. Cases "
        f"without the class in their truth: policy `{summary['absent']}` (as the per-slice "
        "table); HD95 undefined (the class on one side only) is left out of the HD95 mean. "
        "Per case: volumes.csv."
    )
    return "\n".join(lines) + "\n"
