"""Intensity transforms: CT windowing, scaling to [0, 1] and per-slice standardisation."""

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


#: Intensity modes of the preprocessing: the slice as read, or `standardise`d per slice.
INTENSITY_MODES = ("none", "standardise")
#: Where `standardise` puts its two anchors: the darkest tenth of the lung field (aerated lung)
#: and the median of the soft tissue around it; the medians of these anchors over the 50
#: labelled MedSeg slices (docs/DESIGN.md §7.14).
LUNG_ANCHOR, TISSUE_ANCHOR = 0.13, 0.82
#: Percentile of the lung field taken as its anchor.
LUNG_PERCENTILE = 10.0
#: Width of the tissue ring around the lung field, as a fraction of sqrt(field area).
RING_FRACTION = 0.04
#: Below this anchor separation (or with fewer than 16 pixels in the field or the ring) the
#: slice has no usable contrast and is left as it is.
MIN_CONTRAST = 0.1


def ring_radius(field_pixels: int) -> int:
    """Half-width in pixels of the square dilation that makes the tissue ring."""
    return max(2, int(round(RING_FRACTION * float(np.sqrt(field_pixels)))))


def anchors(image: np.ndarray, field: np.ndarray) -> tuple[float, float] | None:
    """(lung anchor, tissue anchor) of a slice [H, W] in [0, 1] with lung field [H, W] bool:
    the `LUNG_PERCENTILE` of the field and the median of the ring around it (square dilation
    by `ring_radius`); None when there is too little to measure."""
    import cv2

    field = np.asarray(field, bool)
    n = int(np.count_nonzero(field))
    if n < 16:
        return None
    r = ring_radius(n)
    grown = cv2.dilate(field.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8))
    ring = grown.astype(bool) & ~field
    if np.count_nonzero(ring) < 16:
        return None
    image = np.asarray(image, np.float32)
    # "lower": an actual pixel value (as the exported graph computes it, by sorting)
    lung = float(np.percentile(image[field], LUNG_PERCENTILE, method="lower"))
    tissue = float(np.percentile(image[ring], 50.0, method="lower"))
    return lung, tissue


def standardise(image: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Map a slice [H, W] in [0, 1] linearly so that its lung anchor lands on `LUNG_ANCHOR` and
    its tissue anchor on `TISSUE_ANCHOR` (see `anchors`), clipped to [0, 1]: slices from other
    windows, scanners and exports then look alike. A slice without usable contrast is returned
    unchanged. The lung field should come from the image alone (the same at training and at
    deployment)."""
    image = np.asarray(image, np.float32)
    found = anchors(image, field)
    if found is None or found[1] - found[0] < MIN_CONTRAST:
        return image
    lung, tissue = found
    scale = (TISSUE_ANCHOR - LUNG_ANCHOR) / (tissue - lung)
    return np.clip(LUNG_ANCHOR + (image - lung) * scale, 0.0, 1.0).astype(np.float32)


def check_intensity(mode: str) -> str:
    """`mode` if it is one of `INTENSITY_MODES`, else ValueError."""
    if mode not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {mode!r}")
    return mode
