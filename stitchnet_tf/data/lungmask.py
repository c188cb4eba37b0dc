"""Lung-field masks for the preprocessing step that zeroes and crops a CT slice to the lungs."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
from scipy import ndimage as ndi


@runtime_checkable
class LungSegmenter(Protocol):
    """Anything that maps a slice [H, W] float32 in [0, 1] to a lung mask [H, W] bool."""

    def __call__(self, image: np.ndarray) -> np.ndarray: ...


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


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


class AutoLungMask:
    """Classical lung-field mask of one axial CT slice; no trained model needed.

    For the preprocessing that zeroes everything outside the lungs and crops to them. Works on
    lung-windowed slices scaled to [0, 1] (8-bit PNG/JPEG slices, or Hounsfield units through
    `intensity.window_hu`), at any size: every radius and area is relative to the image size.

    Steps: min-max normalise (a constant image gives an empty mask); median smoothing; Otsu
    threshold into dark (air, lung) and bright (tissue); the body is the bright components above
    `body_min_area` and its convex hull separates lungs from outside air (dark components that touch
    the image border count as lung only if mostly inside that hull, so lungs cut by a tight crop
    survive); a small opening cuts thin bridges; dark components above `min_area` are kept while
    at least `keep_rel_area` of the largest (trachea, gas bubbles and specks drop out); each is
    closed with a disk of `close_radius` (pulls in lesions and vessels on the lung border) and its
    holes are filled (lesions, vessels inside the lung); a final opening and closing smooths it.

    Call: image [H, W] float in [0, 1] -> mask [H, W] bool.
    """

    def __init__(
        self,
        smooth: float = 0.012,
        open_radius: float = 0.008,
        close_radius: float = 0.03,
        body_min_area: float = 0.02,
        hull_inside: float = 0.8,
        min_area: float = 0.002,
        keep_rel_area: float = 0.12,
        max_components: int = 3,
        final_radius: float = 0.006,
        refine: bool = True,
        ring_radius: float = 0.04,
        keep_cover: float = 0.9,
        fill_peripheral: bool = True,
        body_open: float = 0.012,
        min_contrast: float = 0.5,
        max_defect: float = 0.3,
    ) -> None:
        self.max_defect = float(max_defect)
        self.min_contrast = float(min_contrast)
        self.body_open = float(body_open)
        self.fill_peripheral = bool(fill_peripheral)
        self.keep_cover = float(keep_cover)
        self.ring_radius = float(ring_radius)
        self.refine = bool(refine)
        self.smooth = float(smooth)
        self.open_radius = float(open_radius)
        self.close_radius = float(close_radius)
        self.body_min_area = float(body_min_area)
        self.hull_inside = float(hull_inside)
        self.min_area = float(min_area)
        self.keep_rel_area = float(keep_rel_area)
        self.max_components = int(max_components)
        self.final_radius = float(final_radius)

    def get_config(self) -> dict[str, Any]:
        """The parameters (radii as fractions of min(H, W), areas as fractions of H*W)."""
        return {
            "method": "auto-classical",
            "smooth": self.smooth,
            "open_radius": self.open_radius,
            "close_radius": self.close_radius,
            "body_min_area": self.body_min_area,
            "hull_inside": self.hull_inside,
            "min_area": self.min_area,
            "keep_rel_area": self.keep_rel_area,
            "max_components": self.max_components,
            "final_radius": self.final_radius,
        }

    def __call__(self, image: np.ndarray) -> np.ndarray:
        img = np.asarray(image, dtype=np.float32)
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        if img.ndim != 2:
            raise ValueError(f"expected an [H, W] slice, got shape {img.shape}")
        H, W = img.shape
        empty = np.zeros((H, W), bool)
        if H < 8 or W < 8:
            return empty
        img = np.nan_to_num(img, nan=0.0, posinf=1.0, neginf=0.0)
        lo, hi = float(img.min()), float(img.max())
        if hi - lo < 1e-3:
            return empty
        u8 = np.clip(np.rint((img - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
        size = min(H, W)
        area = float(H * W)

        def px(frac: float) -> int:
            return int(round(frac * size))

        k = 2 * max(px(self.smooth) // 2, 0) + 1
        sm = cv2.medianBlur(u8, k) if k >= 3 else u8
        t, _ = cv2.threshold(sm, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        dark = sm <= t
        # Thin bright structures (table, FOV rim, cables) are not body.
        bright = _open(~dark, px(self.body_open))

        # Body: large bright components; its convex hull tells lungs from outside air.
        n, lab, stats, _ = cv2.connectedComponentsWithStats(bright.astype(np.uint8), connectivity=8)
        big = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= self.body_min_area * area]
        if not big:
            return empty
        body = np.isin(lab, big)
        pts = cv2.findNonZero(body.astype(np.uint8))
        hull = np.zeros((H, W), np.uint8)
        cv2.fillConvexPoly(hull, cv2.convexHull(pts), 1)
        hull = hull.astype(bool)

        comps, outside = self._components(sm, sm <= t, hull, px, area)
        thresholds = [float(t)]
        if self.refine:
            # Outside air can be far darker than (noisy) lungs and drag Otsu down: also try
            # Otsu inside the body hull without the outside air, and the midpoint.
            vals = sm[hull & ~outside]
            if vals.size > 16 and vals.min() < vals.max():
                t2, _ = cv2.threshold(
                    vals.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU
                )
                if t2 > t:
                    thresholds += [0.5 * (t + t2), float(t2)]
        ys, xs = np.nonzero(hull)
        center = (float(ys.mean()), float(xs.mean()))
        best, best_score = empty, -np.inf
        first, nfirst = empty, 0
        rr = max(px(self.ring_radius), 1)
        for k, th in enumerate(thresholds):
            if k > 0:
                comps, _ = self._components(sm, sm <= th, hull, px, area)
            if not comps:
                continue
            out = self._finish(comps, hull, center, px)
            if best_score > -np.inf and np.count_nonzero(out & first) < self.keep_cover * nfirst:
                continue  # a higher threshold that loses a lung (leaked into outside air)
            if best_score == -np.inf:
                first, nfirst = out, np.count_nonzero(out)
            ring = _dilate(out, rr) & hull & ~out
            if not ring.any():
                continue
            # Lung/surroundings contrast: the right threshold puts the edge on the chest wall.
            score = float(np.median(sm[ring])) - float(np.median(sm[out]))
            if score > best_score:
                best, best_score = out, score
        return best

    def _components(self, sm, dark, hull, px, area) -> tuple[list[np.ndarray], np.ndarray]:
        """Dark components that may be lung (largest first), and the outside air."""
        cand = _open(dark, px(self.open_radius))
        n, lab, stats, _ = cv2.connectedComponentsWithStats(cand.astype(np.uint8), connectivity=4)
        keep: list[tuple[int, int]] = []
        out_ids: list[int] = []
        for i in range(1, n):
            a = int(stats[i, cv2.CC_STAT_AREA])
            x, y, w, h = stats[i, :4]
            comp = lab[y : y + h, x : x + w] == i
            inside = float(np.count_nonzero(comp & hull[y : y + h, x : x + w])) / a
            if inside < self.hull_inside:
                out_ids.append(i)
            elif a >= self.min_area * area:
                keep.append((a, i))
        outside = np.isin(lab, out_ids)
        if not keep:
            return [], outside
        keep.sort(reverse=True)
        largest = keep[0][0]
        keep = [kv for kv in keep if kv[0] >= self.keep_rel_area * largest]
        # Lungs are dark regions walled in by tissue: drop components with weak contrast to
        # their surroundings (air pockets between body and table or field-of-view rim).
        H, W = dark.shape
        rr = max(px(self.ring_radius), 1)
        comps, contrast = [], []
        for _, i in keep:
            x, y, w, h = stats[i, :4]
            y0, y1, x0, x1 = max(y - rr, 0), min(y + h + rr, H), max(x - rr, 0), min(x + w + rr, W)
            comp = lab[y0:y1, x0:x1] == i
            ring = _dilate(comp, rr) & ~comp
            win = sm[y0:y1, x0:x1]
            c = float(np.median(win[ring])) - float(np.median(win[comp])) if ring.any() else 0.0
            comps.append(lab == i)
            contrast.append(c)
        cmax = max(contrast)
        comps = [m for m, c in zip(comps, contrast, strict=True) if c >= self.min_contrast * cmax]
        self._dbg_contrast = contrast
        return comps[: self.max_components], outside

    def _finish(self, comps, hull, center, px) -> np.ndarray:
        """Close and fill each lung, add lesions on its outer side, smooth the union."""
        H, W = hull.shape
        yy, xx = np.mgrid[0:H, 0:W]
        dist = np.hypot(yy - center[0], xx - center[1])
        cy, cx = int(round(center[0])), int(round(center[1]))
        out = np.zeros((H, W), bool)
        rc, rf = px(self.close_radius), px(self.final_radius)
        band_r = max(px(0.01), 1)
        for comp in comps:
            lung = ndi.binary_fill_holes(_close(comp, rc))
            n_lung = np.count_nonzero(lung)
            if self.fill_peripheral:
                # Concavities of the lung's convex hull that lie farther from the body centre than
                # the lung next to them: lesions against the chest wall (not the heart/hilum).
                ch = np.zeros((H, W), np.uint8)
                cv2.fillConvexPoly(ch, cv2.convexHull(cv2.findNonZero(lung.astype(np.uint8))), 1)
                defect = _open(ch.astype(bool) & ~lung, rf)
                n, lab = cv2.connectedComponents(defect.astype(np.uint8), connectivity=4)
                for i in range(1, n):
                    d = lab == i
                    if np.count_nonzero(d) > self.max_defect * n_lung or d[cy, cx]:
                        continue  # the mediastinum between two merged lungs, not a lesion
                    band = _dilate(d, band_r) & lung
                    if band.any() and dist[d].mean() > dist[band].mean():
                        lung |= d
            out |= lung
        out = _close(_open(out, rf), rf)
        return ndi.binary_fill_holes(out)


def lung_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (y0, y1, x0, x1), half-open, of a [H, W] mask; None if the mask is empty."""
    m = np.asarray(mask).astype(bool)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
