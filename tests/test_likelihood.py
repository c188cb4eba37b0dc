"""The stitch likelihood and loss terms against NumPy/SciPy references."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import special, stats

from stitchnet_tf.data.classes import (
    ALL,
    BACKGROUND,
    CON,
    GGO,
    HEALTHY,
    LESION,
    LUNG,
    NO_LESION,
    allowed_to_onehot,
    bits,
)
from stitchnet_tf.likelihood import (
    DEFAULT_EPS,
    beta_log_prob,
    class_log_prob,
    clip_unit,
    focal_set_loss,
    gaussian_kl,
    gaussian_kl_mc,
    jensen_reconstruction_loss,
    responsibilities,
    set_log_prob,
    stitch_log_likelihood,
    stitch_mixture,
)

SHAPE = (2, 5, 6, 4)
SINGLETONS = [bits(k) for k in (BACKGROUND, HEALTHY, GGO, CON)]
PARTIAL = [LESION, LUNG, NO_LESION]
ALL_SETS = SINGLETONS + PARTIAL + [ALL]


def _inputs(seed=0, sets=ALL_SETS):
    """Random x [2,5,6,1] (with exact 0 and 1), logits, alpha, beta [2,5,6,4], allowed."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, SHAPE[:3] + (1,)).astype(np.float32)
    x[0, 0, 0, 0], x[0, 0, 1, 0] = 0.0, 1.0
    pi_logits = rng.normal(0, 2, SHAPE).astype(np.float32)
    alpha = np.exp(rng.uniform(-1.5, 2.5, SHAPE)).astype(np.float32)
    beta = np.exp(rng.uniform(-1.5, 2.5, SHAPE)).astype(np.float32)
    set_bits = rng.choice(np.array(sets, np.uint8), SHAPE[:3])
    allowed = allowed_to_onehot(set_bits)
    return x, pi_logits, alpha, beta, allowed


def _ref_beta(x, alpha, beta, eps=DEFAULT_EPS):
    xc = np.clip(x.astype(np.float64), eps, 1 - eps)
    return stats.beta.logpdf(xc, alpha.astype(np.float64), beta.astype(np.float64))


def _ref_log_pi(pi_logits):
    return special.log_softmax(pi_logits.astype(np.float64), axis=-1)


def _ref_joint(x, pi_logits, alpha, beta):
    return _ref_log_pi(pi_logits) + _ref_beta(x, alpha, beta)


def _masked(values, allowed):
    return np.where(allowed > 0.5, values, -np.inf)


def test_clip_unit():
    out = clip_unit(np.array([0.0, 0.5, 1.0], np.float32)).numpy()
    np.testing.assert_allclose(out, [DEFAULT_EPS, 0.5, 1 - DEFAULT_EPS])


def test_beta_log_prob_matches_scipy_with_clipping():
    x, _, alpha, beta, _ = _inputs()
    got = beta_log_prob(x, alpha, beta)
    assert got.shape == SHAPE and got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), _ref_beta(x, alpha, beta), rtol=1e-4, atol=1e-4)
    # x = 0 and x = 1 evaluate at eps and 1 - eps.
    np.testing.assert_allclose(
        got.numpy()[0, 0, 0], stats.beta.logpdf(DEFAULT_EPS, alpha[0, 0, 0], beta[0, 0, 0]), 1e-4
    )
    np.testing.assert_allclose(
        got.numpy()[0, 0, 1],
        stats.beta.logpdf(1 - DEFAULT_EPS, alpha[0, 0, 1], beta[0, 0, 1]),
        1e-4,
    )


