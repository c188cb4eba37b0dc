"""The reference U-Net benchmark's pieces: model shape, loss, augmentation, label mapping."""

import importlib.util
from pathlib import Path

import numpy as np

from stitchnet_tf.data.classes import BACKGROUND, CON, GGO, HEALTHY, NO_LESION, bits

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_unet.py"
spec = importlib.util.spec_from_file_location("reference_unet", PATH)
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)


def test_unet_shape_and_loss():
    model = ref.build_unet(32, width=2)
    x = np.random.default_rng(0).random((2, 32, 32, 1), np.float32)
    p = np.asarray(model(x, training=False))
    assert p.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    y = np.eye(3, dtype=np.float32)[np.zeros((2, 32, 32), int)]
    perfect = float(ref.ce_dice_loss(y, np.clip(y, 1e-7, 1.0)))
    assert 0.0 <= perfect < 1e-3  # no lesion anywhere, none predicted: Dice 1 by smoothing
    assert float(ref.ce_dice_loss(y, p)) > perfect


def test_batches_flip_and_crop_keep_labels_aligned():
    image = np.zeros((50, 40), np.float32)
    image[10:20, 5:15] = 1.0
    label = (image > 0).astype(np.uint8) * 2
    x, y = next(ref.batches([image], [label], 32, 4, np.random.default_rng(0)))
    assert x.shape == (4, 32, 32, 1) and y.shape == (4, 32, 32, 3)
    mismatch = (y[..., 2] > 0) != (x[..., 0] > 0.5)
    assert mismatch.mean() < 0.02  # only edge pixels differ (area vs nearest resizing)


def test_lesion_index_and_four_class_labels():
    allowed = np.array([[NO_LESION, bits(GGO)], [bits(CON), NO_LESION]], np.uint8)
    np.testing.assert_array_equal(ref.lesion_index(allowed), [[0, 1], [2, 0]])
    probs = np.zeros((2, 2, 3), np.float32)
    probs[..., 0] = 1.0
    probs[0, 0] = [0.1, 0.8, 0.1]  # GGO everywhere near the top left after upsampling
    lung = np.ones((4, 4), bool)
    lung[3] = False
    labels = ref.to_four_class(probs, (4, 4), lung)
    assert labels.shape == (4, 4)
    assert labels[0, 0] == GGO and labels[2, 3] == HEALTHY
    assert (labels[3] == BACKGROUND).all()
