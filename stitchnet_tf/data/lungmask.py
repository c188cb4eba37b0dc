"""Lung-field masks for the preprocessing step that zeroes a CT slice outside the lungs and crops.

`LungSegmenter` is the interface (a callable slice -> mask); `AutoLungMask` is the classical,
model-free implementation; `lung_bbox` gives the crop box of a mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np


@runtime_checkable
class LungSegmenter(Protocol):
    """Anything that maps one axial slice [H, W] float32 in [0, 1] to a lung mask [H, W] bool."""

    def __call__(self, image: np.ndarray) -> np.ndarray: ...


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _open(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius < 1:
        return mask
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _disk(radius)).astype(bool)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius < 1:
        return mask
    return cv2.dilate(mask.astype(np.uint8), _disk(radius)).astype(bool)


def _close(mask: np.ndarray, radius: int) -> np.ndarray:
    """Closing that treats the outside of the image as background (no border artefacts)."""
    if radius < 1:
        return mask
    p = radius + 1
    padded = np.pad(mask.astype(np.uint8), p)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, _disk(radius))
    return closed[p:-p, p:-p].astype(bool)


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of uint8 values (any shape)."""
    t, _ = cv2.threshold(values.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t)


def _convex_fill(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of a non-empty [H, W] bool mask."""
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    out = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(out, cv2.convexHull(np.concatenate(contours)), 1)
    return out.astype(bool)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a [H, W] bool mask (background not connected to the image border)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    ff_mask = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(padded, ff_mask, (0, 0), 1)
    return mask | (padded[1:-1, 1:-1] == 0)


class AutoLungMask:
    """Classical lung-field mask of one axial CT slice; no trained model needed.

    For the preprocessing that zeroes everything outside the lungs and crops to them (it includes
    the lesions, as radiologists' lung masks do). Input: [H, W] (or [H, W, 1]) lung-window slice,
    e.g. an 8-bit PNG/JPEG scaled to [0, 1] or Hounsfield units through `intensity.window_hu`; only
    relative intensities matter. Output: [H, W] bool, empty for a blank/constant slice or when no
    lung is found. Radii are fractions of min(H, W) and areas fractions of H*W, so the defaults
    work from 64 to 512 px and beyond.

    Steps:
      1. Min-max normalise to uint8, median filter (`smooth_size`), Otsu threshold: dark (air,
         lung) versus bright (tissue).
      2. Body = bright components (after an opening of `body_open` that drops thin table and
         field-of-view rims) larger than `body_min_area`; its convex hull is the thorax. A dark
         component is outside air unless at least `hull_inside` of it lies in the hull or it is
         nearly convex (solidity >= `cut_solidity`): lungs cut by a tight crop survive.
      3. Lung candidates: dark components (after an opening of `open_radius` that cuts thin
         bridges) larger than `min_area` and at least `keep_rel_area` of the largest, whose
         median contrast to a surrounding ring is at least `min_contrast` of the best one (drops
         air pockets between body and table); at most `max_components`, largest first.
      4. Each lung: closing with `close_radius` and hole filling (vessels, lesions inside); then
         concavities of its convex hull that lie farther from the thorax centre than the lung
         beside them and are at most `max_defect` of its area are added (lesions against the
         chest wall, not the heart or mediastinum). A final opening/closing (`final_radius`).
      5. If `multi_threshold`: Otsu is also computed inside the thorax without outside air (and
         the midpoint), since outside air much darker than noisy or contrast-enhanced lungs drags
         the global threshold down. Each threshold gives a mask; masks for which more than
         `leak_tolerance` of the first mask became outside air are dropped (a lung leaked out
         through fat), and the one with the largest median contrast to its surroundings wins.
    """

    def __init__(
        self,
        smooth_size: float = 0.028,
        body_open: float = 0.012,
        body_min_area: float = 0.02,
        hull_inside: float = 0.5,
        cut_solidity: float = 0.9,
        open_radius: float = 0.008,
        min_area: float = 0.002,
        keep_rel_area: float = 0.12,
        min_contrast: float = 0.5,
        max_components: int = 3,
        close_radius: float = 0.03,
        max_defect: float = 0.3,
        final_radius: float = 0.006,
        ring_radius: float = 0.04,
        multi_threshold: bool = True,
        leak_tolerance: float = 0.1,
    ) -> None:
        self.smooth_size = float(smooth_size)
        self.body_open = float(body_open)
        self.body_min_area = float(body_min_area)
        self.hull_inside = float(hull_inside)
        self.cut_solidity = float(cut_solidity)
        self.open_radius = float(open_radius)
        self.min_area = float(min_area)
        self.keep_rel_area = float(keep_rel_area)
        self.min_contrast = float(min_contrast)
        self.max_components = int(max_components)
        self.close_radius = float(close_radius)
        self.max_defect = float(max_defect)
        self.final_radius = float(final_radius)
        self.ring_radius = float(ring_radius)
        self.multi_threshold = bool(multi_threshold)
        self.leak_tolerance = float(leak_tolerance)

    def get_config(self) -> dict[str, Any]:
        """Method name and parameters (radii: fractions of min(H, W); areas: of H*W)."""
        return {
            "method": "auto-classical",
            "smooth_size": self.smooth_size,
            "body_open": self.body_open,
            "body_min_area": self.body_min_area,
            "hull_inside": self.hull_inside,
            "cut_solidity": self.cut_solidity,
            "open_radius": self.open_radius,
            "min_area": self.min_area,
            "keep_rel_area": self.keep_rel_area,
            "min_contrast": self.min_contrast,
            "max_components": self.max_components,
            "close_radius": self.close_radius,
            "max_defect": self.max_defect,
            "final_radius": self.final_radius,
            "ring_radius": self.ring_radius,
            "multi_threshold": self.multi_threshold,
            "leak_tolerance": self.leak_tolerance,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "method")
        return f"AutoLungMask({args})"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        img = np.asarray(image, dtype=np.float32)
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        if img.ndim != 2:
            raise ValueError(f"expected one slice [H, W] or [H, W, 1], got shape {img.shape}")
        H, W = img.shape
        empty = np.zeros((H, W), bool)
        if H < 8 or W < 8:
            return empty
        img = np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(img.min()), float(img.max())
        if not hi - lo > 1e-6 * max(1.0, abs(lo), abs(hi)):
            return empty  # blank or constant slice
        u8 = np.clip(np.rint((img - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
        size, area = min(H, W), float(H * W)

        def px(frac: float) -> int:
            return int(round(frac * size))

        k = 2 * (px(self.smooth_size) // 2) + 1
        sm = cv2.medianBlur(u8, k) if k >= 3 else u8
        t = _otsu(sm)

        # Thorax: convex hull of the large bright components.
        bright = _open(sm > t, px(self.body_open))
        n, lab, stats, _ = cv2.connectedComponentsWithStats(bright.astype(np.uint8), connectivity=8)
        big = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= self.body_min_area * area]
        if not big:
            return empty
        hull = _convex_fill(np.isin(lab, big))
        ys, xs = np.nonzero(hull)
        center = (float(ys.mean()), float(xs.mean()))
        yy, xx = np.mgrid[0:H, 0:W]
        dist = np.hypot(yy - center[0], xx - center[1]).astype(np.float32)

        comps, outside = self._components(sm, sm <= t, hull, px, area)
        thresholds = [t]
        if self.multi_threshold:
            inner = sm[hull & ~outside]
            if inner.size > 16 and inner.min() < inner.max():
                t2 = _otsu(inner)
                if t2 > t:
                    thresholds += [0.5 * (t + t2), t2]

        best, best_score = empty, -np.inf
        first, n_first = empty, 0
        rr = max(px(self.ring_radius), 1)
        for j, th in enumerate(thresholds):
            if j > 0:
                comps, outside = self._components(sm, sm <= th, hull, px, area)
                if n_first and np.count_nonzero(first & outside) > self.leak_tolerance * n_first:
                    continue  # at this threshold a lung leaks into the outside air
            if not comps:
                continue
            mask = self._finish(comps, center, dist, px)
            if not n_first:
                first, n_first = mask, int(np.count_nonzero(mask))
            ring = _dilate(mask, rr) & hull & ~mask
            if not ring.any():
                continue
            # The right threshold puts the mask's edge on the chest wall: highest contrast.
            score = float(np.median(sm[ring])) - float(np.median(sm[mask]))
            if score > best_score:
                best, best_score = mask, score
        return best

    def _components(
        self,
        sm: np.ndarray,
        dark: np.ndarray,
        hull: np.ndarray,
        px: Callable[[float], int],
        area: float,
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Dark components that may be lung (largest first), and the outside-air mask."""
        cand = _open(dark, px(self.open_radius))
        n, lab, stats, _ = cv2.connectedComponentsWithStats(cand.astype(np.uint8), connectivity=4)
        keep: list[tuple[int, int]] = []
        out_ids: list[int] = []
        for i in range(1, n):
            a = int(stats[i, cv2.CC_STAT_AREA])
            x, y, w, h = stats[i, :4]
            comp = lab[y : y + h, x : x + w] == i
            big = a >= self.min_area * area
            if np.count_nonzero(comp & hull[y : y + h, x : x + w]) < self.hull_inside * a and (
                not big or a < self.cut_solidity * np.count_nonzero(_convex_fill(comp))
            ):
                out_ids.append(i)  # outside air (not a lung cut by the crop)
            elif big:
                keep.append((a, i))
        outside = np.isin(lab, out_ids)
        if not keep:
            return [], outside
        keep.sort(reverse=True)
        keep = [(a, i) for a, i in keep if a >= self.keep_rel_area * keep[0][0]]

        # Lungs are dark regions walled in by tissue: drop weak-contrast air pockets.
        H, W = dark.shape
        rr = max(px(self.ring_radius), 1)
        contrast = []
        for _, i in keep:
            x, y, w, h = stats[i, :4]
            y0, y1, x0, x1 = max(y - rr, 0), min(y + h + rr, H), max(x - rr, 0), min(x + w + rr, W)
            comp = lab[y0:y1, x0:x1] == i
            ring = _dilate(comp, rr) & ~comp
            win = sm[y0:y1, x0:x1]
            contrast.append(
                float(np.median(win[ring])) - float(np.median(win[comp])) if ring.any() else 0.0
            )
        cmax = max(contrast)
        ids = [i for (_, i), c in zip(keep, contrast, strict=True) if c >= self.min_contrast * cmax]
        return [lab == i for i in ids[: self.max_components]], outside

    def _finish(
        self,
        comps: list[np.ndarray],
        center: tuple[float, float],
        dist: np.ndarray,
        px: Callable[[float], int],
    ) -> np.ndarray:
        """Close and fill each lung, add lesions on its chest-wall side, smooth the union."""
        out = np.zeros(comps[0].shape, bool)
        rc, rf = px(self.close_radius), px(self.final_radius)
        band_r = max(px(0.01), 1)
        cy, cx = int(round(center[0])), int(round(center[1]))
        for comp in comps:
            lung = fill_holes(_close(comp, rc))
            n_lung = np.count_nonzero(lung)
            defect = _open(_convex_fill(lung) & ~lung, rf)
            n, lab, stats, _ = cv2.connectedComponentsWithStats(
                defect.astype(np.uint8), connectivity=4
            )
            for i in range(1, n):
                if stats[i, cv2.CC_STAT_AREA] > self.max_defect * n_lung or lab[cy, cx] == i:
                    continue  # heart or mediastinum (e.g. between two merged lungs)
                d = lab == i
                band = _dilate(d, band_r) & lung
                if band.any() and dist[d].mean() > dist[band].mean():
                    lung |= d
            out |= lung
        out = _close(_open(out, rf), rf)
        return fill_holes(out)


def lung_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (y0, y1, x0, x1), half-open, of a [H, W] mask; None if the mask is empty."""
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"expected a mask [H, W], got shape {m.shape}")
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
