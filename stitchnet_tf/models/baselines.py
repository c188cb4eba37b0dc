"""The paper's two supervised baselines: a MobileNetV2 U-Net and SegNet (docs/DESIGN.md §4).

Both are 3-class segmenters (0 no lesion, 1 GGO, 2 consolidation) trained on the same batches
as StitchNet ({"x", "allowed"}, see `stitchnet_tf.data.pipeline`). A pixel's allowed set S over
the four classes becomes the 3-class set S' = {no lesion if background or healthy is allowed,
GGO if allowed, CON if allowed}. The loss is set cross-entropy −log p_S' over the labelled
pixels plus batch soft Dice over GGO and consolidation (the term StitchNet's supervised part
uses, `ce_dice`, the default), or the paper's set focal loss −(1 − p_S')^γ log p_S' averaged
over pixels (`focal`). Unlabelled pixels (S' holds all three classes) contribute exactly 0 to
it: the baselines learn from unlabelled slices only through the optional weak-to-strong
consistency term (`consistency_weight` > 0, `models.consistency`). `segment` returns the same
4-class probabilities as `StitchNet.segment`, the no-lesion mass going to background outside
the lung field and to healthy lung inside it.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers, ops

from stitchnet_tf import likelihood as lik
from stitchnet_tf.data.classes import BACKGROUND, CON, GGO, HEALTHY
from stitchnet_tf.data.intensity import check_intensity
from stitchnet_tf.models.backbone import scaled_filters, set_bn_momentum
from stitchnet_tf.models.base import SegmentationModel, SetDice, seeded
from stitchnet_tf.models.consistency import Consistency, consistency_options
from stitchnet_tf.models.gradients import (
    clip_gradients,
    replica_loss,
    skip_non_finite,
    update_if_finite,
)
from stitchnet_tf.options import BASELINE_LOSSES as LOSSES
from stitchnet_tf.options import CONSISTENCY_DEFAULTS, DEFAULT_GLOBAL_CLIPNORM

NUM_LESION_CLASSES = 3  # 0 no lesion, 1 GGO, 2 consolidation
#: MobileNetV2 activations at strides 2, 4, 8, 16 (the U-Net skips) and the stride-32 bottleneck.
UNET_SKIPS = (
    "block_1_expand_relu",
    "block_3_expand_relu",
    "block_6_expand_relu",
    "block_13_expand_relu",
)
UNET_BOTTOM = "block_16_project"
UNET_FILTERS = (256, 128, 64, 32)  # decoder, from stride 16 up to stride 2
#: VGG16: convs per stage and their filters.
SEGNET_STAGES = (2, 2, 3, 3, 3)
SEGNET_FILTERS = (64, 128, 256, 512, 512)


def _register(cls):
    return keras.saving.register_keras_serializable(package="stitchnet_tf")(cls)


def lesion_sets(allowed):
    """4-class allowed sets [..., 4] -> 3-class sets [..., 3] (no lesion, GGO, CON), float32."""
    allowed = ops.cast(allowed, "float32")
    no_lesion = ops.maximum(allowed[..., BACKGROUND], allowed[..., HEALTHY])
    return ops.stack([no_lesion, allowed[..., GGO], allowed[..., CON]], axis=-1)


def _conv_bn_relu(filters: int, name: str, relu: bool = True) -> keras.Sequential:
    """Conv 3×3 → BN → ReLU (→ BN only with `relu=False`)."""
    steps = [layers.Conv2D(filters, 3, padding="same", use_bias=False), layers.BatchNormalization()]
    return keras.Sequential([*steps, layers.ReLU()] if relu else steps, name=name)


# --------------------------------------------------------------------------- SegNet layers


@_register
class MaxPoolWithArgmax(layers.Layer):
    """x [B, H, W, C] -> (pooled [B, H/p, W/p, C], argmax [B, H/p, W/p, C] int64).

    `argmax` holds flat indices into x including the batch, ((b·H + y)·W + x)·C + c
    (`tf.nn.max_pool_with_argmax`, include_batch_in_index=True). H and W must be multiples of
    `pool_size`.
    """

    def __init__(self, pool_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = int(pool_size)

    def call(self, x):
        p = self.pool_size
        return tf.nn.max_pool_with_argmax(
            x, ksize=p, strides=p, padding="VALID", include_batch_in_index=True
        )

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        p = self.pool_size
        shape = (b, None if h is None else h // p, None if w is None else w // p, c)
        return shape, shape

    def compute_output_spec(self, x):
        shape, _ = self.compute_output_shape(x.shape)
        return keras.KerasTensor(shape, dtype=x.dtype), keras.KerasTensor(shape, dtype="int64")

    def get_config(self):
        return super().get_config() | {"pool_size": self.pool_size}


@_register
class MaxUnpool(layers.Layer):
    """[values [B, h, w, C], argmax [B, h, w, C]] -> [B, h·p, w·p, C].

    Scatters each value back to the position its `MaxPoolWithArgmax` took it from; every other
    position is 0. Shapes are read at run time, so any input size works.
    """

    def __init__(self, pool_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = int(pool_size)

    def call(self, inputs):
        values, argmax = inputs
        shape = tf.shape(values, out_type=tf.int64)
        p = self.pool_size
        out_shape = tf.stack([shape[0], shape[1] * p, shape[2] * p, shape[3]])
        flat = tf.scatter_nd(
            tf.reshape(tf.cast(argmax, tf.int64), (-1, 1)),
            tf.reshape(values, (-1,)),
            tf.reduce_prod(out_shape, keepdims=True),
        )
        out = tf.reshape(flat, out_shape)
        out.set_shape(self.compute_output_shape((values.shape, argmax.shape)))
        return out

    def compute_output_shape(self, input_shape):
        (b, h, w, c), _ = input_shape
        p = self.pool_size
        return (b, None if h is None else h * p, None if w is None else w * p, c)

    def get_config(self):
        return super().get_config() | {"pool_size": self.pool_size}


# --------------------------------------------------------------------------- shared behaviour


class SetSupervisedMixin(SegmentationModel):
    """Loss, training, metrics and inference shared by the baselines.

    The model maps x [B, H, W, 1] to logits [B, H, W, 3] (no lesion, GGO, CON). Training
    batches are dicts {"x", "allowed"}; tracked: `loss`, `dice_ggo`, `dice_con` (`SetDice` over
    the labelled pixels, accumulated over the epoch; no lesion counts as healthy lung).
    """

    def _check_options(self, loss: str) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")

    def _init_training(
        self,
        loss,
        focal_gamma,
        clipnorm,
        clipvalue,
        seed,
        global_clipnorm=None,
        intensity="none",
        consistency: dict | None = None,
    ) -> None:
        self.intensity = check_intensity(intensity)
        # `self.loss` belongs to Keras (compile sets it), hence `loss_type`.
        self.loss_type, self.focal_gamma = loss, focal_gamma
        self.clipnorm, self.clipvalue, self.seed = clipnorm, clipvalue, seed
        self.global_clipnorm = global_clipnorm
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.skipped = keras.metrics.Mean(name="skipped")  # share of steps with non-finite grads
        self.dice = [SetDice(GGO), SetDice(CON), SetDice((GGO, CON), name="dice_lesion")]
        self.consistency = Consistency(self, **(consistency or {}), seed=seed)
        self.consistency_trackers = (
            [keras.metrics.Mean(name="consistency"), keras.metrics.Mean(name="confident")]
            if self.consistency.on
            else []
        )

    def _training_config(self) -> dict:
        return {
            "loss": self.loss_type,
            "focal_gamma": self.focal_gamma,
            "clipnorm": self.clipnorm,
            "clipvalue": self.clipvalue,
            "global_clipnorm": self.global_clipnorm,
            "seed": self.seed,
            "intensity": self.intensity,
            "lesion_offset": float(self.lesion_offset),
            **self.consistency.config(),
        }

    @property
    def metrics(self):
        return [self.loss_tracker, self.skipped, *self.consistency_trackers, *self.dice]

    @property
    def gamma(self) -> float:
        """The focal exponent in use: `focal_gamma`, or 0 for plain set cross-entropy."""
        return float(self.focal_gamma) if self.loss_type == "focal" else 0.0

    def compute_set_loss(self, allowed, logits):
        """The training loss (scalar): allowed [B,H,W,4], logits [B,H,W,3].

        `ce_dice`: set cross-entropy averaged over labelled pixels + batch soft Dice over GGO
        and consolidation; `focal`/`ce`: mean over pixels of −(1 − p_S')^γ log p_S'.
        """
        sets = lesion_sets(allowed)
        if self.loss_type != "ce_dice":
            return ops.mean(lik.focal_set_loss(logits, sets, self.gamma))
        labelled = ops.cast(ops.sum(sets, -1) < NUM_LESION_CLASSES - 0.5, "float32")
        n = ops.sum(labelled)
        ce = ops.sum(lik.set_cross_entropy(logits, sets)) / ops.maximum(n, 1.0)
        dice = lik.soft_set_dice_loss(logits, sets, (1, 2))
        return ce + ops.cast(n > 0, "float32") * dice

    def _clip(self, grads):
        return clip_gradients(
            grads, self.optimizer, self.clipnorm, self.clipvalue, self.global_clipnorm
        )

    #: whether `perturbed_logits` exists: UniMatch's feature-perturbed pass (U-Net only)
    feature_perturbation = False

    def perturbed_logits(self, x):
        """The feature-perturbed pass of the consistency term (see `feature_perturbation`)."""
        raise NotImplementedError(f"{type(self).__name__} has no feature-perturbed pass")

    def consistency_term(self, data, logits):
        """Weak-to-strong consistency on the batch's unlabelled pixels (`models.consistency`):
        teacher and student in training mode (batch statistics), as in FixMatch. `logits` is
        this step's forward on the batch: with the model as its own teacher, the teacher's
        view of the weak slices is that forward, not a second one."""

        def teacher_probs(x_u, keep):
            if self.consistency.teacher == "ema":  # the teacher's weights: a pass of its own
                teacher = self(x_u, training=True)
            else:
                teacher = tf.boolean_mask(logits, keep)
            return ops.softmax(ops.cast(teacher, "float32"), axis=-1)

        def student_logits(x_s):
            return self(x_s, training=True)

        def perturbed(x_u, keep):
            return self.perturbed_logits(x_u)

        return self.consistency.loss(
            data,
            self.optimizer.iterations,
            teacher_probs,
            student_logits,
            perturbed if self.feature_perturbation else None,
        )

    def _update_metrics(self, loss, allowed, logits, finite=None, extra=()):
        update_if_finite(self.loss_tracker, loss, True if finite is None else finite)
        for tracker, value in zip(self.consistency_trackers, extra, strict=False):
            update_if_finite(tracker, value, finite)
        # 3-class ids -> 4-class ids: no lesion -> healthy (only the lesion Dice are tracked)
        predicted = ops.argmax(logits, axis=-1) + HEALTHY
        for dice in self.dice:
            dice.update_state(ops.cast(allowed, "float32"), predicted)
        logs = {m.name: m.result() for m in self.metrics}
        if finite is None:  # evaluation: no gradients, nothing skipped, no consistency
            for m in (self.skipped, *self.consistency_trackers):
                logs.pop(m.name)
        return self.step_logs(logs)

    def train_step(self, data):
        x, allowed = data["x"], data["allowed"]
        with tf.GradientTape() as tape:
            logits = self(x, training=True)
            loss = self.compute_set_loss(allowed, logits)
            extra = ()
            if self.consistency.on:
                extra = self.consistency_term(data, logits)
                loss = loss + extra[0]
            scaled = self.optimizer.scale_loss(replica_loss(loss))
        variables = self.trainable_variables
        grads = self._clip(tape.gradient(scaled, variables))
        grads, finite = skip_non_finite(grads, self.optimizer, self.skipped)
        self.optimizer.apply(grads, variables)
        self.consistency.update_teacher(self.optimizer.iterations)
        return self._update_metrics(loss, allowed, logits, finite, extra)

    def test_step(self, data):
        x, allowed = data["x"], data["allowed"]
        logits = self(x, training=False)
        loss = self.compute_set_loss(allowed, logits)
        return self._update_metrics(loss, allowed, logits, finite=None)

    def class_probabilities(self, logits, lung):
        """3-class logits [B,H,W,3] + lung field [B,H,W,1] -> 4-class probabilities [B,H,W,4].

        Outside the lung field background is certain; inside, the no-lesion probability is
        healthy lung's and background is impossible.
        """
        probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)
        lung = ops.cast(lung, "float32")
        return ops.concatenate([1.0 - lung, lung * probs], axis=-1)

    def segmentation_probabilities(self, x, lung, decision: str | None = None):
        """x [B,H,W,1], lung field [B,H,W,1] -> class probabilities [B,H,W,4] (BatchNorm in
        inference mode), as exported for serving; `decision` is accepted for a common API
        (`segment` refuses it)."""
        return self.class_probabilities(self(ops.cast(x, "float32"), training=False), lung)


# --------------------------------------------------------------------------- models


@_register
class UNet(SetSupervisedMixin, keras.Model):
    """U-Net on Keras' MobileNetV2 encoder: x [B, H, W, 1] in [0, 1] -> logits [B, H, W, 3].

    H, W multiples of 32. Skips at `UNET_SKIPS` (strides 2–16), bottleneck `block_16_project`
    (stride 32); each decoder block is Conv2DTranspose 3×3 stride 2 → BN → ReLU, concatenate
    the skip, conv 3×3 → BN → ReLU, with 256/128/64/32 × `width` filters; a last
    Conv2DTranspose 3×3 stride 2 gives the logits at full resolution.

    Args:
        width: width multiplier of the decoder.
        alpha: MobileNetV2's width multiplier (the encoder is built from scratch, one channel).
        loss: "ce_dice" (set cross-entropy + soft Dice, the default), "focal" (the set focal
            loss with γ = `focal_gamma`, the paper's) or "ce" (γ = 0).
        focal_gamma: γ of the focal loss.
        clipnorm, clipvalue: per-variable gradient clipping in `train_step`; None to disable.
        global_clipnorm: global-norm gradient clipping (None to disable).
        intensity: the preprocessing the model was trained with (`none` or `standardise`).
        seed: seeds the weight initialisation (None: Keras' usual random initialisation).
        consistency_weight, consistency_threshold, consistency_rampup, teacher,
            teacher_decay, consistency_strong, consistency_align, consistency_balance: the
            weak-to-strong consistency term (`models.consistency`; weight 0, the default,
            turns it off).

    Example:
        >>> import numpy as np
        >>> model = UNet(width=0.125, alpha=0.35, seed=0)
        >>> tuple(model(np.zeros((1, 64, 64, 1), "float32")).shape)
        (1, 64, 64, 3)
    """

    def __init__(
        self,
        width: float = 1.0,
        alpha: float = 1.0,
        loss: str = "ce_dice",
        focal_gamma: float = 2.0,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        seed: int | None = None,
        global_clipnorm: float | None = DEFAULT_GLOBAL_CLIPNORM,
        intensity: str = "none",
        consistency_weight: float = CONSISTENCY_DEFAULTS["consistency_weight"],
        consistency_threshold: float = CONSISTENCY_DEFAULTS["consistency_threshold"],
        consistency_rampup: int = CONSISTENCY_DEFAULTS["consistency_rampup"],
        teacher: str = CONSISTENCY_DEFAULTS["teacher"],
        teacher_decay: float = CONSISTENCY_DEFAULTS["teacher_decay"],
        consistency_strong: str = CONSISTENCY_DEFAULTS["consistency_strong"],
        consistency_align: bool = CONSISTENCY_DEFAULTS["consistency_align"],
        consistency_balance: float = CONSISTENCY_DEFAULTS["consistency_balance"],
        **kwargs,
    ):
        self._check_options(loss)
        consistency = consistency_options(
            consistency_weight,
            consistency_threshold,
            consistency_rampup,
            teacher,
            teacher_decay,
            consistency_strong,
            consistency_align,
            consistency_balance,
        )
        filters = scaled_filters(width, UNET_FILTERS)
        with seeded(seed):
            # === Layers ===
            mobilenet = keras.applications.MobileNetV2(
                input_shape=(None, None, 1), include_top=False, weights=None, alpha=alpha
            )
            set_bn_momentum(mobilenet)
            self.encoder = keras.Model(
                mobilenet.input,
                [mobilenet.get_layer(n).output for n in (*UNET_SKIPS, UNET_BOTTOM)],
                name="encoder",
            )
            self.upsample = [
                keras.Sequential(
                    [
                        layers.Conv2DTranspose(f, 3, strides=2, padding="same", use_bias=False),
                        layers.BatchNormalization(),
                        layers.ReLU(),
                    ],
                    name=f"up_{i + 1}",
                )
                for i, f in enumerate(filters)
            ]
            self.fuse = [_conv_bn_relu(f, f"fuse_{i + 1}") for i, f in enumerate(filters)]
            self.head = layers.Conv2DTranspose(
                NUM_LESION_CLASSES, 3, strides=2, padding="same", dtype="float32", name="logits"
            )
            # === Functional model ===
            x = keras.Input((None, None, 1), name="x")
            # MobileNetV2 expects inputs in [-1, 1]
            h = layers.Rescaling(2.0, -1.0, name="to_unit_range")(x)
            *skips, h = self.encoder(h)
            for i, skip in enumerate(reversed(skips)):
                h = self.upsample[i](h)
                h = layers.Concatenate(name=f"skip_{i + 1}")([h, skip])
                h = self.fuse[i](h)
            logits = self.head(h)
            super().__init__(inputs=x, outputs=logits, **kwargs)
        # === Config ===
        self.width, self.alpha = width, alpha
        self._init_training(
            loss, focal_gamma, clipnorm, clipvalue, seed, global_clipnorm, intensity, consistency
        )

    feature_perturbation = True

    def perturbed_logits(self, x, rate: float = 0.5):
        """UniMatch's feature perturbation: the decoder on the encoder's skips and bottleneck
        with channel dropout (`rate`), training mode. x [B,H,W,1] -> logits [B,H,W,3]."""
        h = ops.cast(x, self.compute_dtype) * 2.0 - 1.0  # as the `to_unit_range` layer

        def drop(t):
            shape = ops.stack([ops.shape(t)[0], 1, 1, ops.shape(t)[-1]])
            keep = ops.cast(tf.random.uniform(shape) >= rate, t.dtype)
            return t * keep / (1.0 - rate)

        *skips, h = [drop(t) for t in self.encoder(h, training=True)]
        for i, skip in enumerate(reversed(skips)):
            h = self.upsample[i](h, training=True)
            h = self.fuse[i](ops.concatenate([h, skip], axis=-1), training=True)
        return self.head(h)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "width": self.width,
            "alpha": self.alpha,
        } | self._training_config()


@_register
class SegNet(SetSupervisedMixin, keras.Model):
    """SegNet: x [B, H, W, 1] in [0, 1] -> logits [B, H, W, 3]; H, W multiples of 32.

    Encoder: VGG16's 13 convs 3×3 → BN → ReLU in stages of 2, 2, 3, 3, 3 with 64, 128, 256,
    512, 512 × `width` filters, each stage ending in a 2×2 max pool that keeps its argmax
    (applied before the stage's last ReLU, which gives the same result).
    Decoder, mirrored: per stage a max-unpooling to those argmax positions, then as many convs
    3×3 → BN → ReLU, the last of a stage narrowing to the next stage's filters; the very last
    conv (3×3, no BN/ReLU) gives the logits. 13 + 13 convs.

    Args:
        width: width multiplier of all convs.
        loss: "ce_dice" (set cross-entropy + soft Dice, the default), "focal" (the set focal
            loss with γ = `focal_gamma`, the paper's) or "ce" (γ = 0).
        focal_gamma: γ of the focal loss.
        clipnorm, clipvalue: per-variable gradient clipping in `train_step`; None to disable.
        global_clipnorm: global-norm gradient clipping (None to disable).
        intensity: the preprocessing the model was trained with (`none` or `standardise`).
        seed: seeds the weight initialisation (None: Keras' usual random initialisation).
        consistency_weight, consistency_threshold, consistency_rampup, teacher,
            teacher_decay, consistency_strong, consistency_align, consistency_balance: the
            weak-to-strong consistency term (`models.consistency`; weight 0, the default,
            turns it off).

    Example:
        >>> import numpy as np
        >>> model = SegNet(width=0.125, seed=0)
        >>> tuple(model(np.zeros((1, 64, 96, 1), "float32")).shape)
        (1, 64, 96, 3)
    """

    def __init__(
        self,
        width: float = 1.0,
        loss: str = "ce_dice",
        focal_gamma: float = 2.0,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        seed: int | None = None,
        global_clipnorm: float | None = DEFAULT_GLOBAL_CLIPNORM,
        intensity: str = "none",
        consistency_weight: float = CONSISTENCY_DEFAULTS["consistency_weight"],
        consistency_threshold: float = CONSISTENCY_DEFAULTS["consistency_threshold"],
        consistency_rampup: int = CONSISTENCY_DEFAULTS["consistency_rampup"],
        teacher: str = CONSISTENCY_DEFAULTS["teacher"],
        teacher_decay: float = CONSISTENCY_DEFAULTS["teacher_decay"],
        consistency_strong: str = CONSISTENCY_DEFAULTS["consistency_strong"],
        consistency_align: bool = CONSISTENCY_DEFAULTS["consistency_align"],
        consistency_balance: float = CONSISTENCY_DEFAULTS["consistency_balance"],
        **kwargs,
    ):
        self._check_options(loss)
        consistency = consistency_options(
            consistency_weight,
            consistency_threshold,
            consistency_rampup,
            teacher,
            teacher_decay,
            consistency_strong,
            consistency_align,
            consistency_balance,
        )
        filters = scaled_filters(width, SEGNET_FILTERS)
        with seeded(seed):
            # === Layers ===
            # A stage's last ReLU comes after its pool: ReLU is monotonic, so the pooled values
            # and the unpooled maps are the same, and TensorFlow's Grappler would otherwise
            # rewrite MaxPoolWithArgmax(Relu(h)) in inference graphs, wire the argmax to the
            # Relu and give up optimising the whole function.
            self.encoder_convs = [
                [_conv_bn_relu(f, f"enc_{s + 1}_{k + 1}", relu=k < n - 1) for k in range(n)]
                for s, (n, f) in enumerate(zip(SEGNET_STAGES, filters, strict=True))
            ]
            self.pools = [MaxPoolWithArgmax(2, name=f"pool_{s + 1}") for s in range(5)]
            self.unpools = [MaxUnpool(2, name=f"unpool_{s + 1}") for s in range(5)]
            self.decoder_convs = []
            for s, (n, f) in enumerate(zip(SEGNET_STAGES, filters, strict=True)):
                out = filters[s - 1] if s > 0 else None
                stage = [_conv_bn_relu(f, f"dec_{s + 1}_{k + 1}") for k in range(n - 1)]
                if out is None:
                    stage.append(
                        layers.Conv2D(
                            NUM_LESION_CLASSES, 3, padding="same", dtype="float32", name="logits"
                        )
                    )
                else:
                    stage.append(_conv_bn_relu(out, f"dec_{s + 1}_{n}"))
                self.decoder_convs.append(stage)
            # === Functional model ===
            x = keras.Input((None, None, 1), name="x")
            h = x
            argmaxes = []
            for s, (convs, pool) in enumerate(zip(self.encoder_convs, self.pools, strict=True)):
                for conv in convs:
                    h = conv(h)
                h, argmax = pool(h)
                h = layers.ReLU(name=f"pool_{s + 1}_relu")(h)
                argmaxes.append(argmax)
            for s in reversed(range(5)):
                h = self.unpools[s]([h, argmaxes[s]])
                for conv in self.decoder_convs[s]:
                    h = conv(h)
            super().__init__(inputs=x, outputs=h, **kwargs)
        # === Config ===
        self.width = width
        self._init_training(
            loss, focal_gamma, clipnorm, clipvalue, seed, global_clipnorm, intensity, consistency
        )

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "width": self.width,
        } | self._training_config()
