"""Tests for the classical lung-field segmenter (`stitchnet_tf.data.lungmask`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from stitchnet_tf.data.intensity import to_uint8, window_hu
from stitchnet_tf.data.lungmask import AutoLungMask, LungSegmenter, lung_bbox

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ZENODO = DATA / "zenodo20-lungs"


def _ellipse(n: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] / n
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _phantom(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic axial slice [n, n] in HU: air, body with a fat rim, two lungs, vessels, trachea,
    a consolidation on the outer border of one lung and a GGO patch in the other.

    Returns (hu, lungs, lesion inside the lungs, trachea), the masks bool [n, n].
    """
    rng = np.random.default_rng(seed)
    hu = np.full((n, n), -1000.0)
    body = _ellipse(n, 0.5, 0.5, 0.36, 0.44)
    hu[body] = 40.0
    hu[body & ~_ellipse(n, 0.5, 0.5, 0.33, 0.41)] = -100.0  # subcutaneous fat
    lungs = _ellipse(n, 0.48, 0.3, 0.25, 0.14) | _ellipse(n, 0.48, 0.7, 0.25, 0.14)
    hu[lungs] = -850.0
    lesion = _ellipse(n, 0.52, 0.16, 0.07, 0.06) & body  # consolidation on the lung border
    hu[lesion] = 0.0
    hu[_ellipse(n, 0.35, 0.72, 0.05, 0.05)] = -450.0  # ground-glass opacity
    for cy, cx in [(0.4, 0.3), (0.55, 0.35), (0.45, 0.68), (0.6, 0.72), (0.3, 0.27)]:
        hu[_ellipse(n, cy, cx, 0.012, 0.012)] = 40.0  # vessels
    trachea = _ellipse(n, 0.3, 0.5, 0.03, 0.03)
    hu[trachea] = -1000.0
    hu += rng.normal(0.0, 25.0, hu.shape)
    return hu.astype(np.float32), lungs, lesion & lungs, trachea


def _eight_bit(hu: np.ndarray) -> np.ndarray:
    """An 8-bit-style slice like the PNG/JPEG sets: min-max scaled, CLAHE, then /255."""
    x = window_hu(hu, -300.0, 1600.0)
    u8 = to_uint8((x - x.min()) / (x.max() - x.min()))
    u8 = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(u8)
    return u8.astype(np.float32) / 255.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


@pytest.mark.parametrize("style", ["hu_window", "eight_bit"])
def test_phantom_lungs_found_with_lesion(style: str) -> None:
    hu, lungs, lesion, trachea = _phantom(256)
    image = window_hu(hu) if style == "hu_window" else _eight_bit(hu)
    mask = AutoLungMask()(image)
    assert mask.shape == (256, 256) and mask.dtype == bool
    assert _dice(mask, lungs) > 0.9
    assert np.count_nonzero(mask & lesion) >= 0.8 * np.count_nonzero(lesion)  # lesion included
    assert np.count_nonzero(mask & trachea) <= 0.1 * np.count_nonzero(trachea)  # not lung


@pytest.mark.parametrize("size", [64, 512])
def test_scales_with_image_size(size: int) -> None:
    hu, lungs, lesion, _ = _phantom(size, seed=1)
    mask = AutoLungMask()(window_hu(hu))
    assert mask.shape == (size, size) and mask.dtype == bool
    assert _dice(mask, lungs) > 0.9
    assert np.count_nonzero(mask & lesion) >= 0.7 * np.count_nonzero(lesion)


@pytest.mark.parametrize("style", ["hu_window", "eight_bit"])
def test_tight_crop_and_rotation_keep_the_lungs(style: str) -> None:
    """Like the MedSeg slices: cropped inside the thorax (the lungs run into the image border on
    three sides, no outside air) and rotated by 90 degrees."""
    hu, lungs, _, _ = _phantom(320, seed=2)
    crop = (slice(95, 225), slice(60, 260))
    image = window_hu(hu) if style == "hu_window" else _eight_bit(hu)
    image = np.rot90(image[crop]).copy()
    truth = np.rot90(lungs[crop])
    assert truth[0].any() and truth[-1].any() and truth[:, 0].any()  # really cut
    mask = AutoLungMask()(image)
    assert mask.shape == image.shape
    assert _dice(mask, truth) > 0.9


