"""The supervised baselines: U-Net (MobileNetV2 encoder) and SegNet (argmax unpooling).

Tiny widths and 64×64 slices; the few training steps run eagerly (tracing a graph would cost
tens of seconds), and the trained models are shared by the save/load and inference tests.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import lesion_batch

from stitchnet_tf.data.classes import (
    ALL,
    CON,
    GGO,
    LESION,
    LUNG,
    NO_LESION,
    allowed_to_onehot,
    bits,
)
from stitchnet_tf.models.baselines import (
    UNET_BOTTOM,
    UNET_SKIPS,
    MaxPoolWithArgmax,
    MaxUnpool,
    SegNet,
    UNet,
)

MODELS = {
    "unet": lambda **kw: UNet(width=0.125, alpha=0.35, seed=0, **kw),
    "segnet": lambda **kw: SegNet(width=0.125, seed=0, **kw),
}


@pytest.fixture(scope="module")
def batch():
    return lesion_batch()


@pytest.fixture(scope="module")
def trained(batch):
    """Each tiny baseline after 5 eager Adam steps on two slices, with per-step losses."""
    x, allowed = batch
    data = tf.data.Dataset.from_tensors({"x": x[:2], "allowed": allowed[:2]}).repeat()
    out = {}
    for name, make in MODELS.items():
        model = make()
        model.compile(optimizer=keras.optimizers.Adam(3e-3), run_eagerly=True)
        history = model.fit(data, epochs=5, steps_per_epoch=1, shuffle=False, verbose=0).history
        out[name] = model, history
    return out


# --------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes(name):
    model = MODELS[name]()
    for h, w in ((64, 64), (64, 96)):
        logits = model(np.random.rand(2, h, w, 1).astype("float32"))
        assert tuple(logits.shape) == (2, h, w, 3) and logits.dtype == "float32"


def test_unet_encoder_is_keras_mobilenetv2():
    model = UNet(width=0.125, alpha=0.35)
    reference = keras.applications.MobileNetV2(
        input_shape=(None, None, 1), include_top=False, weights=None, alpha=0.35
    )
    names = [layer.name for layer in reference.layers]
    kept = names[: names.index(UNET_BOTTOM) + 1]
    encoder = model.encoder
    assert [layer.name for layer in encoder.layers[1:]] == kept[1:]  # [0]: the input layer
    for layer in encoder.layers[1:]:
        ref = reference.get_layer(layer.name)
        assert type(layer) is type(ref)
        assert [tuple(v.shape) for v in layer.weights] == [tuple(v.shape) for v in ref.weights]
    for out, n in zip(encoder.outputs, (*UNET_SKIPS, UNET_BOTTOM), strict=True):
        assert out is encoder.get_layer(n).output
    features = encoder(np.zeros((1, 64, 64, 1), "float32"))
    assert [tuple(f.shape[1:3]) for f in features] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert model.get_layer("to_unit_range").get_config()["scale"] == 2.0


def test_segnet_has_vgg16_encoder_and_mirrored_decoder():
    model = SegNet(width=0.125)
    encoder = [block.layers[0] for stage in model.encoder_convs for block in stage]
    assert len(encoder) == 13 and all(c.kernel_size == (3, 3) for c in encoder)
    assert [c.filters for c in encoder] == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    convs = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 26
    assert model.decoder_convs[0][-1].filters == 3  # the classifier
    assert len(model.pools) == len(model.unpools) == 5


def test_unpooling_restores_each_max_at_its_argmax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 6, 3)).astype("float32")
    pooled, argmax = MaxPoolWithArgmax(2)(x)
    out = MaxUnpool(2)([pooled, argmax]).numpy()
    windows = x.reshape(2, 2, 2, 3, 2, 3).transpose(0, 1, 3, 5, 2, 4).reshape(2, 2, 3, 3, 4)
    np.testing.assert_array_equal(pooled, windows.max(-1))
    is_max = windows == windows.max(-1, keepdims=True)
    expected = np.where(is_max, windows, 0.0)
    expected = expected.reshape(2, 2, 3, 3, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(x.shape)
    np.testing.assert_array_equal(out, expected)
    assert (out != 0).sum() == pooled.numpy().size
    for layer in (MaxPoolWithArgmax(2), MaxUnpool(2)):
        assert type(layer).from_config(layer.get_config()).pool_size == 2


# --------------------------------------------------------------------------- loss


def _reference_loss(logits, sets4, gamma):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    sets3 = np.stack([np.maximum(sets4[..., 0], sets4[..., 1]), sets4[..., 2], sets4[..., 3]], -1)
    p_set = (p * sets3).sum(-1)
    return (-((1.0 - p_set) ** gamma) * np.log(p_set)).mean()


@pytest.mark.parametrize("loss, gamma", [("focal", 2.0), ("ce", 0.0)])
def test_set_loss_equals_numpy(loss, gamma):
    model = SegNet(width=0.125, loss=loss)
    assert model.gamma == gamma
    rng = np.random.default_rng(1)
    # exact (each class), partial {GGO, CON} and {background, healthy}, unlabelled (two kinds)
    sets = [bits(k) for k in range(4)] + [LESION, NO_LESION, LUNG, ALL]
    allowed = allowed_to_onehot(np.array(sets, np.uint8).reshape(1, 2, 4))
    logits = rng.normal(scale=2.0, size=(1, 2, 4, 3)).astype("float32")
    got = float(model.compute_set_loss(allowed, logits))
    np.testing.assert_allclose(got, _reference_loss(logits, allowed, gamma), rtol=1e-5)
    # unlabelled pixels contribute exactly 0
    unlabelled = allowed_to_onehot(np.full((1, 2, 4), LUNG, np.uint8))
    assert float(model.compute_set_loss(unlabelled, logits)) == 0.0
    labelled = allowed.copy()
    labelled[0, 1, 2:] = unlabelled[0, 1, 2:]  # two exact pixels become unlabelled
    keep = np.ones((1, 2, 4), bool)
    keep[0, 1, 2:] = False
    per_pixel_sum = _reference_loss(logits[keep], labelled[keep], gamma) * keep.sum()
    np.testing.assert_allclose(
        float(model.compute_set_loss(labelled, logits)), per_pixel_sum / keep.size, rtol=1e-5
    )
    with pytest.raises(ValueError):
        SegNet(width=0.125, loss="dice")


def _reference_ce_dice(logits, sets4, smooth=1.0):
    """Set CE over labelled pixels + 1 − mean batch soft Dice of GGO and CON (set-aware)."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    sets3 = np.stack([np.maximum(sets4[..., 0], sets4[..., 1]), sets4[..., 2], sets4[..., 3]], -1)
    labelled = sets3.sum(-1) < 3
    ce = -np.log((p * sets3).sum(-1))[labelled].sum() / max(labelled.sum(), 1)
    # "GGO or CON" pixels (LESION): the union's term joins, classes no pixel names drop out
    ambiguous = ((sets3[..., 1] + sets3[..., 2]) == 2) & (sets3[..., 0] == 0)
    dices = []
    for group in ((1,), (2,), (1, 2)):
        n_in = sets3[..., list(group)].sum(-1)
        truth = (n_in > 0) & (sets3.sum(-1) == n_in)
        scored = truth | (n_in == 0)
        if (len(group) == 1 and ambiguous.any() and not truth.any()) or (
            len(group) == 2 and not ambiguous.any()
        ):
            continue
        pg = p[..., list(group)].sum(-1) * scored
        dices.append((2 * (pg * truth).sum() + smooth) / (pg.sum() + truth.sum() + smooth))
    return ce + (labelled.any()) * (1 - np.mean(dices))


