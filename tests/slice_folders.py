"""Tiny hand-made labelled folders for the evaluation and threshold-rule tests.

Slices are 64 x 64 with the lung field [2:62, 2:62]: its crop box (5 % margin) is the whole
slice, so at model size 64 the preprocessing geometry is the identity and scores are exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stitchnet_tf.data import io
from stitchnet_tf.data.synthetic import MEDSEG_PALETTE

N = 64
LUNG = np.zeros((N, N), bool)
LUNG[2:62, 2:62] = True
LEVELS = {"healthy": 51, "ggo": 128, "con": 204}  # 8-bit grey: x = 0.2, 0.502, 0.8


def write_folder(root: Path, images, lesions, lungs=None) -> Path:
    """Write images [H, W] uint8, MedSeg lesion masks (0 none, 1 GGO, 2 CON) and optional
    0/1 lung masks as `root/{images,masks,lungs}/sNN.png`; returns `root`."""
    for sub in ("images", "masks") + (("lungs",) if lungs is not None else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, (image, lesion) in enumerate(zip(images, lesions, strict=True)):
        io.write_png(root / "images" / f"s{i:02d}.png", image)
        io.write_png(root / "masks" / f"s{i:02d}.png", lesion, list(MEDSEG_PALETTE))
        if lungs is not None:
            io.write_png(root / "lungs" / f"s{i:02d}.png", lungs[i].astype(np.uint8) * 255)
    return root


def piecewise(n: int = 3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Slices whose healthy lung, GGO and CON have one grey level each (`LEVELS`)."""
    images, lesions = [], []
    for i in range(n):
        lesion = np.zeros((N, N), np.uint8)
        lesion[10 + 3 * i : 25 + 3 * i, 10:30] = 1
        lesion[35:50, 30 + 4 * i : 45 + 4 * i] = 2
        image = np.where(LUNG, LEVELS["healthy"], 0).astype(np.uint8)
        image[lesion == 1], image[lesion == 2] = LEVELS["ggo"], LEVELS["con"]
        images.append(image)
        lesions.append(lesion)
    return images, lesions


def noisy(n: int = 3, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`piecewise` slices with strong noise (lesion classes overlap in intensity)."""
    rng = np.random.default_rng(seed)
    images, lesions = piecewise(n)
    out = []
    for image in images:
        noise = rng.normal(0, 40, image.shape)
        out.append(np.where(LUNG, np.clip(image + noise, 1, 255), 0).astype(np.uint8))
    return out, lesions