def test_apex_slice_with_tiny_lungs() -> None:
    n = 128
    rng = np.random.default_rng(5)
    hu = np.where(_ellipse(n, 0.5, 0.5, 0.3, 0.38), 40.0, -1000.0)
    tiny = _ellipse(n, 0.45, 0.33, 0.05, 0.04) | _ellipse(n, 0.45, 0.67, 0.05, 0.04)
    hu[tiny] = -850.0
    hu += rng.normal(0.0, 25.0, hu.shape)
    mask = AutoLungMask()(window_hu(hu))
    assert mask.mean() < 0.05
    assert _dice(mask, tiny) > 0.8


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((64, 64), np.float32),
        np.ones((128, 96), np.float32),
        np.full((50, 70), 0.4, np.float32),
        np.full((32, 32), np.nan, np.float32),
        np.zeros((4, 4), np.float32),
    ],
    ids=["black", "white", "constant", "nan", "tiny"],
)
def test_blank_images_give_empty_masks(image: np.ndarray) -> None:
    mask = AutoLungMask()(image)
    assert mask.shape == image.shape and mask.dtype == bool
    assert not mask.any()
    assert lung_bbox(mask) is None


def test_odd_inputs_do_not_crash() -> None:
    seg = AutoLungMask()
    rng = np.random.default_rng(3)
    noise = seg(rng.random((100, 140), dtype=np.float32))
    assert noise.shape == (100, 140) and noise.dtype == bool
    body_only = window_hu(np.where(_ellipse(128, 0.5, 0.5, 0.35, 0.42), 40.0, -1000.0))
    assert seg(body_only).mean() < 0.05  # a slice below the lungs: empty or tiny
    hu, lungs, _, _ = _phantom(96, seed=4)
    with_channel = seg(window_hu(hu)[..., None])
    assert with_channel.shape == (96, 96) and _dice(with_channel, lungs) > 0.9
    with pytest.raises(ValueError):
        seg(np.zeros((2, 32, 32), np.float32))


def test_interface_and_config() -> None:
    seg = AutoLungMask()
    assert isinstance(seg, LungSegmenter)
    config = seg.get_config()
    json.dumps(config)  # recordable in manifests
    assert config["method"] == "auto-classical"
    params = {k: v for k, v in config.items() if k != "method"}
    assert AutoLungMask(**params).get_config() == config
    assert AutoLungMask(close_radius=0.05).get_config()["close_radius"] == 0.05


def test_lung_bbox() -> None:
    mask = np.zeros((20, 30), bool)
    assert lung_bbox(mask) is None
    mask[3:7, 10:12] = True
    mask[15, 25] = True
    assert lung_bbox(mask) == (3, 16, 10, 26)
    y0, y1, x0, x1 = lung_bbox(mask)
    assert mask[y0:y1, x0:x1].sum() == mask.sum()
    assert lung_bbox(np.ones((5, 6), np.uint8)) == (0, 5, 0, 6)


def _zenodo_sample() -> list[str]:
    """~20 slices: 3 from the middle part of each of 7 patients."""
    with open(ZENODO / "patients.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_patient: dict[str, list[str]] = {}
    for row in rows:
        by_patient.setdefault(row["patient"], []).append(row["file"])
    files = []
    for patient in sorted(by_patient)[::2]:
        names = by_patient[patient]
        files += [names[int(q * (len(names) - 1))] for q in (0.3, 0.5, 0.7)]
    return files


@pytest.mark.realdata
@pytest.mark.skipif(not ZENODO.is_dir(), reason=f"real data not present: {ZENODO}")
def test_real_slices_against_radiologist_masks() -> None:
    seg = AutoLungMask()
    dices = []
    for name in _zenodo_sample():
        image = cv2.imread(str(ZENODO / "images" / name), cv2.IMREAD_GRAYSCALE)
        truth = cv2.imread(str(ZENODO / "lungs" / name), cv2.IMREAD_GRAYSCALE) > 127
        assert image is not None and truth is not None, name
        dices.append(_dice(seg(image.astype(np.float32) / 255.0), truth))
    assert len(dices) >= 18
    assert np.mean(dices) > 0.85, dices
