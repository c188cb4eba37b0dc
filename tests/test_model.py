"""The SVAE ladder and StitchNet: Table 2 shapes, shared weights, merge, KL, training, saving.

Tracing a StitchNet train step takes about a minute on a 2-core CPU, so the tests share one
small trained model (module-scoped fixture) and compile as few configurations as possible.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import lesion_batch

from stitchnet_tf.models.backbone import Backbone
from stitchnet_tf.models.ladder import SVAELadder, precision_weighted_merge
from stitchnet_tf.models.layers import BOTTLENECK_ABOVE, Conv, LatentParams, Norm
from stitchnet_tf.models.optimizers import FusedAdam
from stitchnet_tf.models.stitchnet import StitchNet

TINY = dict(width=0.25, backbone_alpha=0.35, seed=0)
#: the `trained` fixture also trains the z-only p(y | z) that `generate` then uses
GENERATIVE = dict(TINY, generative_weight=1.0)
TABLE2 = {  # level: (z shape, d shape) at 352 x 352
    1: ((176, 176, 1), (176, 176, 32)),
    2: ((88, 88, 1), (88, 88, 64)),
    3: ((44, 44, 1), (44, 44, 128)),
    4: ((22, 22, 1), (22, 22, 256)),
    5: ((11, 11, 1), (11, 11, 512)),
}


def lesion_dice(model, x, allowed, training=True):
    """Dice of GGO-or-consolidation over the exactly labelled pixels, z at the posterior mean."""
    out = model.forward(x, training=training, sample=False)
    pred = np.argmax(model.class_probabilities(x, out), -1) >= 2
    truth = allowed[..., 2:].sum(-1) == allowed.sum(-1)
    return 2 * (pred & truth).sum() / (pred.sum() + truth.sum())


@pytest.fixture(scope="module")
def batch():
    return lesion_batch()


@pytest.fixture(scope="module")
def trained(batch):
    """A tiny StitchNet trained on one synthetic batch, with its loss history."""
    keras.utils.set_random_seed(0)
    x, allowed = batch
    model = StitchNet(**GENERATIVE)
    model.compile(optimizer=FusedAdam(3e-3))
    data = tf.data.Dataset.from_tensors({"x": x, "allowed": allowed}).repeat()
    history = model.fit(data, epochs=5, steps_per_epoch=20, verbose=0)
    return model, history.history


# --------------------------------------------------------------------------- shapes


def test_the_seed_fixes_the_initial_weights_whatever_drew_before():
    """`--seed` reproduces a run only if the initial weights follow it alone (Keras draws an
    unseeded initialiser's seed from Python's `random`, which pipelines and cached models use).
    """
    import random

    def weights(seed):
        return [w.numpy() for w in StitchNet(**TINY | {"seed": seed}).weights]

    a = weights(0)
    random.seed(123)  # another state of the global RNG, as after other objects were built
    b = weights(0)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(np.array_equal(u, v) for u, v in zip(a, weights(1), strict=True))


def test_table2_shapes():
    backbone = Backbone(width=1.0, alpha=0.35)
    ladder = SVAELadder(backbone.filters)
    for size in (352, 96):  # Table 2 at 352, scaled at another multiple of 32
        ds = backbone(np.zeros((1, size, size, 1), "float32"))
        out = ladder(ds, training=False)
        scale = size / 352
        for level, (z_shape, d_shape) in TABLE2.items():
            side = round(z_shape[0] * scale)
            assert tuple(ds[level - 1].shape[1:]) == (side, side, d_shape[2])
            assert tuple(out["z"][level - 1].shape[1:]) == (side, side, 1)
        assert tuple(out["features"].shape[1:]) == (size // 2, size // 2, 32)
        assert tuple(out["kl"].shape) == (1, 5)


@pytest.mark.slow
def test_any_multiple_of_32_and_heads():
    model = StitchNet(**TINY)
    out = model(np.random.rand(2, 64, 96, 1).astype("float32"))
    for k in ("pi_logits", "alpha", "beta"):
        assert tuple(out[k].shape) == (2, 64, 96, 4) and out[k].dtype == "float32"
    assert float(tf.reduce_min(out["alpha"])) > 0 and float(tf.reduce_min(out["beta"])) > 0
    assert tuple(out["kl"].shape) == (2, 5)


def test_bottleneck_above_64_filters():
    wide, narrow = Conv(128), Conv(64)
    assert tuple(wide(np.zeros((1, 8, 8, 128), "float32")).shape) == (1, 8, 8, 128)
    narrow(np.zeros((1, 8, 8, 64), "float32"))
    assert wide.bottleneck and not narrow.bottleneck and BOTTLENECK_ABOVE == 64
    kernels = [tuple(w.shape) for w in wide.trainable_weights if len(w.shape) == 4]
    assert kernels == [(1, 1, 128, 32), (3, 3, 32, 32), (1, 1, 32, 128)]


# --------------------------------------------------------------------------- sharing


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_ladder_symbolic_outputs_match_a_real_call(policy):
    """The ladder builds its blocks eagerly and states its output shapes instead of Keras
    tracing it: the stated shapes and dtypes must be those of a real call."""
    filters = (8, 8, 16, 16, 32)
    ladder = SVAELadder(filters, dtype=policy)
    ds = [tf.zeros((2, 32 // 2**i, 48 // 2**i, f)) for i, f in enumerate(filters)]
    real = ladder(ds, training=False)
    symbolic = ladder([keras.KerasTensor((None, None, None, f)) for f in filters])
    keras.tree.assert_same_structure(real, symbolic)
    for r, s in zip(keras.tree.flatten(real), keras.tree.flatten(symbolic), strict=True):
        assert r.shape[-1] == s.shape[-1] and r.dtype == s.dtype
    assert len(ladder.weights) > 100  # every block was built by the eager pass


def test_mapping_b_is_shared_by_inference_and_prior():
    model = StitchNet(**TINY)
    x = np.random.rand(2, 64, 64, 1).astype("float32")
    model(x)
    ladder = model.ladder
    # exactly one (b) per level, and the model holds each of its variables once
    bs = [layer for layer in ladder._flatten_layers() if isinstance(layer, LatentParams)]
    assert len(bs) == 5 and bs == ladder.latent_params
    all_ids = [id(v) for v in model.trainable_variables]
    assert len(all_ids) == len(set(all_ids))
    ds = model.backbone(x, training=True)
    for i in range(4):  # levels 1-4 have both a prior from d̃_i and an inference estimate
        b = ladder.latent_params[i]
        z_above = tf.random.normal((2, 64 // 2 ** (i + 2), 64 // 2 ** (i + 2), 1))
        with tf.GradientTape(persistent=True) as tape:
            d_tilde = ladder.top_down[i](ladder.to_features[i + 1](z_above))
            prior_mu, prior_sigma = b(d_tilde)
            q_mu, q_sigma = b(ds[i])
            prior_loss = tf.reduce_sum(prior_mu**2) + tf.reduce_sum(prior_sigma)
            q_loss = tf.reduce_sum(q_mu**2) + tf.reduce_sum(q_sigma)
        for loss in (prior_loss, q_loss):
            grads = tape.gradient(loss, b.trainable_variables)
            assert all(g is not None for g in grads)
            assert sum(float(tf.reduce_sum(tf.abs(g))) for g in grads) > 0
        assert prior_mu.shape == q_mu.shape == (2, *ds[i].shape[1:3], 1)
    # and the full loss reaches every (b) variable through both paths
    allowed = np.ones((2, 64, 64, 4), "float32")
    with tf.GradientTape() as tape:
        terms = model.compute_terms(x, allowed, model(x, training=True))
    grads = tape.gradient(terms["loss"], [v for b in bs for v in b.trainable_variables])
    assert all(g is not None for g in grads)


# --------------------------------------------------------------------------- math


def test_precision_weighted_merge_equals_numpy():
    rng = np.random.default_rng(0)
    mu_q, mu_p = rng.normal(size=(2, 3, 3, 1)), rng.normal(size=(2, 3, 3, 1))
    s_q, s_p = rng.uniform(0.1, 2, (2, 3, 3, 1)), rng.uniform(0.1, 2, (2, 3, 3, 1))
    mu, sigma = precision_weighted_merge(
        *(tf.constant(a, tf.float32) for a in (mu_q, s_q, mu_p, s_p))
    )
    var = 1 / (1 / s_q**2 + 1 / s_p**2)
    np.testing.assert_allclose(mu, (mu_q / s_q**2 + mu_p / s_p**2) * var, rtol=1e-5)
    np.testing.assert_allclose(sigma, np.sqrt(var), rtol=1e-5)


def test_analytic_kl_equals_mean_of_mc_estimates():
    rng = np.random.default_rng(1)
    shape = (1, 4, 4, 1)
    mu_q, mu_p = rng.normal(size=shape), rng.normal(size=shape)
    s_q, s_p = rng.uniform(0.3, 1.5, shape), rng.uniform(0.3, 1.5, shape)
    args = [tf.constant(a, tf.float32) for a in (mu_q, s_q, mu_p, s_p)]
    analytic = SVAELadder(kl="analytic")._kl(None, *args)
    mc = SVAELadder(kl="mc")
    n = 20000
    z = args[0] + args[1] * tf.random.normal((n, 4, 4, 1), seed=1)
    estimates = mc._kl(z, *(tf.repeat(a, n, axis=0) for a in args))
    se = float(tf.math.reduce_std(estimates)) / np.sqrt(n)
    assert abs(float(tf.reduce_mean(estimates)) - float(analytic[0])) < 4 * se


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_overfits_one_batch(trained, batch):
    model, history = trained
    losses = history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert (
        sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= len(losses) - 2
    )  # falls steadily
    x, allowed = batch
    assert lesion_dice(model, x, allowed) > 0.9
    for name in ("recon", "kl", "supervised", "kl_1", "kl_5", "dice_ggo", "dice_con"):
        assert name in history


@pytest.mark.slow
def test_keras_save_and_safe_mode_load_agree(trained, batch, tmp_path):
    model, _ = trained
    x, _ = batch
    path = tmp_path / "stitchnet.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded, StitchNet) and loaded.get_config() == model.get_config()
    a, b = model(x, training=False), loaded(x, training=False)
    for k in ("pi_logits", "alpha", "beta", "kl"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inference_outputs(trained, batch):
    model, _ = trained
    x, _ = batch
    seg = model.segment(x)
    assert tuple(seg["probabilities"].shape) == (4, 64, 64, 4)
    np.testing.assert_allclose(tf.reduce_sum(seg["probabilities"], -1), 1, atol=1e-5)
    again = model.segment(x)
    np.testing.assert_array_equal(seg["labels"], again["labels"])  # posterior mean: repeatable
    sampled = model.segment(x, samples=3)
    assert float(tf.reduce_max(sampled["entropy"])) > 0
    lung = (x > 0).astype("float32")
    masked = model.segment(x, lung=lung)["labels"].numpy()
    assert (masked[lung[..., 0] == 0] == 0).all() and (masked[lung[..., 0] == 1] > 0).all()
    prior = model.segment(x, decision="prior")["probabilities"]
    # graph (traced) vs eager arithmetic; lung=None is the field x > 0, as for every model
    eager = model.class_probabilities(x, model(x), lung, "prior")
    np.testing.assert_allclose(prior, eager, atol=1e-4)
    inside = lung[..., 0] == 1
    softmax = tf.nn.softmax(model(x)["pi_logits"]).numpy()[..., 1:]
    np.testing.assert_allclose(  # inside the field: softmax over the three lung classes
        np.asarray(prior)[inside][:, 1:],
        (softmax / softmax.sum(-1, keepdims=True))[inside],
        atol=1e-4,
    )
    styles = model.styles(x)
    assert tuple(styles["styles"].shape) == (4, 64, 64, 4)
    assert tuple(styles["stitched"].shape) == (4, 64, 64, 1)
    gen = model.generate(2, 64)
    assert tuple(gen["x"].shape) == (2, 64, 64, 1) and tuple(gen["labels"].shape) == (2, 64, 64)
    assert 0 <= float(tf.reduce_min(gen["x"])) and float(tf.reduce_max(gen["x"])) <= 1
    # generation takes its labels from the z-only p(y | z), trained on the batch's label sets:
    # decoding the posterior mean of a training slice with it redraws that slice's lung field
    ds = model.backbone(x, training=False)
    features = model.ladder(ds, training=False, sample=False, kl=False)["features"]
    labels = np.argmax(model.head.generate(features)["pi_logits"], -1)
    field = (x[..., 0] > 0).astype(bool)
    agree = ((labels > 0) == field).mean()
    assert agree > 0.9, agree
    # by default p(y | z) is not trained and generation goes through a blank-image draft
    plain = StitchNet(**TINY).generate(1, 32)
    assert tuple(plain["labels"].shape) == (1, 32, 32)


@pytest.mark.slow
def test_mixed_bfloat16_training_step_is_finite(batch):
    x, allowed = batch
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = StitchNet(**TINY)
        assert model.backbone.compute_dtype == "bfloat16"
        # run_eagerly: the same train_step without the minute-long graph trace
        model.compile(optimizer=FusedAdam(1e-3), run_eagerly=True)
        data = tf.data.Dataset.from_tensors({"x": x[:2], "allowed": allowed[:2]}).repeat()
        history = model.fit(data, epochs=1, steps_per_epoch=2, verbose=0).history
        out = model(x[:2])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(np.isfinite(v[-1]) for v in history.values())
    assert out["alpha"].dtype == "float32" and out["pi_logits"].dtype == "float32"
    assert np.isfinite(out["pi_logits"].numpy()).all()


@pytest.mark.slow
def test_authors_objective_and_options():
    model = StitchNet.authors(**TINY)
    assert model.likelihood == "jensen" and model.supervised_weight == 100.0
    assert model.kl == "mc" and model.focal_gamma == 2.0
    x, allowed = lesion_batch(size=32, n=1)
    terms = model.compute_terms(x, allowed, model(x, training=True))
    assert all(np.isfinite(float(v)) for k, v in terms.items() if k != "kl_levels")
    free = StitchNet(**TINY, free_bits=0.5)
    t = free.compute_terms(x, allowed, free(x, training=False))
    # level 1 holds 16x16 latent pixels: free bits floor its KL at 0.5 nats each, per pixel of x
    assert float(t["kl_levels"][0]) >= 0.5 * 16 * 16 / (32 * 32) - 1e-6
    with pytest.raises(ValueError):
        StitchNet(**TINY, likelihood="bogus")


def test_backbone_loads_imagenet_style_weights_on_three_channels(tmp_path):
    import keras as k

    reference = k.applications.MobileNetV2(
        input_shape=(None, None, 3), include_top=False, weights=None, alpha=0.35
    )
    path = tmp_path / "mobilenet_v2.weights.h5"
    reference.save_weights(path)
    backbone = Backbone(width=0.25, alpha=0.35, weights=str(path))
    assert backbone.rgb and backbone.get_config()["rgb"] is True
    first = backbone.mobilenet.get_layer("Conv1").kernel
    assert tuple(first.shape) == (3, 3, 3, 16)
    np.testing.assert_array_equal(first, reference.get_layer("Conv1").kernel)
    ds = backbone(np.random.rand(1, 64, 64, 1).astype("float32"))
    assert [tuple(d.shape[1:3]) for d in ds] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]


def test_mixed_precision_policy_follows_the_device():
    from stitchnet_tf.precision import mixed_policy_name, set_precision

    assert mixed_policy_name() == (
        "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    )
    try:
        assert set_precision(True) == mixed_policy_name()
        assert keras.mixed_precision.global_policy().name == mixed_policy_name()
    finally:
        assert set_precision(False) == "float32"


@pytest.mark.slow
def test_batchnorm_recalibration_makes_inference_match_training(trained, batch):
    from stitchnet_tf.models.base import recalibrate_batchnorm

    model, _ = trained
    x, allowed = batch
    data = tf.data.Dataset.from_tensors({"x": x, "allowed": allowed}).repeat()
    assert recalibrate_batchnorm(model, data, steps=30) == 30
    # training-mode Dice is > 0.9 (test_overfits_one_batch); before re-estimation the
    # inference-mode Dice of such a model was 0.02-0.17 in our runs
    assert lesion_dice(model, x, allowed, training=False) > 0.7


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_norm_group_path_is_bit_identical_to_keras_group_normalization(policy):
    """`Norm("group")` computes Keras' GroupNormalization itself (fewer graph ops): outputs and
    gradients, traced and eager, equal Keras' own call bit for bit (as `Norm` called it before);
    unknown sizes use Keras' call."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        norm = Norm("group")
        norm.build((None, 8, 8, 24))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(0)
    norm.inner.gamma.assign(rng.normal(1, 0.5, 24))
    norm.inner.beta.assign(rng.normal(0, 0.5, 24))
    x = tf.constant(rng.normal(2, 3, (3, 8, 8, 24)), tf.float32)

    def both(x):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            # Norm casts its input to the policy's dtype, GroupNormalization alone does not
            ours, theirs = norm(x), norm.inner(tf.cast(x, norm.compute_dtype))
            pull = tf.constant(rng.normal(size=(3, 8, 8, 24)), ours.dtype)
            loss_ours, loss_theirs = tf.reduce_sum(ours * pull), tf.reduce_sum(theirs * pull)
        weights = [norm.inner.gamma.value, norm.inner.beta.value]
        return (
            (ours, *tape.gradient(loss_ours, [x, *weights])),
            (theirs, *tape.gradient(loss_theirs, [x, *weights])),
        )

    for ours, theirs in (both(x), tf.function(both)(x)):
        assert ours[0].dtype == theirs[0].dtype == norm.compute_dtype
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    spec = tf.TensorSpec([None, None, None, 24])
    graph = tf.function(norm).get_concrete_function(spec).graph
    assert any(op.type == "Shape" for op in graph.get_operations())  # Keras' dynamic shapes