def test_ce_dice_loss_equals_numpy():
    model = SegNet(width=0.125)
    assert model.loss_type == "ce_dice"  # the recipe's default
    rng = np.random.default_rng(2)
    sets = [bits(k) for k in range(4)] + [LESION, NO_LESION, LUNG, ALL]
    allowed = allowed_to_onehot(np.array(sets * 3, np.uint8).reshape(2, 3, 4))
    logits = rng.normal(scale=2.0, size=(2, 3, 4, 3)).astype("float32")
    got = float(model.compute_set_loss(allowed, logits))
    np.testing.assert_allclose(got, _reference_ce_dice(logits, allowed), rtol=1e-5)
    exact = allowed_to_onehot(np.array([bits(k) for k in range(4)] * 6, np.uint8).reshape(2, 3, 4))
    np.testing.assert_allclose(  # every pixel names its class: no union term
        float(model.compute_set_loss(exact, logits)), _reference_ce_dice(logits, exact), rtol=1e-5
    )
    unlabelled = allowed_to_onehot(np.full((2, 3, 4), LUNG, np.uint8))
    assert float(model.compute_set_loss(unlabelled, logits)) == 0.0


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", MODELS)
def test_training_steps_reduce_the_loss(trained, name):
    _, history = trained[name]
    losses = history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert {"dice_ggo", "dice_con"} <= set(history)
    assert all(0.0 <= v <= 1.0 for k in ("dice_ggo", "dice_con") for v in history[k])


