"""Tests for the learned lung-field segmenter (`stitchnet_tf.data.lung_unet`)."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from stitchnet_tf.data.intensity import window_hu
from stitchnet_tf.data.lung_unet import (
    DEFAULT_MODEL,
    LearnedLungMask,
    build_lung_unet,
    default_segmenter,
)
from stitchnet_tf.data.lungmask import LungSegmenter
from stitchnet_tf.data.synthetic import synth_patient
from stitchnet_tf.errors import DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ZENODO = DATA / "zenodo20-lungs"
MODEL_INFO = DEFAULT_MODEL.with_suffix(".json")


@pytest.fixture(scope="module")
def seg() -> LearnedLungMask:
    assert DEFAULT_MODEL.is_file(), f"the shipped model {DEFAULT_MODEL} is missing"
    return LearnedLungMask(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def slices() -> list[np.ndarray]:
    """Six synthetic lung-window slices [128, 128] in [0, 1]."""
    return [window_hu(s.hu) for s in synth_patient(5, 6, size=128)]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def test_interface_and_config(seg: LearnedLungMask) -> None:
    assert isinstance(seg, LungSegmenter)
    cfg = seg.get_config()
    assert cfg["method"] == "learned-unet"
    assert cfg["model"] == DEFAULT_MODEL.name
    assert cfg["size"] == seg.size and cfg["threshold"] == 0.5


@pytest.mark.parametrize("shape", [(64, 64), (200, 150), (512, 512), (32, 40)])
def test_mask_shape_and_dtype(seg: LearnedLungMask, slices, shape) -> None:
    h, w = shape
    image = cv2.resize(slices[3], (w, h), interpolation=cv2.INTER_AREA)
    mask = seg(image)
    assert mask.shape == shape and mask.dtype == bool
    assert mask.any()
    assert seg(image[..., None]).shape == shape  # [H, W, 1] accepted too


def test_constant_image_is_empty(seg: LearnedLungMask) -> None:
    for value in (0.0, 0.4, 1.0):
        mask = seg(np.full((90, 120), value, np.float32))
        assert mask.shape == (90, 120) and mask.dtype == bool and not mask.any()


def test_bad_shape_rejected(seg: LearnedLungMask) -> None:
    with pytest.raises(ValueError):
        seg(np.zeros((2, 64, 64), np.float32))


def test_predict_batch_matches_call(seg: LearnedLungMask, slices) -> None:
    images = [slices[0], cv2.resize(slices[1], (150, 200)), np.zeros((50, 50), np.float32)]
    batch = seg.predict_batch(images)
    for image, mask in zip(images, batch, strict=True):
        assert mask.shape == image.shape
        assert _dice(mask, seg(image)) > 0.99 or not (mask.any() or seg(image).any())


def test_finds_synthetic_lungs(seg: LearnedLungMask) -> None:
    s = synth_patient(77, 3, size=160)[1]
    assert _dice(seg(window_hu(s.hu)), s.lung) > 0.8


def test_default_segmenter(tmp_path: Path) -> None:
    d = default_segmenter()
    assert isinstance(d, LearnedLungMask)
    assert default_segmenter() is d  # loaded once per process
    # a missing or broken lung model is an error naming it, never a silent classical fallback
    with pytest.raises(DataError, match="missing.keras.*not found"):
        default_segmenter(path=tmp_path / "missing.keras")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a keras file")
    with pytest.raises(DataError, match="broken.keras.*cannot load"):
        default_segmenter(path=broken)


def test_environment_names_another_lung_model(tmp_path: Path, monkeypatch) -> None:
    from stitchnet_tf.data.lung_unet import LUNG_MODEL_ENV
    from stitchnet_tf.errors import DataError

    copy = tmp_path / "mine.keras"
    copy.write_bytes(DEFAULT_MODEL.read_bytes())
    monkeypatch.setenv(LUNG_MODEL_ENV, str(copy))
    chosen = default_segmenter()
    assert isinstance(chosen, LearnedLungMask) and chosen.path == copy.resolve()
    monkeypatch.setenv(LUNG_MODEL_ENV, str(tmp_path / "missing.keras"))
    with pytest.raises(DataError, match="missing.keras.*not found"):
        default_segmenter()


def test_saved_model_is_plain_keras() -> None:
    import keras

    net = keras.models.load_model(DEFAULT_MODEL, safe_mode=True, compile=False)
    assert net.count_params() < 500_000
    assert DEFAULT_MODEL.stat().st_size < 4_000_000
    assert net.count_params() == build_lung_unet(net.input_shape[1]).count_params()


def test_thread_safe(seg: LearnedLungMask, slices) -> None:
    images = [cv2.resize(s, (100 + 20 * i, 120)) for i, s in enumerate(slices)]
    sequential = [seg(im) for im in images]
    results: dict[int, list[np.ndarray]] = {}
    barrier = threading.Barrier(2)

    def work(k: int) -> None:
        barrier.wait()
        results[k] = [seg(im) for im in (images if k == 0 else images[::-1])]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(results) == {0, 1}
    for a, b in zip(results[0], sequential, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(results[1], sequential[::-1], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.realdata
@pytest.mark.skipif(not ZENODO.is_dir(), reason=f"real data not available ({ZENODO})")
def test_dice_on_held_out_patient(seg: LearnedLungMask) -> None:
    info = json.loads(MODEL_INFO.read_text())
    test_patients = info["split"]["patients"]["test"]
    assert not set(test_patients) & set(info["split"]["patients"]["train"])
    with open(ZENODO / "patients.csv", newline="", encoding="utf-8") as f:
        rows = [r["file"] for r in csv.DictReader(f) if r["patient"] == test_patients[0]]
    chosen = [rows[i] for i in np.linspace(0, len(rows) - 1, 10).round().astype(int)]
    inter = total = 0
    for name in chosen:
        image = cv2.imread(str(ZENODO / "images" / name), cv2.IMREAD_GRAYSCALE) / 255.0
        truth = cv2.imread(str(ZENODO / "lungs" / name), cv2.IMREAD_GRAYSCALE) > 127
        mask = seg(image.astype(np.float32))
        inter += np.count_nonzero(mask & truth)
        total += np.count_nonzero(mask) + np.count_nonzero(truth)
    assert 2.0 * inter / total > 0.9


MEDSEG = DATA / "medseg-covid" / "labelled"


@pytest.mark.realdata
@pytest.mark.skipif(not MEDSEG.is_dir(), reason=f"real data not available ({MEDSEG})")
def test_lung_field_keeps_the_lesions(seg: LearnedLungMask) -> None:
    """Lesions are lung: the shipped model leaves at most 7% of MedSeg's consolidation pixels
    (5.0% when it was trained; 14.2% before it saw MedSeg lesions) and 2% of its GGO outside."""
    from stitchnet_tf.data.io import read_image, read_mask

    outside = {1: 0, 2: 0}
    total = {1: 0, 2: 0}
    for image in sorted((MEDSEG / "images").glob("*.jpg")):
        y = read_mask(MEDSEG / "masks" / f"{image.stem}.png")
        field = seg(read_image(image))
        for c in (1, 2):
            outside[c] += int(np.count_nonzero((y == c) & ~field))
            total[c] += int(np.count_nonzero(y == c))
    assert outside[1] / total[1] < 0.02 and outside[2] / total[2] < 0.07