@pytest.mark.slow
def test_group_norm_default_has_no_batchnorm_in_the_ladder(trained):
    model, _ = trained
    assert model.norm == "group"
    inner = model.ladder._flatten_layers() + model.head._flatten_layers()
    assert not any(isinstance(la, keras.layers.BatchNormalization) for la in inner)
    assert any(isinstance(la, keras.layers.GroupNormalization) for la in inner)
    assert StitchNet.from_config(model.get_config()).get_config()["norm"] == "group"


@pytest.mark.slow
def test_inference_mode_matches_training_mode_after_training(trained, batch):
    """The shared mapping (b) normalises each use on its own (GroupNorm): inference-mode KL and
    π equal training-mode ones (z at the posterior mean in both), level by level."""
    model, _ = trained
    x, _ = batch
    train_mode = model.forward(x, training=True, sample=False)
    infer_mode = model.forward(x, training=False, sample=False)
    kl_train = np.asarray(train_mode["kl"]).mean(0)
    kl_infer = np.asarray(infer_mode["kl"]).mean(0)
    for level, (a, b) in enumerate(zip(kl_train, kl_infer, strict=True), 1):
        if max(a, b) > 1e-3:
            assert 1 / 1.5 <= a / b <= 1.5, (level, a, b)
    p_train = tf.nn.softmax(train_mode["pi_logits"]).numpy()
    p_infer = tf.nn.softmax(infer_mode["pi_logits"]).numpy()
    assert np.abs(p_train - p_infer).mean() < 0.05


