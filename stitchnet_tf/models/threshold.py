"""The two-threshold rule: a reproducible contender that learns nothing but two cut-offs.

On the prepared slice x (lung-cropped, resized, in [0, 1]), inside the lung field:
x < low -> healthy lung, low <= x < high -> GGO, x >= high -> consolidation; outside it ->
background. `threshold_fit.fit_threshold_rule` chooses (low, high) on labelled training
slices by a grid search maximising the mean per-image lesion Dice that `evaluation.evaluate`
reports; the rule is kept as a small JSON file that `inference.load_model` (and so
`stitchnet-tf evaluate --model rule.json`) reads.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from stitchnet_tf.data.classes import BACKGROUND, CLASS_NAMES, CON, GGO, HEALTHY, NUM_CLASSES
from stitchnet_tf.data.intensity import check_intensity
from stitchnet_tf.errors import DataError
from stitchnet_tf.fileio import atomic_write_text
from stitchnet_tf.options import check_deterministic

KIND = "threshold_rule"
FILE_NAME = "threshold_rule.json"
RULE_TEXT = (
    "inside the lung field: x < low healthy, low <= x < high GGO, x >= high consolidation; "
    "outside: background"
)


def _plane(a, name: str) -> np.ndarray:
    """[B, H, W, 1] or [B, H, W] (numpy or tensor) -> [B, H, W] numpy."""
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must be [B, H, W, 1] or [B, H, W], got shape {a.shape}")
    return a


def threshold_grid(step: float = 0.01) -> np.ndarray:
    """The candidate cut-offs 0, step, 2 step, ..., 1 (float64, rounded to 6 decimals)."""
    n = int(round(1.0 / step))
    if n < 1 or not math.isclose(n * step, 1.0, rel_tol=1e-6):
        raise ValueError(f"step {step} must divide 1 into a whole number of steps")
    return np.round(np.arange(n + 1) * step, 6)


class ThresholdRule:
    """Two cut-offs on the prepared slice, with the models' `segment` contract.

    Args:
        low: GGO from `low` on (0 <= low <= high <= 1).
        high: consolidation from `high` on.
        size: the model size the cut-offs were fitted at (None if unknown).
        fit_info: how they were fitted (saved in the JSON file).
        intensity: the intensity preprocessing of the slices it was fitted on.

    Example:
        >>> rule = ThresholdRule(0.3, 0.6)
        >>> x = np.array([[[0.0, 0.1], [0.4, 0.9]]], np.float32)
        >>> rule.segment(x)["labels"].tolist()
        [[[0, 1], [2, 3]]]
    """

    def __init__(
        self,
        low: float,
        high: float,
        size: int | None = None,
        fit_info: dict | None = None,
        intensity: str = "none",
    ):
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low <= high <= 1.0):
            raise ValueError(f"cut-offs must satisfy 0 <= low <= high <= 1, got {low}, {high}")
        self.low, self.high = low, high
        self.size = None if size is None else int(size)
        self.fit_info = dict(fit_info or {})
        self.intensity = check_intensity(intensity)

    def __repr__(self) -> str:
        return f"ThresholdRule(low={self.low:g}, high={self.high:g}, size={self.size})"

    def labels(self, x, lung=None) -> np.ndarray:
        """Class ids [B, H, W] int64 of x [B, H, W(, 1)]; the lung field is `lung` > 0.5 (same
        shape) when given, else x > 0 (preprocessing zeroes everything outside it)."""
        x = _plane(x, "x").astype(np.float32)
        field = x > 0 if lung is None else _plane(lung, "lung") > 0.5
        if field.shape != x.shape:
            raise ValueError(f"lung shape {field.shape} does not match x shape {x.shape}")
        low, high = np.float32(self.low), np.float32(self.high)  # compare in x's precision
        inside = np.where(x < low, HEALTHY, np.where(x < high, GGO, CON))
        return np.where(field, inside, BACKGROUND).astype(np.int64)

    def segment(self, x, lung=None, samples: int = 0, decision: str | None = None) -> dict:
        """Segment x [B, H, W, 1] like `StitchNet.segment`: one-hot probabilities [B,H,W,4]
        (background, healthy, GGO, CON), labels [B,H,W] and entropy [B,H,W] (0: the rule is
        certain: `models.base.segmentation_output` of these one-hot probabilities, computed
        here in NumPy). `samples` and `decision` are refused: the rule has neither."""
        check_deterministic(self, samples, decision)
        labels = self.labels(x, lung).astype(np.int32)
        probabilities = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
        return {
            "probabilities": probabilities,
            "labels": labels,
            "entropy": np.zeros(labels.shape, np.float32),
        }

    def to_dict(self) -> dict:
        """The JSON content: kind, low, high, size, classes, rule, fit."""
        from stitchnet_tf import __version__

        return {
            "kind": KIND,
            "low": self.low,
            "high": self.high,
            "size": self.size,
            "intensity": self.intensity,
            "classes": list(CLASS_NAMES),
            "rule": RULE_TEXT,
            "stitchnet_tf": __version__,
            "fit": self.fit_info,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the rule as JSON (atomically); a folder gets `threshold_rule.json` inside."""
        p = Path(path)
        if p.is_dir():
            p = p / FILE_NAME
        atomic_write_text(p, json.dumps(self.to_dict(), indent=1) + "\n")
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> ThresholdRule:
        """Read a rule written by `save` (a file, or a folder holding `threshold_rule.json`)."""
        p = Path(path)
        if p.is_dir():
            p = p / FILE_NAME
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise DataError(p, "threshold rule not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(p, f"cannot read threshold rule ({type(e).__name__})") from None
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise DataError(p, f'not a threshold-rule file (no "kind": "{KIND}")')
        try:
            size = d.get("size")
            return cls(
                d["low"],
                d["high"],
                None if size is None else int(size),
                d.get("fit"),
                d.get("intensity", "none"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(p, f"bad threshold rule: {e}") from None
