"""Weak-to-strong consistency (models/consistency.py) and the informative stitch likelihood:
the pieces against NumPy, which pixels take part, the EMA teacher, and one training step of a
baseline and of StitchNet with the term on."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from stitchnet_tf import likelihood as lik
from stitchnet_tf.models.baselines import SegNet, UNet
from stitchnet_tf.models.consistency import (
    RUNNING_MOMENTUM,
    Consistency,
    align_distribution,
    class_quantiles,
    masked_cross_entropy,
    rampup,
    strong_intensity,
)
from stitchnet_tf.models.optimizers import FusedAdam
from stitchnet_tf.models.stitchnet import StitchNet, ordered_logits


def _batch(n_labelled=2, n_unlabelled=2, size=32, seed=0):
    """x, allowed, lung: labelled slices (healthy with a GGO corner) then unlabelled ones (every
    lesion class allowed inside the lung field, which is all but a 4-pixel border)."""
    rng = np.random.default_rng(seed)
    n = n_labelled + n_unlabelled
    lung = np.zeros((n, size, size, 1), "float32")
    lung[:, 4:-4, 4:-4] = 1
    x = rng.uniform(0.05, 0.9, (n, size, size, 1)).astype("float32") * lung
    allowed = np.zeros((n, size, size, 4), "float32")
    allowed[..., 0] = 1 - lung[..., 0]
    allowed[:n_labelled, ..., 1] = lung[:n_labelled, ..., 0]
    allowed[:n_labelled, 4:12, 4:12, 1], allowed[:n_labelled, 4:12, 4:12, 2] = 0, 1
    allowed[n_labelled:, ..., 1:] = lung[n_labelled:]
    return {"x": x, "allowed": allowed, "lung": lung}


def test_rampup_and_masked_cross_entropy_match_numpy():
    assert float(rampup(0, 0)) == 1.0
    np.testing.assert_allclose(float(rampup(25, 100)), np.exp(-5 * 0.75**2), rtol=1e-6)
    assert float(rampup(500, 100)) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    target = rng.integers(0, 3, (2, 5, 5))
    weight = (rng.random((2, 5, 5)) > 0.5).astype("float32")
    region = np.maximum(weight, (rng.random((2, 5, 5)) > 0.3).astype("float32"))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_p, target[..., None], -1)[..., 0]
    expected = (ce * weight).sum() / region.sum()
    got = masked_cross_entropy(logits, tf.constant(target, tf.int32), weight, region)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_strong_view_stays_in_the_lung_field_and_is_seeded():
    data = _batch()
    x, lung = data["x"], data["lung"]
    a = strong_intensity(x, lung, tf.constant([1, 2])).numpy()
    b = strong_intensity(x, lung, tf.constant([1, 2])).numpy()
    c = strong_intensity(x, lung, tf.constant([3, 4])).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, x)
    assert a.min() >= 0 and a.max() <= 1 and np.all(a[lung == 0] == 0)


def test_the_texture_view_keeps_each_pixels_attenuation():
    """`texture` (no brightness, contrast or gamma): a flat lung field keeps its level up to
    the noise, where `intensity` moves it; a wrong name is refused."""
    lung = np.zeros((8, 32, 32, 1), "float32")
    lung[:, 4:-4, 4:-4] = 1
    x = 0.4 * lung
    inside = lung[..., 0] > 0

    def levels(attenuation):
        v = strong_intensity(x, lung, tf.constant([5, 6]), attenuation=attenuation).numpy()
        return np.array([np.median(v[i][inside[i]]) for i in range(len(v))])

    np.testing.assert_allclose(levels(False), 0.4, atol=0.01)
    assert np.abs(levels(True) - 0.4).max() > 0.05
    with pytest.raises(ValueError, match="strong view"):
        Consistency(_tiny(), weight=1.0, strong="colour")


def _tiny(classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((None, None, 1)), keras.layers.Conv2D(classes, 3, padding="same")]
    )


def test_only_unknown_lung_pixels_take_part_and_the_threshold_filters():
    net = _tiny()
    term = Consistency(net, weight=2.0, threshold=0.0, seed=0)
    probs = lambda x, keep=None: tf.nn.softmax(net(x))  # noqa: E731
    labelled_only = _batch(n_unlabelled=0)
    value, confident = term.loss(labelled_only, 0, probs, net)
    assert float(value) == 0.0 and float(confident) == 0.0  # nothing unknown: no term
    value, confident = term.loss(_batch(), 0, probs, net)
    assert float(value) > 0 and float(confident) == pytest.approx(1.0)
    strict = Consistency(net, weight=2.0, threshold=0.999, seed=0)
    uniform = lambda x, keep=None: tf.ones(tf.concat([tf.shape(x)[:3], [3]], 0)) / 3.0  # noqa: E731
    value, confident = strict.loss(_batch(), 0, uniform, net)
    assert float(value) == 0.0 and float(confident) == 0.0  # no teacher pixel is confident
    # the term is the weight x the ramp x the cross-entropy: ramp 0.0067 at step 0 of 100
    ramped = Consistency(net, weight=2.0, threshold=0.0, rampup_steps=100, seed=0)
    value, _ = ramped.loss(
        _batch(), 0, uniform, lambda x: tf.zeros(tf.concat([tf.shape(x)[:3], [3]], 0))
    )
    np.testing.assert_allclose(float(value), 2.0 * np.exp(-5.0) * np.log(3.0), rtol=1e-5)


def test_the_ema_teacher_averages_the_student_and_is_what_the_scope_computes_with():
    net = _tiny()
    term = Consistency(net, weight=1.0, teacher="ema", decay=0.9, seed=0)
    assert len(term.teacher_weights) == len(net.trainable_variables)
    student = [v.numpy() for v in net.trainable_variables]
    term.update_teacher(1)  # the first step copies the student
    for t, s in zip(term.teacher_weights, student, strict=True):
        np.testing.assert_array_equal(t.numpy(), s)
    for v in net.trainable_variables:
        v.assign(v + 1.0)
    term.update_teacher(2)
    for t, s in zip(term.teacher_weights, student, strict=True):
        np.testing.assert_allclose(t.numpy(), 0.9 * s + 0.1 * (s + 1.0), atol=1e-6)
    x = _batch()["x"]
    with term.teacher_scope():
        in_scope = net(x).numpy()
    kernel, bias = (t.numpy() for t in term.teacher_weights)
    expected = tf.nn.conv2d(x, kernel, 1, "SAME").numpy() + bias
    np.testing.assert_allclose(in_scope, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(net(x).numpy(), in_scope)  # outside the scope: the student


def test_a_baseline_trains_with_the_term_and_round_trips(tmp_path):
    data = _batch(size=32)
    model = SegNet(
        width=0.125,
        seed=0,
        consistency_weight=1.0,
        consistency_threshold=0.3,
        teacher="ema",
        consistency_strong="texture",
    )
    model.compile(optimizer=FusedAdam(1e-3))
    history = model.fit(tf.data.Dataset.from_tensors(data).repeat(2), epochs=1, verbose=0).history
    assert history["consistency"][-1] > 0 and 0 < history["confident"][-1] <= 1
    model.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert back.consistency.config() == model.consistency.config()
    assert back.consistency.strong == "texture"
    for a, b in zip(
        back.consistency.teacher_weights, model.consistency.teacher_weights, strict=True
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(
        back.predict(data["x"], verbose=0), model.predict(data["x"], verbose=0), atol=1e-6
    )
    # UniMatch's feature perturbation: the U-Net's decoder on dropped-out encoder features
    unet = UNet(width=0.125, alpha=0.35, seed=0)
    plain, perturbed = unet(data["x"], training=True), unet.perturbed_logits(data["x"])
    assert perturbed.shape == plain.shape and not np.allclose(perturbed, plain)


def test_stitchnet_informative_likelihood_and_consistency_term():
    raw = tf.random.normal((3, 4, 4, 4), seed=1) * 2
    logits = ordered_logits(raw).numpy()
    assert np.all(np.diff(logits[..., 1:], axis=-1) > 0)  # healthy < GGO < consolidation
    model = StitchNet(
        width=0.125,
        backbone_alpha=0.35,
        seed=0,
        style_mode="image",
        ordered_styles=True,
        consistency_weight=1.0,
        consistency_threshold=0.0,
    )
    data = _batch(size=32)
    out = model(data["x"], training=False)
    style = (out["alpha"] / (out["alpha"] + out["beta"])).numpy()
    np.testing.assert_allclose(
        style, style[:, :1, :1, :] * np.ones_like(style), rtol=1e-6
    )  # one per image
    # with flat pi the posterior follows the intensity: dark -> healthy, bright -> consolidation
    x = np.array([0.15, 0.4, 0.75], "float32").reshape(1, 1, 3, 1)
    a, b = out["alpha"][:1, :1, :3], out["beta"][:1, :1, :3]
    r = lik.responsibilities(
        x, tf.zeros_like(a), a, b, tf.constant([0.0, 1, 1, 1]) + tf.zeros_like(a)
    )
    assert list(np.argmax(r.numpy()[0, 0], -1)) == [1, 2, 3]
    model.compile(optimizer=FusedAdam(1e-3))
    value, confident = model.consistency_term(data, model(data["x"], training=True))
    assert np.isfinite(float(value)) and float(value) > 0 and float(confident) == pytest.approx(1.0)


def test_consistency_without_unlabelled_slices_is_refused_before_reading():
    from stitchnet_tf.errors import DataError
    from stitchnet_tf.training import TrainConfig, check_config

    base = dict(labelled="lab", output="out", model="unet", size=64)
    on = {"consistency_weight": 1.0}
    with pytest.raises(DataError, match="--consistency needs unlabelled slices"):
        check_config(TrainConfig(**base, model_options=on))
    with pytest.raises(DataError, match="--consistency needs unlabelled slices"):
        check_config(TrainConfig(**base, unlabelled="u", unlabelled_per_batch=0, model_options=on))
    check_config(TrainConfig(**base, unlabelled="u", model_options=on))
    check_config(TrainConfig(**base, max_labelled=2, model_options=on))


def test_a_baseline_as_its_own_teacher_reuses_the_steps_forward():
    """teacher="self": the pseudo-labels come from the batch's forward handed to the term
    (confident where those logits are), not from a second pass of the model."""
    data = _batch(size=32)
    model = SegNet(width=0.125, seed=0, consistency_weight=1.0, consistency_threshold=0.9)
    model.compile(optimizer=FusedAdam(1e-3))
    shape = (*data["x"].shape[:3], 3)
    sure = tf.constant(np.eye(3, dtype="float32")[np.ones(shape[:3], int)] * 50.0)
    unsure = tf.zeros(shape)
    _, confident = model.consistency_term(data, sure)
    assert float(confident) == pytest.approx(1.0)
    _, confident = model.consistency_term(data, unsure)
    assert float(confident) == 0.0


def test_the_cli_hands_every_consistency_option_to_the_model():
    """`cli.options.consistency_options` gives the command a dict with every key of
    `CONSISTENCY_DEFAULTS` (the model arguments), the strong view included; a wrong view is a
    usage error."""
    import click
    from click.testing import CliRunner

    from stitchnet_tf.options import CONSISTENCY_DEFAULTS
    from stitchnet_tf_cli.options import consistency_options

    @click.command()
    @consistency_options
    def show(consistency):
        click.echo(json.dumps(consistency))

    runner = CliRunner()
    got = json.loads(
        runner.invoke(show, ["--consistency", "1", "--consistency-strong", "texture"]).output
    )
    assert got == CONSISTENCY_DEFAULTS | {
        "consistency_weight": 1.0,
        "consistency_strong": "texture",
    }
    bad = runner.invoke(show, ["--consistency-strong", "colour"])
    assert bad.exit_code == 2 and "colour" in bad.output


def test_distribution_alignment_matches_numpy_and_learns_the_class_shares(tmp_path):
    """`align_distribution` against NumPy; a U-Net with `consistency_align` moves its running
    labelled class shares from uniform towards the batch's known pixels (healthy with a GGO
    corner: no CON) and saves them."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet([1, 1, 1], (2, 4, 4)).astype("float32")
    target, predicted = np.array([0.7, 0.2, 0.1]), np.array([0.9, 0.05, 0.05])
    expected = probs * target / predicted
    expected /= expected.sum(-1, keepdims=True)
    got = align_distribution(
        tf.constant(probs), tf.constant(target, tf.float32), tf.constant(predicted, tf.float32)
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)

    data = _batch(size=32)
    model = UNet(width=0.125, alpha=0.35, seed=0, consistency_weight=1.0, consistency_align=True)
    model.compile(optimizer=FusedAdam(1e-3))
    model.fit(tf.data.Dataset.from_tensors(data).repeat(1), epochs=1, verbose=0)
    labelled, teacher = (v.numpy() for v in model.consistency.class_means)
    known = data["allowed"][:2, 4:-4, 4:-4, 1:].reshape(-1, 3).sum(0)  # healthy, GGO, CON
    m = RUNNING_MOMENTUM
    np.testing.assert_allclose(labelled, m / 3 + (1 - m) * known / known.sum(), rtol=1e-5)
    assert np.isclose(teacher.sum(), 1.0, atol=1e-5) and not np.allclose(teacher, 1 / 3)
    model.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert back.consistency.align and back.consistency.config() == model.consistency.config()
    for a, b in zip(back.consistency.class_means, model.consistency.class_means, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_class_balanced_thresholds_keep_a_share_of_every_class(tmp_path):
    """`class_quantiles` against NumPy's lower quantile (an empty class gives 1); with
    `consistency_balance` the running per-class thresholds move from `threshold` towards each
    class's quantile, an absent class keeps its value, a pixel's threshold is its class's but
    never above `threshold`; one training step and a save/load keep them."""
    rng = np.random.default_rng(2)
    confidence = rng.uniform(0.34, 1.0, (2, 8, 8)).astype("float32")
    target = rng.integers(0, 2, (2, 8, 8)).astype("int32")  # no CON
    region = (rng.uniform(size=(2, 8, 8)) < 0.7).astype("float32")
    quantiles, counts = class_quantiles(
        tf.constant(confidence), tf.constant(target), tf.constant(region), 0.3, 3
    )
    for c in range(2):
        values = confidence[(target == c) & (region > 0)]
        assert counts[c] == values.size
        assert np.isclose(quantiles[c], np.quantile(values, 0.7, method="lower"))
    assert counts[2] == 0 and quantiles[2] == 1.0

    model = UNet(width=0.125, alpha=0.35, seed=0, consistency_weight=1.0, consistency_balance=0.3)
    c = model.consistency
    np.testing.assert_allclose(c.class_thresholds.numpy(), 0.95)
    c.class_thresholds.assign([0.99, 0.95, 0.5])
    got = c.thresholds(tf.constant(confidence), tf.constant(target), tf.constant(region))
    m = RUNNING_MOMENTUM
    running = np.array([m * 0.99 + (1 - m) * quantiles[0], m * 0.95 + (1 - m) * quantiles[1], 0.5])
    np.testing.assert_allclose(c.class_thresholds.numpy(), running, rtol=1e-6)
    np.testing.assert_allclose(got.numpy(), np.minimum(running, 0.95)[target], rtol=1e-6)
    with pytest.raises(ValueError, match="class balance"):
        UNet(width=0.125, alpha=0.35, consistency_weight=1.0, consistency_balance=1.5)

    model = UNet(width=0.125, alpha=0.35, seed=0, consistency_weight=1.0, consistency_balance=0.5)
    model.compile(optimizer=FusedAdam(1e-3))
    model.fit(tf.data.Dataset.from_tensors(_batch(size=32)).repeat(1), epochs=1, verbose=0)
    moved = model.consistency.class_thresholds.numpy()
    assert not np.allclose(moved, 0.95)
    model.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert back.consistency.config() == model.consistency.config()
    np.testing.assert_array_equal(back.consistency.class_thresholds.numpy(), moved)
