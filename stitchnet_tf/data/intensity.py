"""Intensity transforms: CT windowing and scaling to [0, 1]."""

from __future__ import annotations

import numpy as np

#: The lung window (docs/DESIGN.md §1): level -600 HU, width 1500 HU.
LUNG_WINDOW_LEVEL = -600.0
LUNG_WINDOW_WIDTH = 1500.0


def window_hu(
    hu: np.ndarray, level: float = LUNG_WINDOW_LEVEL, width: float = LUNG_WINDOW_WIDTH
) -> np.ndarray:
    """Hounsfield units -> [0, 1] float32 through a CT window (level, width)."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    lo = level - width / 2.0
    return np.clip((np.asarray(hu, np.float32) - lo) / width, 0.0, 1.0).astype(np.float32)


def unwindow(x: np.ndarray, level: float = LUNG_WINDOW_LEVEL, width: float = LUNG_WINDOW_WIDTH):
    """[0, 1] -> Hounsfield units, the inverse of `window_hu` inside the window."""
    return (np.asarray(x, np.float32) * width + level - width / 2.0).astype(np.float32)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (rounded)."""
    return np.clip(np.rint(np.asarray(x, np.float32) * 255.0), 0, 255).astype(np.uint8)