def test_initial_kl_is_small_and_gradients_are_balanced(batch):
    """Zero-initialised (b) outputs: q̂ = prior at initialisation, so the KL starts at the
    merge's 0.097 nats per latent pixel; no block's gradient dwarfs the head's."""
    x, allowed = batch
    keras.utils.set_random_seed(0)
    model = StitchNet(**TINY)
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = model.compute_terms(x, allowed, out)["loss"]
    grads = tape.gradient(loss, model.trainable_variables)
    latent_pixels = sum((64 // 2**i) ** 2 for i in range(1, 6))
    kl = float(np.asarray(out["kl"]).sum(1).mean())
    assert kl <= 0.1 * latent_pixels
    blocks: dict[str, list] = {}
    for v, g in zip(model.trainable_variables, grads, strict=True):
        if g is not None:
            blocks.setdefault(model._variable_block(v.path), []).append(g)
    norms = {k: float(tf.linalg.global_norm(v)) for k, v in blocks.items()}
    assert set(norms) == {"backbone", "head", *(f"level_{i}" for i in range(1, 6))}
    assert max(norms.values()) <= 100 * norms["head"]


@pytest.mark.slow
def test_compute_terms_equals_a_hand_computation(trained):
    """recon, supervised and KL in nats per lung pixel, computed again with NumPy/SciPy."""
    from scipy import special, stats

    model, _ = trained
    rng = np.random.default_rng(0)
    b, h, k = 2, 32, 4
    x = rng.uniform(0.05, 0.95, (b, h, h, 1)).astype("float32")
    allowed = np.zeros((b, h, h, k), "float32")
    classes = rng.integers(0, 4, (b, h, h))
    allowed[np.arange(b)[:, None, None], np.arange(h)[None, :, None], np.arange(h), classes] = 1
    allowed[1, :8] = 1  # unlabelled rows
    out = {
        "pi_logits": rng.normal(size=(b, h, h, k)).astype("float32"),
        "alpha": rng.uniform(1, 5, (b, h, h, k)).astype("float32"),
        "beta": rng.uniform(1, 5, (b, h, h, k)).astype("float32"),
        "kl": rng.uniform(0, 10, (b, 5)).astype("float32"),
    }
    terms = model.compute_terms(x, allowed, out)
    log_pi = special.log_softmax(out["pi_logits"], -1)
    log_beta = stats.beta.logpdf(x, out["alpha"], out["beta"])
    joint = np.where(allowed > 0, log_pi + log_beta, -np.inf)
    ll = special.logsumexp(joint, -1)
    lung = ~((allowed[..., 0] == 1) & (allowed.sum(-1) == 1))
    np.testing.assert_allclose(float(terms["recon"]), -ll[lung].mean(), rtol=1e-4)
    np.testing.assert_allclose(float(terms["kl"]), out["kl"].sum() / lung.sum(), rtol=1e-4)
    labelled = allowed.sum(-1) < 4
    log_p_set = special.logsumexp(np.where(allowed > 0, log_pi, -np.inf), -1)
    ce = -log_p_set[labelled].mean()
    p = special.softmax(out["pi_logits"], -1)
    dice = []
    for c in (2, 3):
        truth = (allowed[..., c] == 1) & (allowed.sum(-1) == 1)
        scored = truth | (allowed[..., c] == 0)
        inter, pred = (p[..., c] * truth).sum(), (p[..., c] * scored).sum()
        dice.append((2 * inter + 1) / (pred + truth.sum() + 1))
    np.testing.assert_allclose(float(terms["supervised"]), ce + 1 - np.mean(dice), rtol=1e-4)
    total = float(terms["recon"]) + float(terms["kl"]) + float(terms["supervised"])
    np.testing.assert_allclose(float(terms["loss"]), total, rtol=1e-5)
    # the z-only p(y | z) of a skip head: −log p(y ∈ A | z) over every pixel, per lung pixel
    out["pi_z_logits"] = rng.normal(size=(b, h, h, k)).astype("float32")
    terms = model.compute_terms(x, allowed, out)
    log_pz = special.log_softmax(out["pi_z_logits"], -1)
    generative = -special.logsumexp(np.where(allowed > 0, log_pz, -np.inf), -1).sum()
    np.testing.assert_allclose(float(terms["generative"]), generative / lung.sum(), rtol=1e-4)
    total += model.generative_weight * float(terms["generative"])
    np.testing.assert_allclose(float(terms["loss"]), total, rtol=1e-5)


def test_global_norm_clipping_and_gradient_monitor():
    from stitchnet_tf.models.gradients import GradientMonitor, clip_gradients, skip_non_finite

    grads = [tf.constant([3.0, 4.0]), None, tf.constant([12.0])]
    monitor = GradientMonitor(["a", "b"])
    out = clip_gradients(grads, None, None, None, 6.5, monitor=monitor, blocks=["a", "b", "b"])
    assert out[1] is None
    np.testing.assert_allclose(out[0], [1.5, 2.0], rtol=1e-6)  # norm 13 -> 6.5
    np.testing.assert_allclose(out[2], [6.0], rtol=1e-6)
    assert float(monitor.global_norm.result()) == pytest.approx(13.0)
    assert float(monitor.clipped.result()) == 1.0
    assert float(monitor.norms["a"].result()) == pytest.approx(5.0)
    same = clip_gradients(grads, None, None, None, 100.0, monitor=monitor, blocks=["a", "b", "b"])
    np.testing.assert_allclose(same[0], [3.0, 4.0])
    assert float(monitor.clipped.result()) == 0.5  # one of two steps clipped
    # a step with a NaN gradient: left out of the monitor, and all its gradients zeroed
    bad = [tf.constant([np.nan, 4.0]), None, tf.constant([12.0])]
    out = clip_gradients(bad, None, None, None, 6.5, monitor=monitor, blocks=["a", "b", "b"])
    zeroed, finite = skip_non_finite(out, None)
    assert not bool(finite) and zeroed[1] is None
    assert all(not np.asarray(g).any() for g in (zeroed[0], zeroed[2]))
    assert float(monitor.global_norm.result()) == pytest.approx(13.0)
    assert float(monitor.clipped.result()) == 0.5
    kept, finite = skip_non_finite(grads, None)
    assert bool(finite) and np.array_equal(kept[0], grads[0])


@pytest.mark.slow
def test_styles_have_bounded_beta_parameters(trained, batch):
    from stitchnet_tf.likelihood import CONCENTRATION_MAX, CONCENTRATION_MIN

    model, _ = trained
    x, _ = batch
    out = model(x, training=False)
    total = (out["alpha"] + out["beta"]).numpy()
    assert total.min() >= CONCENTRATION_MIN - 1e-4 and total.max() <= CONCENTRATION_MAX + 1e-3