def test_class_log_prob_is_log_softmax():
    _, pi_logits, *_ = _inputs()
    np.testing.assert_allclose(
        class_log_prob(pi_logits).numpy(), _ref_log_pi(pi_logits), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "sets", [SINGLETONS, [LESION], [LUNG], [ALL], ALL_SETS], ids=["single", "2", "3", "all", "mix"]
)
def test_stitch_log_likelihood_matches_reference(sets):
    x, pi_logits, alpha, beta, allowed = _inputs(seed=len(sets), sets=sets)
    got = stitch_log_likelihood(x, pi_logits, alpha, beta, allowed)
    assert got.shape == SHAPE[:3] and got.dtype == tf.float32
    want = special.logsumexp(_masked(_ref_joint(x, pi_logits, alpha, beta), allowed), axis=-1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def test_singleton_is_labelled_term():
    x, pi_logits, alpha, beta, allowed = _inputs(sets=SINGLETONS)
    y = allowed.argmax(-1)
    joint = _ref_joint(x, pi_logits, alpha, beta)
    want = np.take_along_axis(joint, y[..., None], -1)[..., 0]
    got = stitch_log_likelihood(x, pi_logits, alpha, beta, allowed).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_full_set_equals_mixture_same_family():
    x, pi_logits, alpha, beta, _ = _inputs()
    full = np.ones(SHAPE, np.float32)
    mixture = stitch_mixture(pi_logits, alpha, beta)
    assert tuple(mixture.batch_shape) == SHAPE[:3]
    want = mixture.log_prob(clip_unit(x[..., 0])).numpy()
    got = stitch_log_likelihood(x, pi_logits, alpha, beta, full).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_set_log_prob():
    _, pi_logits, _, _, allowed = _inputs()
    got = set_log_prob(pi_logits, allowed).numpy()
    want = special.logsumexp(_masked(_ref_log_pi(pi_logits), allowed), axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    full = np.ones(SHAPE, np.float32)
    assert np.all(set_log_prob(pi_logits, full).numpy() == 0.0)


def test_responsibilities():
    x, pi_logits, alpha, beta, allowed = _inputs()
    joint = _ref_joint(x, pi_logits, alpha, beta)
    r = responsibilities(x, pi_logits, alpha, beta, allowed).numpy()
    assert r.shape == SHAPE and r.dtype == np.float32
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-5)
    assert np.all(r[allowed == 0] == 0.0)
    masked = _masked(joint, allowed)
    want = np.exp(masked - special.logsumexp(masked, axis=-1, keepdims=True))
    np.testing.assert_allclose(r, want, atol=1e-5)
    # Without `allowed`: the unrestricted posterior.
    r_all = responsibilities(x, pi_logits, alpha, beta).numpy()
    np.testing.assert_allclose(r_all, special.softmax(joint, axis=-1), atol=1e-5)
    # The posterior decision is exported to TFLite, which has no sparse softmax cross-entropy
    # (what TFP's Categorical.log_prob traces to): the graph must not hold one.
    traced = tf.function(responsibilities).get_concrete_function(x, pi_logits, alpha, beta, allowed)
    ops = {op.type for op in traced.graph.get_operations()}
    assert not any("SparseSoftmaxCrossEntropy" in t for t in ops), ops


def test_jensen_reconstruction_loss():
    x, pi_logits, alpha, beta, _ = _inputs()
    got = jensen_reconstruction_loss(x, pi_logits, alpha, beta).numpy()
    want = -(special.softmax(pi_logits.astype(np.float64), -1) * _ref_beta(x, alpha, beta)).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    full = np.ones(SHAPE, np.float32)
    exact = -stitch_log_likelihood(x, pi_logits, alpha, beta, full).numpy()
    assert np.all(got >= exact - 1e-4)


def test_focal_set_loss():
    _, pi_logits, _, _, allowed = _inputs(sets=SINGLETONS)
    p = special.softmax(pi_logits.astype(np.float64), -1)
    p_y = (p * allowed).sum(-1)
    for gamma in (0.0, 0.5, 2.0):
        got = focal_set_loss(pi_logits, allowed, gamma=gamma).numpy()
        want = -((1 - p_y) ** gamma) * np.log(p_y)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # Sets: 0 for the full set; gamma = 0 is -log p_S.
    _, pi_logits, _, _, allowed = _inputs(seed=3)
    full = allowed.sum(-1) == 4
    assert full.any() and (~full).any()
    got = focal_set_loss(pi_logits, allowed).numpy()
    assert np.all(got[full] == 0.0)
    p_s = (special.softmax(pi_logits.astype(np.float64), -1) * allowed).sum(-1)
    np.testing.assert_allclose(got, -((1 - p_s) ** 2) * np.log(p_s), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        focal_set_loss(pi_logits, allowed, gamma=0.0).numpy(), -np.log(p_s), rtol=1e-4, atol=1e-6
    )


MU_Q = np.array([0.0, 1.0, -2.0, 0.3], np.float32)
SIGMA_Q = np.array([1.0, 0.5, 2.0, 0.1], np.float32)
MU_P = np.array([0.0, 0.0, 1.0, 0.2], np.float32)
SIGMA_P = np.array([1.0, 1.5, 0.7, 0.1], np.float32)


def test_gaussian_kl_closed_form():
    got = gaussian_kl(MU_Q, SIGMA_Q, MU_P, SIGMA_P).numpy()
    q, sq, p, sp = (a.astype(np.float64) for a in (MU_Q, SIGMA_Q, MU_P, SIGMA_P))
    want = np.log(sp / sq) + (sq**2 + (q - p) ** 2) / (2 * sp**2) - 0.5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[0] == pytest.approx(0.0, abs=1e-7)


def test_gaussian_kl_mc_is_unbiased():
    n = 200_000
    rng = np.random.default_rng(1)
    z = (MU_Q + SIGMA_Q * rng.standard_normal((n, MU_Q.size))).astype(np.float32)
    est = gaussian_kl_mc(z, MU_Q, SIGMA_Q, MU_P, SIGMA_P).numpy().astype(np.float64)
    assert est.shape == (n, MU_Q.size)
    kl = gaussian_kl(MU_Q, SIGMA_Q, MU_P, SIGMA_P).numpy()
    se = est.std(0) / np.sqrt(n)
    assert np.all(np.abs(est.mean(0) - kl) <= 4 * se + 1e-6)


EXTREMES = [
    (1e-4, 1e-4),
    (1e4, 1e4),
    (1e-4, 1e4),
    (1e4, 1e-4),
    (1.0, 1.0),
]


@pytest.mark.parametrize("a,b", EXTREMES)
def test_gradients_finite_at_extremes(a, b):
    x = np.array([0.0, 1.0, 0.5, 0.0, 1.0, 0.3], np.float32).reshape(1, 1, 6, 1)
    set_bits = np.array([ALL, bits(GGO), LESION, LUNG, NO_LESION, bits(BACKGROUND)], np.uint8)
    allowed = allowed_to_onehot(set_bits).reshape(1, 1, 6, 4)
    logits = tf.Variable(np.array([[30.0, -30.0, 0.0, 5.0]] * 6, np.float32).reshape(1, 1, 6, 4))
    alpha = tf.Variable(np.full((1, 1, 6, 4), a, np.float32))
    beta = tf.Variable(np.full((1, 1, 6, 4), b, np.float32))
    with tf.GradientTape() as tape:
        loss = (
            -tf.reduce_sum(stitch_log_likelihood(x, logits, alpha, beta, allowed))
            - tf.reduce_sum(stitch_log_likelihood(x, logits, alpha, beta, np.ones_like(allowed)))
            + tf.reduce_sum(jensen_reconstruction_loss(x, logits, alpha, beta))
            + tf.reduce_sum(focal_set_loss(logits, allowed))
            + tf.reduce_sum(focal_set_loss(logits, allowed, gamma=0.0))
            + tf.reduce_sum(focal_set_loss(logits, allowed, gamma=0.5))
            - tf.reduce_sum(set_log_prob(logits, allowed))
            + tf.reduce_sum(responsibilities(x, logits, alpha, beta, allowed)[..., 2])
        )
    assert np.isfinite(loss.numpy())
    for g in tape.gradient(loss, [logits, alpha, beta]):
        assert g is not None and np.all(np.isfinite(g.numpy()))


def test_gradient_wrt_logits_is_responsibility_minus_pi():
    """d/d logits log sum_{k in S} pi_k Beta_k(x) = r^S - pi: right, not just finite."""
    x, pi_logits, alpha, beta, allowed = _inputs()
    logits = tf.Variable(pi_logits)
    with tf.GradientTape() as tape:
        ll = tf.reduce_sum(stitch_log_likelihood(x, logits, alpha, beta, allowed))
    grad = tape.gradient(ll, logits).numpy()
    r = responsibilities(x, pi_logits, alpha, beta, allowed).numpy()
    np.testing.assert_allclose(grad, r - special.softmax(pi_logits, -1), atol=1e-5)


def test_works_in_graph_mode_with_unknown_shapes():
    x, pi_logits, alpha, beta, allowed = _inputs()
    spec4 = tf.TensorSpec([None, None, None, None], tf.float32)
    f = tf.function(stitch_log_likelihood, input_signature=[spec4] * 5)
    np.testing.assert_allclose(
        f(x, pi_logits, alpha, beta, allowed).numpy(),
        stitch_log_likelihood(x, pi_logits, alpha, beta, allowed).numpy(),
        rtol=1e-6,
    )


def test_gaussian_kl_gradients_finite():
    mu_q, sigma_q = tf.Variable(MU_Q), tf.Variable(SIGMA_Q)
    with tf.GradientTape() as tape:
        z = mu_q + sigma_q * tf.random.stateless_normal(MU_Q.shape, seed=[1, 2])
        loss = tf.reduce_sum(gaussian_kl(mu_q, sigma_q, MU_P, SIGMA_P)) + tf.reduce_sum(
            gaussian_kl_mc(z, mu_q, sigma_q, MU_P, SIGMA_P)
        )
    for g in tape.gradient(loss, [mu_q, sigma_q]):
        assert np.all(np.isfinite(g.numpy()))


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16])
def test_low_precision_inputs_give_float32(dtype):
    x, pi_logits, alpha, beta, allowed = _inputs()
    low = [tf.cast(t, dtype) for t in (x, pi_logits, alpha, beta, allowed)]
    rounded = [tf.cast(t, tf.float32).numpy() for t in low]
    funcs = {
        "stitch": lambda x, p, a, b, s: stitch_log_likelihood(x, p, a, b, s),
        "beta": lambda x, p, a, b, s: beta_log_prob(x, a, b),
        "set": lambda x, p, a, b, s: set_log_prob(p, s),
        "resp": lambda x, p, a, b, s: responsibilities(x, p, a, b, s),
        "jensen": lambda x, p, a, b, s: jensen_reconstruction_loss(x, p, a, b),
        "focal": lambda x, p, a, b, s: focal_set_loss(p, s),
        "mixture": lambda x, p, a, b, s: stitch_mixture(p, a, b).log_prob(clip_unit(x[..., 0])),
    }
    for name, f in funcs.items():
        got = f(*low)
        assert got.dtype == tf.float32, name
        # Same as float32 on the rounded inputs ...
        np.testing.assert_allclose(got.numpy(), f(*rounded).numpy(), rtol=1e-5, atol=1e-5)
        # ... and close to float32 on the originals when only the heads are low precision (a
        # low-precision x near 1 moves the Beta density a lot: that is the input's rounding).
        got = f(x, *low[1:]).numpy()
        want = f(x, pi_logits, alpha, beta, allowed).numpy()
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.1, err_msg=name)
    kl = gaussian_kl(*(tf.cast(t, dtype) for t in (MU_Q, SIGMA_Q, MU_P, SIGMA_P)))
    assert kl.dtype == tf.float32
    np.testing.assert_allclose(kl.numpy(), gaussian_kl(MU_Q, SIGMA_Q, MU_P, SIGMA_P), atol=0.05)


