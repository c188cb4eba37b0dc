"""The stitch likelihood and the loss terms built on it (docs/DESIGN.md §3).

Per pixel the model gives segmentation logits `pi_logits` and Beta parameters `alpha`, `beta`
of the four styles (background, healthy, GGO, consolidation):

    p(y | z) = Categorical(pi),    p(x | y = k, z) = Beta(x; alpha_k, beta_k).

A label is, per pixel, a set S of allowed classes (`allowed` [B, H, W, K], 1 where allowed):
one class for exact labels, several for partial labels, all K for unlabelled pixels. The
stitch likelihood marginalises y over S:

    log p(x, y in S | z) = log sum_{k in S} pi_k Beta(x; alpha_k, beta_k),

so labelled, partially labelled and unlabelled pixels share one code path. Everything is
computed in float32 whatever the input dtype (Keras mixed precision runs the network in
bfloat16/float16; TFP's Beta has no bfloat16 CPU kernel and its sampler refuses float16).
Disallowed classes are masked to a large negative finite number before the log-sum-exp, so
gradients stay finite (no -inf arithmetic).
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

TensorLike = tf.types.experimental.TensorLike

DEFAULT_EPS = 1e-3
#: Stand-in for log 0 on disallowed classes: finite, so gradients never meet inf - inf.
MASKED_LOG = -1e30


def _f32(t: TensorLike) -> tf.Tensor:
    return tf.cast(t, tf.float32)


def _allowed_mask(allowed: TensorLike | None, like: tf.Tensor) -> tf.Tensor:
    """Bool [..., K] from a 0/1 (or bool) allowed-set tensor; all True when `allowed` is None."""
    if allowed is None:
        return tf.ones_like(like, dtype=tf.bool)
    return _f32(allowed) > 0.5


def _masked_logsumexp(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """log sum_{k: mask} exp(values_k) over the last axis; [..., K] -> [...]."""
    return tf.reduce_logsumexp(tf.where(mask, values, MASKED_LOG), axis=-1)


def clip_unit(x: TensorLike, eps: float = DEFAULT_EPS) -> tf.Tensor:
    """Image intensities clipped to [eps, 1 - eps] (float32), inside the Beta support."""
    return tf.clip_by_value(_f32(x), eps, 1.0 - eps)


def beta_log_prob(
    x: TensorLike, alpha: TensorLike, beta: TensorLike, eps: float = DEFAULT_EPS
) -> tf.Tensor:
    """log Beta(x; alpha_k, beta_k) of every style k.

    Args:
        x: image [B, H, W, 1] in [0, 1] (clipped to [eps, 1 - eps]).
        alpha, beta: Beta parameters [B, H, W, K], > 0.

    Returns:
        [B, H, W, K] float32.
    """
    return tfd.Beta(_f32(alpha), _f32(beta)).log_prob(clip_unit(x, eps))


def class_log_prob(pi_logits: TensorLike) -> tf.Tensor:
    """log pi_k = log p(y = k | z) for every class k: [B, H, W, K] -> [B, H, W, K] (log-softmax)."""
    pi_logits = _f32(pi_logits)
    num_classes = tf.shape(pi_logits)[-1]
    # A batch of one Categorical per pixel, evaluated at every class id at once.
    return tfd.Categorical(logits=pi_logits[..., None, :]).log_prob(tf.range(num_classes))


def set_log_prob(pi_logits: TensorLike, allowed: TensorLike) -> tf.Tensor:
    """log p(y in S | z) = log sum_{k in S} pi_k per pixel; [B, H, W, K] -> [B, H, W].

    Exactly 0 where S holds every class.
    """
    pi_logits = _f32(pi_logits)
    mask = _allowed_mask(allowed, pi_logits)
    return _masked_logsumexp(pi_logits, mask) - tf.reduce_logsumexp(pi_logits, axis=-1)


def _joint_log_prob(x, pi_logits, alpha, beta, eps) -> tf.Tensor:
    """log pi_k + log Beta(x; alpha_k, beta_k): [B, H, W, K]."""
    return class_log_prob(pi_logits) + beta_log_prob(x, alpha, beta, eps)


def stitch_log_likelihood(
    x: TensorLike,
    pi_logits: TensorLike,
    alpha: TensorLike,
    beta: TensorLike,
    allowed: TensorLike,
    eps: float = DEFAULT_EPS,
) -> tf.Tensor:
    """Per-pixel stitch log-likelihood log sum_{k in S} pi_k Beta(x; alpha_k, beta_k).

    Singleton S = {y} gives the labelled term log pi_y + log Beta(x; alpha_y, beta_y); S = all
    classes the exact unlabelled marginal log p(x | z) (a K-component Beta mixture).

    Args:
        x: image [B, H, W, 1] in [0, 1].
        pi_logits: segmentation logits [B, H, W, K].
        alpha, beta: style Beta parameters [B, H, W, K], > 0.
        allowed: allowed-class sets [B, H, W, K], 1 where allowed, never empty.

    Returns:
        [B, H, W] float32 (sum it over pixels for log p(x, y in S | z)).
    """
    joint = _joint_log_prob(x, pi_logits, alpha, beta, eps)
    return _masked_logsumexp(joint, _allowed_mask(allowed, joint))


def stitch_mixture(
    pi_logits: TensorLike, alpha: TensorLike, beta: TensorLike
) -> tfd.MixtureSameFamily:
    """Per-pixel Beta mixture p(x | z) = sum_k pi_k Beta(alpha_k, beta_k), batch shape [B, H, W].

    Evaluate it at `clip_unit(x[..., 0])`; it equals `stitch_log_likelihood` with every class
    allowed.
    """
    return tfd.MixtureSameFamily(
        mixture_distribution=tfd.Categorical(logits=_f32(pi_logits)),
        components_distribution=tfd.Beta(_f32(alpha), _f32(beta)),
    )


def responsibilities(
    x: TensorLike,
    pi_logits: TensorLike,
    alpha: TensorLike,
    beta: TensorLike,
    allowed: TensorLike | None = None,
    eps: float = DEFAULT_EPS,
) -> tf.Tensor:
    """Posterior class probabilities p(y = k | x, z, y in S) proportional to pi_k Beta_k(x).

    Args:
        x: image [B, H, W, 1]; pi_logits, alpha, beta: [B, H, W, K].
        allowed: optional allowed sets [B, H, W, K]; classes outside S get exactly 0.

    Returns:
        [B, H, W, K] float32, summing to 1 over K.
    """
    # log pi_k differs from the logits by a per-pixel constant, which the softmax cancels: the
    # logits keep TFP's Categorical (a sparse softmax cross-entropy, which TFLite lacks) out of
    # the exported segmentation graph.
    joint = _f32(pi_logits) + beta_log_prob(x, alpha, beta, eps)
    return tf.nn.softmax(tf.where(_allowed_mask(allowed, joint), joint, MASKED_LOG), axis=-1)


def jensen_reconstruction_loss(
    x: TensorLike,
    pi_logits: TensorLike,
    alpha: TensorLike,
    beta: TensorLike,
    eps: float = DEFAULT_EPS,
) -> tf.Tensor:
    """The authors' reconstruction loss sum_k pi_k (-log Beta(x; alpha_k, beta_k)).

    By Jensen's inequality an upper bound on the exact -log sum_k pi_k Beta_k(x).
    x [B, H, W, 1]; pi_logits, alpha, beta [B, H, W, K] -> [B, H, W] float32.
    """
    pi = tf.nn.softmax(_f32(pi_logits), axis=-1)
    return -tf.reduce_sum(pi * beta_log_prob(x, alpha, beta, eps), axis=-1)


def focal_set_loss(pi_logits: TensorLike, allowed: TensorLike, gamma: float = 2.0) -> tf.Tensor:
    """Sparse categorical focal loss generalised to allowed sets.

    -(1 - p_S)^gamma log p_S with p_S = sum_{k in S} pi_k: the usual focal loss for singleton
    sets, 0 where S holds every class, -log p_S for gamma = 0. 1 - p_S is computed as the mass
    of the complement of S, which keeps it accurate when p_S is close to 1.

    pi_logits, allowed [B, H, W, K] -> [B, H, W] float32.
    """
    pi_logits = _f32(pi_logits)
    mask = _allowed_mask(allowed, pi_logits)
    log_norm = tf.reduce_logsumexp(pi_logits, axis=-1)
    log_p_set = _masked_logsumexp(pi_logits, mask) - log_norm
    log_p_rest = _masked_logsumexp(pi_logits, tf.logical_not(mask)) - log_norm
    weight = tf.exp(gamma * log_p_rest)  # (1 - p_S)^gamma, = 0 (gamma > 0) for full sets
    return -weight * log_p_set


def gaussian_kl(
    mu_q: TensorLike, sigma_q: TensorLike, mu_p: TensorLike, sigma_p: TensorLike
) -> tf.Tensor:
    """Analytic KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)), elementwise, float32.

    For the per-level latent KL of the ladder VAE (diagonal Gaussians): sum it over z_i.
    """
    q = tfd.Normal(_f32(mu_q), _f32(sigma_q))
    p = tfd.Normal(_f32(mu_p), _f32(sigma_p))
    return tfd.kl_divergence(q, p)


def gaussian_kl_mc(
    z: TensorLike,
    mu_q: TensorLike,
    sigma_q: TensorLike,
    mu_p: TensorLike,
    sigma_p: TensorLike,
) -> tf.Tensor:
    """Single-sample KL estimate log q(z) - log p(z) at a sample z ~ q, elementwise, float32.

    The authors' per-level KL; unbiased for `gaussian_kl` but noisier.
    """
    z = _f32(z)
    log_q = tfd.Normal(_f32(mu_q), _f32(sigma_q)).log_prob(z)
    log_p = tfd.Normal(_f32(mu_p), _f32(sigma_p)).log_prob(z)
    return log_q - log_p


def set_cross_entropy(pi_logits: TensorLike, allowed: TensorLike) -> tf.Tensor:
    """Set-aware cross-entropy −log p(y ∈ S) per pixel, 0 where S holds every class.

    pi_logits, allowed [B, H, W, K] -> [B, H, W] float32 (`focal_set_loss` with γ = 0).
    """
    return focal_set_loss(pi_logits, allowed, 0.0)


def set_dice_terms(
    probabilities: TensorLike, allowed: TensorLike, k: int | tuple[int, ...]
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Soft-Dice sums of class k, or of a group of classes G (p_G = Σ_{k∈G} p_k), under set
    semantics, per image: ([B], [B], [B]).

    A pixel is positive when its allowed set lies inside G (exactly {k} for one class), negative
    when no class of G is allowed, and left out otherwise (unlabelled, or "GGO or consolidation"
    for one class). Returns Σ p_G·t, Σ p_G over scored pixels, and Σ t.
    """
    group = (k,) if isinstance(k, int) else tuple(k)
    probs, allowed = _f32(probabilities), _f32(allowed)
    inside = tf.constant([float(c in group) for c in range(allowed.shape[-1])])
    n_allowed = tf.reduce_sum(allowed, -1)
    n_inside = tf.reduce_sum(allowed * inside, -1)
    truth = tf.cast((n_inside > 0.5) & (n_allowed - n_inside < 0.5), tf.float32)
    scored = truth + tf.cast(n_inside < 0.5, tf.float32)
    p = tf.reduce_sum(probs * inside, -1) * scored
    axes = tf.range(1, tf.rank(p))
    return (
        tf.reduce_sum(p * truth, axes),
        tf.reduce_sum(p, axes),
        tf.reduce_sum(truth, axes),
    )


