"""Prediction measures what users get: the lung field comes from the image alone (no label leak)
and class probabilities are mapped back to the slice before the argmax."""

from __future__ import annotations

import cv2
import numpy as np

from stitchnet_tf.data.classes import ALL, BACKGROUND, CON, GGO, HEALTHY, MaskValueMap, bits
from stitchnet_tf.data.preprocess import Geometry, RawSlice, prepare
from stitchnet_tf.inference import (
    Predictor,
    flip_average,
    labels_to_original,
    probabilities_to_original,
)
from stitchnet_tf.metrics import Table1

N = 64
LUNG = np.zeros((N, N), bool)
LUNG[2:62, 2:62] = True  # crop box = the whole slice: model size 64 is the identity geometry


class AllGGO:
    """A model calling every lung-field pixel GGO (background outside the field)."""

    def segment(self, x, lung=None, samples=0, decision=None) -> dict:
        field = np.asarray(lung)[..., 0] > 0.5
        labels = np.where(field, GGO, BACKGROUND)
        probs = np.eye(4, dtype=np.float32)[labels]
        return {"probabilities": probs, "labels": labels, "entropy": np.zeros(labels.shape)}


def leaky_slice() -> tuple[RawSlice, np.ndarray]:
    """A slice with a GGO lesion inside the lung field and one outside it (rows 0-1)."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0.1, 0.9, (N, N)).astype(np.float32)
    lesion = np.zeros((N, N), np.uint8)
    lesion[20:30, 20:30] = 1  # GGO inside the lung
    lesion[0:2, 30:40] = 1  # GGO outside the segmenter's lung field
    allowed = MaskValueMap.parse("medseg").to_allowed(lesion)
    return RawSlice(image, allowed, None), lesion


def test_prepare_without_labels_takes_the_field_from_the_image_only():
    raw, lesion = leaky_slice()
    leaky = prepare(raw, N, lambda image: LUNG)
    clean = prepare(raw, N, lambda image: LUNG, use_labels=False)
    assert leaky.field[0:2, 30:40].all()  # training: the label widens the field
    np.testing.assert_array_equal(clean.field, LUNG)
    assert clean.geometry == Geometry.from_field(LUNG, N)
    assert not clean.lung[0:2].any() and (clean.x[0:2] == 0).all()
    # the label is still carried (for scoring), but shapes nothing else
    assert (clean.allowed[0:2, 30:40] == bits(GGO)).all()


def test_a_lesion_outside_the_segmenters_field_is_predicted_background_and_missed():
    raw, lesion = leaky_slice()
    predictor = Predictor(AllGGO(), N, segmenter=lambda image: LUNG)
    (pred,) = predictor.predict([raw])
    assert pred.labels.shape == (N, N) and pred.labels.dtype == np.uint8
    np.testing.assert_array_equal(pred.field, LUNG)
    assert (pred.labels[0:2, 30:40] == BACKGROUND).all()
    assert (pred.labels[~LUNG] == BACKGROUND).all() and (pred.labels[LUNG] == GGO).all()
    table = Table1()
    table.add("s", pred.labels, raw.allowed)
    row = next(r for r in table.per_image_rows() if r["class"] == "ggo")
    tp, fp, fn = row["tp"], row["fp"], row["fn"]
    assert (tp, fn) == (100, 20)  # the 20 lesion pixels outside the field are misses
    assert fp == LUNG.sum() - 100
    assert row["f1"] == 2 * tp / (2 * tp + fp + fn)


def test_probabilities_are_mapped_back_before_the_argmax():
    geometry = Geometry((8, 8), (0, 8, 0, 8), (0, 0), 8, 4)
    probs = np.zeros((4, 4, 4), np.float32)
    probs[:, :2] = [0.0, 0.45, 0.55, 0.0]  # GGO on the left, 0.45 healthy
    probs[:, 2:] = [0.0, 0.45, 0.0, 0.55]  # CON on the right, 0.45 healthy
    labels = labels_to_original(probs, geometry)
    expected = np.argmax(cv2.resize(probs, (8, 8), interpolation=cv2.INTER_LINEAR), -1)
    np.testing.assert_array_equal(labels, expected)
    # where GGO and CON blend, healthy wins: an argmax at model size never says healthy
    assert (labels[:, 3:5] == HEALTHY).all()
    assert (labels[:, :3] == GGO).all() and (labels[:, 5:] == CON).all()
    nearest = geometry.to_original(np.argmax(probs, -1).astype(np.uint8), "nearest")
    assert HEALTHY not in nearest


def test_outside_the_crop_box_is_background_and_the_field_restricts_the_labels():
    geometry = Geometry((10, 12), (2, 8, 3, 9), (0, 0), 6, 32)
    probs = np.zeros((32, 32, 4), np.float32)
    probs[..., GGO] = 0.7
    probs[..., BACKGROUND] = 0.3
    full = probabilities_to_original(probs, geometry)
    assert full.shape == (10, 12, 4)
    np.testing.assert_allclose(full[0, 0], [1, 0, 0, 0])
    np.testing.assert_allclose(full[4, 5], [0.3, 0, 0.7, 0], atol=1e-6)
    field = np.zeros((10, 12), bool)
    field[3:6, 4:7] = True
    labels = labels_to_original(probs, geometry, field)
    assert (labels[field] == GGO).all() and (labels[~field] == BACKGROUND).all()
    # inside the field a lung class is chosen even where background is the most probable
    probs[..., GGO], probs[..., BACKGROUND], probs[..., HEALTHY] = 0.2, 0.5, 0.3
    assert (labels_to_original(probs, geometry, field)[field] == HEALTHY).all()


class LeftBiased:
    """A model that is not flip-equivariant: GGO probability grows from left to right."""

    def segment(self, x, lung=None, samples=0, decision=None) -> dict:
        b, h, w, _ = np.shape(x)
        ramp = np.broadcast_to(np.linspace(0.0, 1.0, w, dtype=np.float32), (b, h, w))
        probs = np.stack([np.zeros_like(ramp), 1 - ramp, ramp, np.zeros_like(ramp)], -1)
        return {"probabilities": probs, "labels": probs.argmax(-1), "entropy": 0 * ramp}


def test_tta_averages_the_four_flips():
    x = np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype(np.float32)
    out = flip_average(LeftBiased().segment, x, np.ones_like(x))
    # the ramp and its mirror average to 0.5 everywhere; vertical flips change nothing
    np.testing.assert_allclose(out["probabilities"][..., 1:3], 0.5, atol=1e-6)
    np.testing.assert_allclose(out["entropy"], np.log(2), atol=1e-4)
    # a flip-equivariant model (AllGGO) is unchanged by TTA
    lung = (x > 0.3).astype(np.float32)
    same = flip_average(AllGGO().segment, x, lung)
    np.testing.assert_array_equal(same["labels"], AllGGO().segment(x, lung)["labels"])
    image = np.pad(x[0, ..., 0], 28, constant_values=0.5)  # 64 x 64, lung field LUNG
    raw = prepare(RawSlice(image, np.full((N, N), ALL, np.uint8), LUNG), N, None)
    plain = Predictor(LeftBiased(), N).predict_prepared([raw])[0]
    tta = Predictor(LeftBiased(), N, tta=True).predict_prepared([raw])[0]
    assert not np.allclose(plain.probabilities, tta.probabilities)
    inside = raw.lung > 0.5
    np.testing.assert_allclose(tta.probabilities[..., 2][inside], 0.5, atol=1e-6)