def _numpy_set_dice(p, allowed, group):
    inside = np.isin(np.arange(allowed.shape[-1]), group)
    n_in = (allowed * inside).sum(-1)
    truth = (n_in > 0) & (allowed.sum(-1) == n_in)
    scored = truth | (n_in == 0)
    p_g = (p * inside).sum(-1)
    return (2 * (p_g * truth).sum() + 1) / ((p_g * scored).sum() + truth.sum() + 1)


def test_soft_set_dice_loss_matches_numpy():
    from stitchnet_tf.likelihood import soft_set_dice_loss

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 8, 8, 4)).astype("float32")
    allowed = np.zeros((2, 8, 8, 4), "float32")
    allowed[..., 1] = 1
    allowed[0, :3, :3] = [0, 0, 1, 0]  # GGO
    allowed[1, 4:, 4:] = [0, 0, 0, 1]  # consolidation
    allowed[0, 6:] = 1  # unlabelled: ignored
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    exact = [_numpy_set_dice(p, allowed, [k]) for k in (2, 3)]
    # every labelled pixel names its class: the classes' mean alone (no union term)
    np.testing.assert_allclose(
        float(soft_set_dice_loss(logits, allowed)), 1 - np.mean(exact), rtol=1e-5
    )
    allowed[1, :2] = [0, 0, 1, 1]  # "lesion": left out of both classes' Dice; the union's
    with_union = [_numpy_set_dice(p, allowed, g) for g in ([2], [3], [2, 3])]
    np.testing.assert_allclose(
        float(soft_set_dice_loss(logits, allowed)), 1 - np.mean(with_union), rtol=1e-5
    )
    # no pixel names consolidation: its negatives-only term is dropped beside such lesions
    allowed[1, 4:, 4:] = [0, 0, 1, 1]
    kept = [_numpy_set_dice(p, allowed, g) for g in ([2], [2, 3])]
    np.testing.assert_allclose(
        float(soft_set_dice_loss(logits, allowed)), 1 - np.mean(kept), rtol=1e-5
    )
    perfect = np.where(allowed > 0, 20.0, -20.0).astype("float32")
    perfect[..., 1] = np.where((allowed.sum(-1) == 1) & (allowed[..., 1] == 1), 20.0, -20.0)
    assert float(soft_set_dice_loss(perfect[:1, :6], allowed[:1, :6])) < 0.05


