"""The contract every segmentation model shares (`models.base`): one output dict, one meaning of
`lung=None`, one refusal of `samples`/`decision` by deterministic models, `SetDice`, and that the
unlabelled part of a batch trains StitchNet but gives the baselines no gradient at all."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import lesion_batch

from stitchnet_tf.data.classes import BACKGROUND, CON, GGO, HEALTHY
from stitchnet_tf.errors import DataError
from stitchnet_tf.models.base import (
    ENTROPY_FLOOR,
    SetDice,
    calibrate_lesion,
    segmentation_output,
)
from stitchnet_tf.models.baselines import SegNet, UNet
from stitchnet_tf.models.stitchnet import StitchNet
from stitchnet_tf.models.threshold import ThresholdRule

TINY_STITCHNET = dict(width=0.25, backbone_alpha=0.35, seed=0)


@pytest.fixture(scope="module")
def batch():
    return lesion_batch(64, 2)


@pytest.fixture(scope="module")
def models():
    return {
        "stitchnet": StitchNet(**TINY_STITCHNET),
        "unet": UNet(width=0.125, alpha=0.35, seed=0),
        "segnet": SegNet(width=0.125, seed=0),
        "threshold": ThresholdRule(0.3, 0.6),
    }


def test_segmentation_output_by_hand():
    probs = np.array([[[0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 1.0, 0.0]]], np.float32)
    out = segmentation_output(probs)
    assert out["labels"].dtype == tf.int32
    assert out["labels"].numpy().tolist() == [[0, 2]]
    expected = -(0.7 * np.log(0.7) + 3 * 0.1 * np.log(0.1))
    np.testing.assert_allclose(out["entropy"].numpy(), [[expected, 0.0]], rtol=1e-6)


def test_entropy_floor_keeps_float16_finite():
    """The float16 NaN: log(max(p, 1e-12)) is log 0 = -inf in float16, and 0 · -inf = NaN."""
    probs = tf.constant([[1.0, 0.0, 0.0, 0.0]], tf.float16)
    assert np.float16(ENTROPY_FLOOR) > 0  # a normal float16 number
    entropy = segmentation_output(probs)["entropy"]
    assert np.isfinite(entropy.numpy()).all() and float(entropy[0]) == 0.0
    naive = -tf.reduce_sum(probs * tf.math.log(tf.maximum(probs, 1e-12)), -1)
    assert not np.isfinite(naive.numpy()).all()  # what the floor guards against


@pytest.mark.parametrize("name", ["stitchnet", "unet", "segnet", "threshold"])
def test_lung_none_means_x_above_zero_for_every_model(models, batch, name):
    x, _ = batch
    model = models[name]
    field = (x > 0).astype("float32")
    default, explicit = model.segment(x), model.segment(x, lung=field)
    for key in ("probabilities", "labels", "entropy"):
        np.testing.assert_allclose(np.asarray(default[key]), np.asarray(explicit[key]), atol=1e-6)
    labels = np.asarray(default["labels"])
    assert labels.dtype == np.int32
    assert (labels[field[..., 0] == 0] == BACKGROUND).all()
    assert (labels[field[..., 0] == 1] != BACKGROUND).all()
    probs = np.asarray(default["probabilities"])
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["unet", "segnet", "threshold"])
def test_deterministic_models_refuse_samples_and_decision(models, batch, name):
    x, _ = batch
    for kwargs in ({"samples": 2}, {"decision": "posterior"}):
        with pytest.raises(DataError, match="StitchNet only"):
            models[name].segment(x, **kwargs)


def test_stitchnet_samples_and_decisions_share_the_contract(models, batch):
    x, _ = batch
    model = models["stitchnet"]
    for out in (model.segment(x, samples=2), model.segment(x, decision="posterior")):
        assert set(out) == {"probabilities", "labels", "entropy"}
        assert out["labels"].dtype == tf.int32
        assert (out["labels"].numpy()[x[..., 0] == 0] == BACKGROUND).all()


def test_a_changed_decision_rule_is_followed(models, batch):
    """Training may switch `model.decision` (chosen on the val slices) after `segment` traced."""
    x, _ = batch
    model = models["stitchnet"]
    saved, bias = model.decision, model.head.style_mean.bias.numpy()
    model.head.style_mean.bias.assign([0.0, -2.0, 0.0, 2.0])  # styles differ: the rules differ
    try:
        model.decision = "prior"
        prior = model.segment(x)["probabilities"].numpy()
        model.decision = "posterior"
        now = model.segment(x)["probabilities"].numpy()
        posterior = model.segment(x, decision="posterior")["probabilities"].numpy()
    finally:
        model.decision = saved
        model.head.style_mean.bias.assign(bias)
    np.testing.assert_allclose(now, posterior, atol=1e-6)
    assert not np.allclose(now, prior, atol=1e-4)


def test_calibrate_lesion_equals_a_numpy_reference():
    p = np.random.default_rng(0).dirichlet(np.ones(4), size=(2, 5)).astype(np.float32)
    assert calibrate_lesion(p, 0.0) is p
    for b in (1.0, -1.5):
        expected = p * np.array([1.0, 1.0, np.exp(b), np.exp(b)])
        expected /= expected.sum(-1, keepdims=True)
        np.testing.assert_allclose(calibrate_lesion(p, b).numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["stitchnet", "unet", "segnet"])
def test_a_lesion_offset_moves_the_lesion_extent_and_is_saved(models, batch, name, tmp_path):
    """`lesion_offset` (chosen on val by `train --decision auto`) calibrates `segment`, also
    after tracing, and travels in the saved model."""
    x, _ = batch
    model = models[name]
    base = model.segment(x)["probabilities"].numpy()
    try:
        model.lesion_offset = 3.0
        shifted = model.segment(x)
        path = tmp_path / "model.keras"
        model.save(path)
    finally:
        model.lesion_offset = 0.0
    probs = shifted["probabilities"].numpy()
    np.testing.assert_allclose(probs, calibrate_lesion(base, 3.0).numpy(), atol=1e-5)
    lesion = np.isin(shifted["labels"].numpy(), (GGO, CON)).mean()
    assert lesion > np.isin(base.argmax(-1), (GGO, CON)).mean()
    np.testing.assert_allclose(model.segment(x)["probabilities"].numpy(), base, atol=1e-6)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.lesion_offset == 3.0 and loaded.get_config()["lesion_offset"] == 3.0
    np.testing.assert_allclose(loaded.segment(x)["probabilities"].numpy(), probs, atol=1e-5)


def test_set_dice_by_hand():
    """Positive: the set lies inside the classes; negative: disjoint; mixed sets are ignored."""
    allowed = np.zeros((1, 1, 6, 4), np.float32)
    allowed[0, 0, 0, GGO] = 1  # GGO, predicted GGO: TP
    allowed[0, 0, 1, GGO] = 1  # GGO, predicted healthy: FN
    allowed[0, 0, 2, HEALTHY] = 1  # healthy, predicted GGO: FP
    allowed[0, 0, 3, [GGO, CON]] = 1  # GGO or CON: ignored for GGO alone
    allowed[0, 0, 4, :] = 1  # unlabelled: ignored
    allowed[0, 0, 5, CON] = 1  # CON, predicted CON: a TN for GGO
    predicted = np.array([[[GGO, HEALTHY, GGO, GGO, GGO, CON]]])
    ggo = SetDice(GGO)
    ggo.update_state(allowed, predicted)
    assert float(ggo.result()) == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    lesion = SetDice((GGO, CON), name="dice_lesion")
    lesion.update_state(allowed, predicted)
    # GGO-or-CON now counts: TP at 0, 3, 5; FN at 1; FP at 2; pixel 4 still ignored
    assert float(lesion.result()) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    ggo.update_state(allowed, np.full_like(predicted, HEALTHY))  # accumulates over batches
    assert float(ggo.result()) == pytest.approx(2 * 1 / (2 * 1 + 1 + 3))
    assert SetDice(CON).name == "dice_con" and lesion.name == "dice_lesion"


def _unlabelled(allowed: np.ndarray) -> np.ndarray:
    """Every lung pixel's set becomes all four classes; known background stays {background}."""
    out = allowed.copy()
    lung = ~((allowed[..., BACKGROUND] == 1) & (allowed.sum(-1) == 1))
    out[lung] = 1.0
    return out