def test_a_step_with_non_finite_gradients_is_skipped(batch):
    """One bad batch (NaN in x) leaves the weights as they were and the logged loss finite; the
    step counts as skipped and the next good batch trains."""
    x, allowed = batch
    bad = np.array(x[:2])
    bad[0, 0, 0, 0] = np.nan
    model = MODELS["unet"]()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), run_eagerly=True)
    before = [np.array(w) for w in model.trainable_weights]

    def step(x):
        data = tf.data.Dataset.from_tensors({"x": x, "allowed": allowed[:2]})
        return {k: v[-1] for k, v in model.fit(data, epochs=1, verbose=0).history.items()}

    logs = step(bad)
    assert logs["skipped"] == 1.0 and np.isfinite(logs["loss"])
    after = [np.array(w) for w in model.trainable_weights]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    logs = step(x[:2])
    assert logs["skipped"] == 0.0 and logs["loss"] > 0
    moved = [np.array(w) for w in model.trainable_weights]
    assert not all(np.array_equal(a, b) for a, b in zip(after, moved, strict=True))


def test_same_seed_same_weights():
    a, b = MODELS["unet"](), MODELS["unet"]()
    assert all(np.array_equal(u, v) for u, v in zip(a.weights, b.weights, strict=True))


@pytest.mark.parametrize("name", MODELS)
def test_keras_save_and_safe_mode_load_agree(trained, batch, tmp_path, name):
    model, _ = trained[name]
    x, _ = batch
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert type(loaded) is type(model) and loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(model(x, training=False), loaded(x, training=False))


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("name", MODELS)
def test_segment_follows_the_lung_field(trained, batch, name):
    model, _ = trained[name]
    x, _ = batch
    lung = (x > 0).astype("float32")
    for seg in (model.segment(x), model.segment(x, lung=lung)):
        probs = seg["probabilities"].numpy()
        assert probs.shape == (4, 64, 64, 4) and seg["labels"].shape == (4, 64, 64)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
        outside, inside = lung[..., 0] == 0, lung[..., 0] == 1
        assert (probs[outside][:, 0] == 1.0).all() and (probs[inside][:, 0] == 0.0).all()
        assert (probs[outside][:, [GGO, CON]] == 0.0).all()
        labels = seg["labels"].numpy()
        assert (labels[outside] == 0).all() and (labels[inside] > 0).all()
        assert float(tf.reduce_min(seg["entropy"])) >= 0.0