def test_soft_set_dice_loss_rewards_a_lesion_of_unknown_kind():
    """zenodo20 marks "lesion" only: predicting it there must lower the loss (without the union
    term the only scored pixels were negatives, and the U-Net learned to predict no lesion)."""
    from stitchnet_tf.likelihood import soft_set_dice_loss

    allowed = np.zeros((1, 16, 16, 4), "float32")
    allowed[..., :2] = 1  # background or healthy lung
    allowed[0, 4:8, 4:8] = [0, 0, 1, 1]  # a lesion, kind unknown
    lesion = allowed[..., 2] > 0
    losses = []
    for logit in (-4.0, 0.0, 4.0):  # lesion classes' logit on the lesion pixels
        logits = np.full(allowed.shape, -4.0, "float32")
        logits[..., 1] = 4.0
        logits[lesion] = [-4.0, -4.0, logit, logit]
        losses.append(float(soft_set_dice_loss(logits, allowed)))
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < 0.1  # the lesion found, whatever its kind: nothing left to gain


def test_beta_from_mean_concentration_is_bounded():
    from stitchnet_tf.likelihood import (
        CONCENTRATION_MAX,
        CONCENTRATION_MIN,
        MEAN_MIN,
        beta_from_mean_concentration,
    )

    raw = np.array([-50.0, -3.0, 0.0, 3.0, 50.0], "float32")
    alpha, beta = beta_from_mean_concentration(raw, raw[::-1])
    total = (alpha + beta).numpy()
    assert (total >= CONCENTRATION_MIN - 1e-5).all() and (total <= CONCENTRATION_MAX + 1e-3).all()
    mean = MEAN_MIN + (1 - 2 * MEAN_MIN) / (1 + np.exp(-raw.astype("float64")))
    np.testing.assert_allclose(alpha / (alpha + beta), mean, rtol=1e-5)
    # extreme mean logits leave both parameters positive: the log-density stays finite
    assert (alpha.numpy() > 0).all() and (beta.numpy() > 0).all()
    x = np.array([0.001, 0.5, 0.999], "float32")[:, None]
    assert np.isfinite(beta_log_prob(x, alpha[None], beta[None]).numpy()).all()
    # the log-density of a constant pixel is bounded: no spike as training sharpens a style
    assert float(tf.reduce_max(beta_log_prob(np.full((1,), 0.3), alpha, beta))) < 5.0