def soft_set_dice_loss(
    pi_logits: TensorLike, allowed: TensorLike, classes=(2, 3), smooth: float = 1.0
) -> tf.Tensor:
    """1 − mean of batch soft Dice terms (nnU-Net's DC term), set-aware: one per class of
    `classes`, and one for their union when the batch has pixels labelled only "one of
    `classes`" (a lesion of unknown kind).

    Sums run over the whole batch (as nnU-Net's batch Dice), so slices without a class do not
    each pull its prediction to zero. A lesion of unknown kind is left out of each class's own
    Dice; in a batch where such pixels exist and a class has no pixel that names it, that
    class's term would score negatives only (pushing the class to zero on every lesion) and is
    dropped: the union term trains on those lesions (zenodo20, which marks "lesion" only).
    Where every labelled pixel names its class (MedSeg) the loss is the classes' mean alone.
    pi_logits, allowed [B, H, W, K] -> scalar float32.
    """
    probs = tf.nn.softmax(_f32(pi_logits), axis=-1)

    def dice(group) -> tuple[tf.Tensor, tf.Tensor]:
        inter, pred, truth = (tf.reduce_sum(t) for t in set_dice_terms(probs, allowed, group))
        return (2.0 * inter + smooth) / (pred + truth + smooth), truth

    singles = [dice(k) for k in classes]
    union, union_truth = dice(tuple(classes))
    # the union's positives are the classes' own plus the lesions of unknown kind
    any_ambiguous = tf.cast(union_truth > tf.add_n([t for _, t in singles]) + 0.5, tf.float32)
    total, terms = any_ambiguous * union, any_ambiguous
    for d, truth in singles:
        on = 1.0 - any_ambiguous * tf.cast(truth < 0.5, tf.float32)
        total, terms = total + on * d, terms + on
    return 1.0 - total / terms


