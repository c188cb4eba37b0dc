"""Weak-to-strong consistency on the unlabelled pixels of a batch (FixMatch, UniMatch), shared
by StitchNet and the baselines (docs/DESIGN.md §7.17).

The teacher's prediction on the weakly augmented slice (the batch as the pipeline delivers it:
flips, rotations, crop-scale) is turned into hard pseudo-labels, kept where the teacher's
confidence is at least `threshold`. They supervise the student twice: on a strongly augmented
copy (CutMix between the batch's unlabelled slices with keras-cv's `CutMix`, then intensity
jitter, gamma, noise and blur inside the lung field), and on a feature-perturbed pass over the
weak slice (StitchNet: z sampled; U-Net: channel dropout on the encoder features). The teacher
is the model itself under `stop_gradient`, or an exponential moving average of its weights
(mean teacher), evaluated through `keras.StatelessScope`. The term is ramped up from 0.
Optionally the teacher's probabilities are aligned to the labelled class distribution
(ReMixMatch), and each class gets its own threshold (class-balanced self-training, Zou et al.
2018) so that the rare lesion classes are not left out of the confident set.

A pixel takes part when it is in the lung field and its lesion class is not known (its allowed
set holds more than one of healthy, GGO, CON): unlabelled slices, and withheld labels.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from stitchnet_tf.options import CONSISTENCY_DEFAULTS, STRONG_VIEWS, TEACHERS

#: Momentum of the running statistics: alignment's class distributions, the class thresholds.
RUNNING_MOMENTUM = 0.99
#: The strong intensity ranges (a stronger version of `pipeline.augment_intensity`).
BRIGHTNESS, CONTRAST, GAMMA, NOISE, BLUR = (0.7, 1.3), (0.7, 1.3), (0.6, 1.6), 0.04, (0.5, 1.5)


def rampup(step, steps: int):
    """The sigmoid ramp exp(−5 (1 − t)²), t = min(step / steps, 1) (Laine & Aila 2017): a
    scalar in (0, 1]; 1 when `steps` ≤ 0."""
    if steps <= 0:
        return tf.constant(1.0)
    t = tf.minimum(tf.cast(step, tf.float32) / float(steps), 1.0)
    return tf.exp(-5.0 * (1.0 - t) ** 2)


def _blur(x, sigma):
    """x [B, H, W, 1] blurred by a 7×7 Gaussian of width `sigma` (a scalar, pixels)."""
    r = tf.range(-3.0, 4.0)
    k = tf.exp(-(r**2) / (2.0 * sigma**2))
    k = k / tf.reduce_sum(k)
    return tf.nn.conv2d(x, (k[:, None] * k[None, :])[:, :, None, None], 1, "SAME")


def strong_intensity(x, lung, seed, attenuation: bool = True):
    """The strong intensity view of x [B, H, W, 1] inside the lung field `lung` [B, H, W, 1].

    Per slice: brightness ×U(0.7, 1.3), contrast ×U(0.7, 1.3) about the lung mean, gamma
    U(0.6, 1.6) (these three only with `attenuation`), Gaussian noise of σ ~ U(0, 0.04); half
    the slices are blurred (σ 0.5–1.5 px). Clipped to [0, 1] and zero outside the field.
    `seed`: a stateless seed, int [2].
    """
    x, lung = tf.cast(x, tf.float32), tf.cast(lung > 0, tf.float32)
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 7)
    shape = tf.stack([tf.shape(x)[0], 1, 1, 1])

    def u(i, low, high):
        return tf.random.stateless_uniform(shape, s[i], low, high)

    area = tf.maximum(tf.reduce_sum(lung, axis=(1, 2, 3), keepdims=True), 1.0)
    v = x
    if attenuation:
        v = v * u(0, *BRIGHTNESS)
        mean = tf.reduce_sum(v * lung, axis=(1, 2, 3), keepdims=True) / area
        v = (v - mean) * u(1, *CONTRAST) + mean
        v = tf.clip_by_value(v, 0.0, 1.0) ** u(2, *GAMMA)
    v = v + tf.random.stateless_normal(tf.shape(x), s[3]) * u(4, 0.0, NOISE)
    sigma = tf.random.stateless_uniform([], s[5], *BLUR)
    v = tf.where(u(6, 0.0, 1.0) < 0.5, _blur(v * lung, sigma), v)
    return tf.clip_by_value(v, 0.0, 1.0) * lung


def align_distribution(probs, target, predicted):
    """ReMixMatch's distribution alignment: probs [..., C] × target [C] / predicted [C],
    renormalised over C. `target`: the class distribution the pseudo-labels should have (the
    labelled pixels'); `predicted`: the teacher's running mean prediction on unlabelled
    pixels."""
    scaled = probs * (target / tf.maximum(predicted, 1e-6))
    return scaled / tf.maximum(tf.reduce_sum(scaled, -1, keepdims=True), 1e-12)


def class_quantiles(confidence, target, region, share: float, classes: int):
    """For each class c, the confidence [b,H,W] at which the top `share` of the taking-part
    pixels (`region` [b,H,W] > 0) whose pseudo-label `target` [b,H,W] is c begin: the
    (1 − share)-quantile (lower order statistic) of their confidences. Returns (quantiles [C],
    counts [C]); a class with no pixel has quantile 1."""
    quantiles, counts = [], []
    for c in range(classes):
        values = tf.boolean_mask(confidence, (target == c) & (region > 0))
        n = tf.size(values)
        ordered = tf.concat([tf.sort(values), [1.0]], 0)  # the pad answers an empty class
        index = tf.cast(
            tf.floor((1.0 - share) * tf.cast(tf.maximum(n - 1, 0), tf.float32)), tf.int32
        )
        quantiles.append(tf.where(n > 0, ordered[index], 1.0))
        counts.append(n)
    return tf.stack(quantiles), tf.stack(counts)


def _running_weight(model: keras.Model, name: str, value: float):
    """A running statistic of the C = 3 lesion-view classes (healthy, GGO, CON), starting at
    `value`: a non-trainable weight saved with the model."""
    return model.add_weight(
        shape=(3,),
        initializer=keras.initializers.Constant(value),
        dtype="float32",
        trainable=False,
        aggregation="mean",  # replicas hold the same value: any is the mean
        name=name,
    )


def _update_running(variable, value, where=True) -> None:
    """variable ← m · variable + (1 − m) · value (m = `RUNNING_MOMENTUM`) where `where` holds
    (a scalar or per-element condition), unchanged elsewhere."""
    m = RUNNING_MOMENTUM
    variable.assign(tf.where(where, m * variable + (1.0 - m) * value, variable))


def masked_cross_entropy(logits, target, weight, region):
    """UniMatch's unlabelled loss: −log softmax(logits)[target] [B, H, W] times `weight`
    (confident and taking part), summed and divided by the `region` pixels (taking part)."""
    log_p = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    ce = -tf.reduce_sum(log_p * tf.one_hot(target, tf.shape(logits)[-1]), axis=-1)
    return tf.reduce_sum(ce * weight) / tf.maximum(tf.reduce_sum(region), 1.0)


class Consistency:
    """The consistency settings and state of one model; the model supplies its lesion-view
    predictions through three callables (see `loss`).

    Args:
        model: the Keras model (its trainable variables make the EMA teacher).
        weight: weight of the term after ramp-up (0: off).
        threshold: teacher confidence below which a pixel's pseudo-label is ignored.
        rampup_steps: sigmoid ramp-up length in optimizer steps.
        teacher: `self` (the model, no gradient) or `ema` (mean teacher).
        decay: the EMA teacher's decay per step.
        strong: the strong view's intensity transforms (`options.STRONG_VIEWS`): `intensity`
            (brightness, contrast, gamma, noise, blur) or `texture` (noise and blur only).
        align: distribution alignment of the teacher's probabilities before the pseudo-labels
            are taken (`align_distribution`): towards the running class distribution of the
            batch's labelled lung pixels, away from the teacher's running mean on unlabelled
            ones; two running means of C = 3 (healthy, GGO, CON) saved with the model.
        balance: class-balanced thresholds (0: off): each class's threshold is lowered from
            `threshold` to the running (1 − balance)-quantile of the teacher's confidence on
            the pixels it labels with that class (`class_quantiles`), so that about `balance`
            of every class's pseudo-labels are kept however rare the class; the running
            quantiles (C = 3) are saved with the model.
        seed: seeds CutMix and the intensity jitter.
    """

    def __init__(
        self,
        model: keras.Model,
        weight: float = CONSISTENCY_DEFAULTS["consistency_weight"],
        threshold: float = CONSISTENCY_DEFAULTS["consistency_threshold"],
        rampup_steps: int = CONSISTENCY_DEFAULTS["consistency_rampup"],
        teacher: str = CONSISTENCY_DEFAULTS["teacher"],
        decay: float = CONSISTENCY_DEFAULTS["teacher_decay"],
        strong: str = CONSISTENCY_DEFAULTS["consistency_strong"],
        align: bool = CONSISTENCY_DEFAULTS["consistency_align"],
        balance: float = CONSISTENCY_DEFAULTS["consistency_balance"],
        seed: int | None = None,
    ):
        """Called after the model is built (the EMA teacher copies its trainable variables)."""
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
        if strong not in STRONG_VIEWS:
            raise ValueError(f"the strong view must be one of {STRONG_VIEWS}, got {strong!r}")
        if not 0.0 <= threshold < 1.0 or weight < 0 or not 0.0 <= decay < 1.0:
            raise ValueError("consistency needs weight ≥ 0, threshold and decay in [0, 1)")
        if not 0.0 <= balance <= 1.0:
            raise ValueError(f"the class balance must be in [0, 1], got {balance}")
        self.weight, self.threshold, self.rampup_steps = float(weight), threshold, rampup_steps
        self.teacher, self.decay, self.strong = teacher, float(decay), strong
        self.align, self.balance = bool(align), float(balance)
        self.on = self.weight > 0
        self.teacher_weights: list = []
        self.class_means: list = []
        self.class_thresholds = None
        if not self.on:
            return
        import keras_cv  # noqa: PLC0415 (only when the term is on: a second of import)

        self.cutmix = keras_cv.layers.CutMix(seed=seed, dtype="float32")
        self.seed = keras.random.SeedGenerator(None if seed is None else seed + 2)
        if teacher == "ema":
            self.teacher_weights = [
                model.add_weight(
                    shape=v.shape,
                    initializer="zeros",
                    dtype=v.dtype,
                    trainable=False,
                    aggregation="mean",  # replicas hold the same value: any is the mean
                    name=f"teacher_{i}",
                )
                for i, v in enumerate(model.trainable_variables)
            ]
            self.student_weights = list(model.trainable_variables)
        if self.align:  # [labelled, teacher] running class distributions, from uniform
            self.class_means = [
                _running_weight(model, f"align_{which}", 1.0 / 3.0)
                for which in ("labelled", "teacher")
            ]
        if self.balance > 0:  # running per-class thresholds, from the global one
            self.class_thresholds = _running_weight(model, "class_thresholds", self.threshold)

    def config(self) -> dict:
        return {
            "consistency_weight": self.weight,
            "consistency_threshold": self.threshold,
            "consistency_rampup": self.rampup_steps,
            "teacher": self.teacher,
            "teacher_decay": self.decay,
            "consistency_strong": self.strong,
            "consistency_align": self.align,
            "consistency_balance": self.balance,
        }

    def teacher_scope(self):
        """A scope in which the model computes with the teacher's weights."""
        if self.teacher != "ema":
            return _NullScope()
        return keras.StatelessScope(
            state_mapping=list(zip(self.student_weights, self.teacher_weights, strict=True)),
        )

    def update_teacher(self, step) -> None:
        """After an optimizer step: teacher ← decay · teacher + (1 − decay) · student (a copy of
        the student on the first step)."""
        if self.teacher != "ema":
            return
        decay = tf.where(tf.cast(step, tf.int64) <= 1, 0.0, self.decay)
        for t, s in zip(self.teacher_weights, self.student_weights, strict=True):
            t.assign(decay * t + (1.0 - decay) * tf.cast(s, t.dtype))

    def aligned(self, probs, region, allowed, lung):
        """The teacher's probabilities [b,H,W,3] aligned (`align_distribution`) after this
        batch updates the running means: the labelled lung pixels' class shares (pixels with
        one known class of healthy, GGO, CON; no update when there are none) and the
        teacher's mean on the taking-part pixels `region` [b,H,W]."""
        labelled_mean, teacher_mean = self.class_means
        known = (
            allowed[..., 1:]
            * lung
            * tf.cast(tf.reduce_sum(allowed[..., 1:], -1, keepdims=True) == 1.0, tf.float32)
        )
        n = tf.reduce_sum(known, axis=(0, 1, 2))
        _update_running(labelled_mean, n / tf.maximum(tf.reduce_sum(n), 1.0), tf.reduce_sum(n) > 0)
        mean = tf.reduce_sum(probs * region[..., None], axis=(0, 1, 2)) / tf.maximum(
            tf.reduce_sum(region), 1.0
        )
        _update_running(teacher_mean, mean)
        return align_distribution(probs, labelled_mean, teacher_mean)

    def thresholds(self, confidence, target, region):
        """The threshold of each pixel [b,H,W]: `threshold`, or with `balance` the running
        per-class threshold of its pseudo-label `target` [b,H,W], after this batch updates the
        running quantiles (`class_quantiles` of `confidence` [b,H,W] on `region`; a class
        absent from the batch keeps its value), never above `threshold`."""
        if self.balance <= 0:
            return tf.fill(tf.shape(confidence), self.threshold)
        quantiles, counts = class_quantiles(confidence, target, region, self.balance, 3)
        _update_running(self.class_thresholds, quantiles, counts > 0)
        return tf.gather(tf.minimum(self.class_thresholds, self.threshold), target)

    def loss(self, data: dict, step, teacher_probs, student_logits, perturbed_logits=None):
        """The consistency term and the share of taking-part pixels with a confident label.

        data: the batch {x [B,H,W,1], allowed [B,H,W,4], lung [B,H,W,1]}; step: the optimizer
        step (ramp-up). teacher_probs(x_u, keep) -> lesion-view probabilities [b,H,W,C] of the
        weak slices x_u = x[keep] (no gradient needed); student_logits(x) -> logits [b,H,W,C]
        in training mode; perturbed_logits(x, keep) -> feature-perturbed student logits on the
        weak slices, or None (no FP pass).
        Returns (ramped weight × term, confident share), scalars.
        """
        x, allowed, lung = data["x"], tf.cast(data["allowed"], tf.float32), data["lung"]
        lung = tf.cast(lung > 0, tf.float32)
        # lesion status unknown: more than one of healthy, GGO, CON allowed
        unknown = tf.cast(tf.reduce_sum(allowed[..., 1:], -1) > 1.5, tf.float32) * lung[..., 0]
        keep = tf.reduce_any(unknown > 0, axis=(1, 2))  # slices with pixels taking part
        x_u = tf.boolean_mask(tf.cast(x, tf.float32), keep)
        lung_u, region = tf.boolean_mask(lung, keep), tf.boolean_mask(unknown, keep)

        def term():
            with self.teacher_scope():
                probs = tf.stop_gradient(tf.cast(teacher_probs(x_u, keep), tf.float32))
            if self.align:
                probs = self.aligned(probs, region, allowed, lung)
            target = tf.argmax(probs, -1, output_type=tf.int32)
            confidence = tf.reduce_max(probs, -1)
            threshold = self.thresholds(confidence, target, region)
            weight = tf.cast(confidence >= threshold, tf.float32) * region
            # strong view: CutMix the slices and their pseudo-labels, then intensity jitter
            masks = tf.stack([tf.cast(target, tf.float32), weight, region], axis=-1)
            mixed = self.cutmix(
                {"images": tf.concat([x_u, lung_u], -1), "segmentation_masks": masks}
            )
            images, masks = mixed["images"], mixed["segmentation_masks"]
            seed = keras.random.randint([2], 0, 2**30, seed=self.seed)
            x_s = strong_intensity(
                images[..., :1], images[..., 1:], seed, attenuation=self.strong == "intensity"
            )
            target_s = tf.cast(tf.round(masks[..., 0]), tf.int32)
            value = masked_cross_entropy(
                student_logits(x_s), target_s, masks[..., 1], masks[..., 2]
            )
            if perturbed_logits is not None:
                fp = masked_cross_entropy(perturbed_logits(x_u, keep), target, weight, region)
                value = 0.5 * (value + fp)
            confident = tf.reduce_sum(weight) / tf.maximum(tf.reduce_sum(region), 1.0)
            return value, confident

        zero = tf.constant(0.0)
        value, confident = tf.cond(tf.reduce_any(keep), term, lambda: (zero, zero))
        return self.weight * rampup(step, self.rampup_steps) * value, confident


def consistency_options(
    consistency_weight: float = CONSISTENCY_DEFAULTS["consistency_weight"],
    consistency_threshold: float = CONSISTENCY_DEFAULTS["consistency_threshold"],
    consistency_rampup: int = CONSISTENCY_DEFAULTS["consistency_rampup"],
    teacher: str = CONSISTENCY_DEFAULTS["teacher"],
    teacher_decay: float = CONSISTENCY_DEFAULTS["teacher_decay"],
    consistency_strong: str = CONSISTENCY_DEFAULTS["consistency_strong"],
    consistency_align: bool = CONSISTENCY_DEFAULTS["consistency_align"],
    consistency_balance: float = CONSISTENCY_DEFAULTS["consistency_balance"],
) -> dict:
    """A model's consistency arguments (the names of `Consistency.config`) -> the keyword
    arguments of `Consistency`."""
    return dict(
        weight=consistency_weight,
        threshold=consistency_threshold,
        rampup_steps=consistency_rampup,
        teacher=teacher,
        decay=teacher_decay,
        strong=consistency_strong,
        align=consistency_align,
        balance=consistency_balance,
    )


class _NullScope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