def test_unlabelled_slices_train_stitchnet_through_the_likelihood(batch):
    """With the supervised term off, a step on unlabelled slices (lung pixels may be any class)
    still moves StitchNet's head and most other weights: the marginal likelihood trains."""
    keras.utils.set_random_seed(0)
    x, allowed = batch
    model = StitchNet(**TINY_STITCHNET, supervised_weight=0.0)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    before = [v.numpy().copy() for v in model.trainable_variables]
    data = {"x": tf.constant(x), "allowed": tf.constant(_unlabelled(allowed))}
    for _ in range(2):  # the zero-initialised last layers of (b) pass gradient from step 2 on
        model.train_step(data)
    after = model.trainable_variables
    moved = [not np.array_equal(b, v.numpy()) for b, v in zip(before, after, strict=True)]
    head = [
        m
        for m, v in zip(moved, after, strict=True)
        if v.path.startswith("stitch_head") and "pi_z" not in v.path  # p(y | z): weight 0
    ]
    assert head and all(head)
    assert sum(moved) > 0.9 * len(moved)


def test_unlabelled_pixels_give_the_baselines_no_gradient(batch):
    x, allowed = batch
    model = UNet(width=0.125, alpha=0.35, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    before = [v.numpy().copy() for v in model.trainable_variables]
    logs = model.train_step({"x": tf.constant(x), "allowed": tf.ones_like(allowed)})
    assert float(logs["loss"]) == 0.0
    after = model.trainable_variables
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, after, strict=True))