#: Bounds of the Beta concentration α + β of a style: a ceiling keeps every density finite
#: (no log-density that grows without limit on constant pixels), the floor keeps it unimodal.
CONCENTRATION_MIN = 2.0
CONCENTRATION_MAX = 500.0
#: A style mean stays in [MEAN_MIN, 1 − MEAN_MIN]: in float32, sigmoid(17) is exactly 1, which
#: made β = 0 and the log-density NaN once training pushed a style's mean logit that far.
MEAN_MIN = 1e-3


def beta_from_mean_concentration(
    mean_logits: TensorLike,
    concentration_logits: TensorLike,
    low: float = CONCENTRATION_MIN,
    high: float = CONCENTRATION_MAX,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Bounded Beta parameters from unconstrained outputs: mean m = MEAN_MIN + (1 − 2 MEAN_MIN)
    sigmoid(·) (1 − m computed from sigmoid(−·), so neither rounds to 0), concentration
    κ = low + (high − low)·sigmoid(·); α = m κ, β = (1 − m) κ. Shapes kept, float32."""
    mean_logits = _f32(mean_logits)
    m = MEAN_MIN + (1.0 - 2.0 * MEAN_MIN) * tf.sigmoid(mean_logits)
    one_minus_m = MEAN_MIN + (1.0 - 2.0 * MEAN_MIN) * tf.sigmoid(-mean_logits)
    kappa = low + (high - low) * tf.sigmoid(_f32(concentration_logits))
    return m * kappa, one_minus_m * kappa
