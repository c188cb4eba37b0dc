"""StitchNet: the SVAE topped by a head that predicts a segmentation and four Beta "styles".

p(y | z) = Categorical(π(z)); p(x | y = k, z) = Beta(α_k(z), β_k(z)) per pixel: the CT is
rebuilt by stitching the styles (background, healthy, GGO, consolidation) together by the
segmentation. Every batch carries per-pixel allowed-class sets, so labelled, partially labelled
and unlabelled slices train through one loss: −ELBO with the label marginalised over its set.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers, ops

from stitchnet_tf import likelihood as lik
from stitchnet_tf.data.classes import BACKGROUND, CON, GGO, NUM_CLASSES
from stitchnet_tf.data.intensity import check_intensity
from stitchnet_tf.models.backbone import Backbone
from stitchnet_tf.models.base import SegmentationModel, SetDice, seeded
from stitchnet_tf.models.consistency import Consistency, consistency_options
from stitchnet_tf.models.gradients import (
    GradientMonitor,
    clip_gradients,
    replica_loss,
    skip_non_finite,
    update_if_finite,
)
from stitchnet_tf.models.ladder import SVAELadder
from stitchnet_tf.models.layers import LightSmooth, Upsample
from stitchnet_tf.options import (
    CONSISTENCY_DEFAULTS,
    DECISIONS,
    DEFAULT_GLOBAL_CLIPNORM,
    DEFAULT_HEAD_SKIPS,
    LIKELIHOODS,
    STITCHNET_DEFAULTS,
    STYLE_MODES,
    SUPERVISED,
    check_model_size,
)

#: sigmoid⁻¹ of the fixed background style mean (about 0.001)
BACKGROUND_MEAN_LOGIT = -7.0
#: Initial bias of the ordered style-mean conv: healthy logit −1.4, then softplus⁻¹ of the
#: increments to GGO (+0.9) and consolidation (+1.0): means 0.20, 0.38, 0.62.
ORDERED_MEAN_BIAS = [0.0, -1.4, 0.352, 0.541]


def ordered_logits(raw):
    """Raw style-mean logits [..., 4] -> logits with healthy < GGO < consolidation: the
    healthy logit, then cumulative softplus increments (background passes through)."""
    background, healthy = raw[..., :1], raw[..., 1:2]
    ggo = healthy + ops.softplus(raw[..., 2:3])
    con = ggo + ops.softplus(raw[..., 3:4])
    return ops.concatenate([background, healthy, ggo, con], axis=-1)


@keras.saving.register_keras_serializable(package="stitchnet_tf")
class StitchHead(layers.Layer):
    """features [B, H/2, W/2, f_1] -> pi_logits, alpha, beta, each [B, H, W, 4] float32.

    Upsample (×2 resize → conv) to full size → LightSmooth → 1×1 convs. The styles are Beta
    distributions with bounded parameters: mean m_k = sigmoid(·) and concentration
    κ_k ∈ [2, 500] (`likelihood.beta_from_mean_concentration`), α = m κ, β = (1 − m) κ, so no
    density spikes. With `style_pool` > 1 the style parameters are predicted at 1/style_pool
    resolution and upsampled bilinearly (less flexible styles: docs/DESIGN.md). With
    `style_mode="image"` each class has one Beta per image (from the spatial mean of the
    features), so the styles cannot copy the image and r_k ∝ π_k Beta_k(x) on an unlabelled
    pixel is an intensity-informed posterior; with `ordered_styles` the means of healthy, GGO
    and consolidation are increasing (cumulative softplus in logit space; DESIGN §7.16).

    With `skips` > 0 (`head_skips`, a departure from the paper, see docs/DESIGN.md) the
    segmentation branch also sees deterministic features of the image: the backbone's d_1
    [B, H/2, W/2, f_1] projected to `skips` channels and upsampled, and x itself
    [B, H, W, 1]; they join the latent features in a LightSmooth before the π convolution.
    The styles stay a function of z alone, so generation needs no image for them. With skips
    the head also predicts `pi_z_logits` [B, H, W, 4] from z alone: the generative model's
    p(y | z), trained on the label sets of every pixel and used by `generate` (DESIGN §7.15).
    """

    def __init__(
        self,
        filters: int = 16,
        style_pool: int = 1,
        norm: str = "batch",
        skips: int = 0,
        upsample: str = "resize",
        style_mode: str = "pixel",
        ordered_styles: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if style_mode not in STYLE_MODES:
            raise ValueError(f"style_mode must be one of {STYLE_MODES}, got {style_mode!r}")
        self.filters, self.style_pool, self.norm = int(filters), int(style_pool), norm
        self.skips, self.upsample = int(skips), upsample
        self.style_mode, self.ordered_styles = style_mode, bool(ordered_styles)
        policy = self.dtype_policy
        self.up = Upsample(self.filters, norm=norm, mode=upsample, dtype=policy)
        self.smooth = LightSmooth(self.filters, norm=norm, dtype=policy)
        if self.skips:
            self.skip_proj = layers.Conv2D(self.skips, 1, dtype=policy, name="skip_proj")
            self.skip_up = layers.UpSampling2D(2, interpolation="nearest", dtype=policy)
            self.pi_smooth = LightSmooth(self.filters, norm=norm, dtype=policy)
            self.pi_z = layers.Conv2D(NUM_CLASSES, 1, dtype="float32", name="pi_z_logits")
        self.pi = layers.Conv2D(NUM_CLASSES, 1, dtype="float32", name="pi_logits")
        # ordered: healthy, GGO, CON start at means 0.2, 0.38, 0.62 (the lung-field medians)
        self.style_mean = layers.Conv2D(
            NUM_CLASSES,
            1,
            bias_initializer=keras.initializers.Constant(ORDERED_MEAN_BIAS)
            if self.ordered_styles
            else "zeros",
            dtype="float32",
            name="style_mean",
        )
        # styles start broad (κ ≈ 10): no huge first reconstruction gradients
        self.style_concentration = layers.Conv2D(
            NUM_CLASSES,
            1,
            bias_initializer=keras.initializers.Constant(-4.0),
            dtype="float32",
            name="style_concentration",
        )
        if self.style_pool > 1:
            self.pool = layers.AveragePooling2D(self.style_pool, dtype=policy)
            self.unpool = layers.UpSampling2D(
                self.style_pool, interpolation="bilinear", dtype="float32"
            )

    def call(self, features, skip=None, x=None, training=None, styles=True):
        """`skip` d_1 [B,H/2,W/2,f] and `x` [B,H,W,1] feed the π branch when `skips` > 0."""
        h = self.smooth(self.up(features, training=training), training=training)
        g = h
        if self.skips:
            s = self.skip_up(ops.relu(self.skip_proj(skip)))
            g = ops.concatenate([h, ops.cast(s, h.dtype), ops.cast(x, h.dtype)], axis=-1)
            g = self.pi_smooth(g, training=training)
        pi_logits = self.pi(g)
        if not styles:  # the prior decision rule needs pi only
            return {"pi_logits": pi_logits}
        out = {"pi_logits": pi_logits, **self._styles(h)}
        if self.skips:
            out["pi_z_logits"] = self.pi_z(h)
        return out

    def generate(self, features, training=None):
        """From the latent features alone (no image): pi_logits (p(y | z): `pi_z` with skips),
        alpha, beta [B, H, W, 4]."""
        h = self.smooth(self.up(features, training=training), training=training)
        pi = self.pi_z if self.skips else self.pi
        return {"pi_logits": pi(h), **self._styles(h)}

    def _styles(self, h) -> dict:
        """alpha, beta [B, H, W, 4] float32 from the latent features h."""
        if self.style_mode == "image":
            s = ops.mean(ops.cast(h, "float32"), axis=(1, 2), keepdims=True)  # [B, 1, 1, f]
        else:
            s = self.pool(h) if self.style_pool > 1 else h
        mean, concentration = self.style_mean(s), self.style_concentration(s)
        if self.ordered_styles:
            mean = ordered_logits(mean)
        if self.style_mode == "image":  # one Beta per class per image: [B, 1, 1, 4] -> full size
            # × ones, not + zeros: Grappler folds that add into the conv's BiasAdd and fails
            full = ops.ones_like(ops.cast(h[..., :1], "float32"))
            mean, concentration = mean * full, concentration * full
        elif self.style_pool > 1:
            mean, concentration = self.unpool(mean), self.unpool(concentration)
        # the background style is fixed near 0: preprocessing zeroes x outside the lung field,
        # and known-background pixels are left out of the reconstruction term
        fixed = ops.convert_to_tensor([1.0, 0.0, 0.0, 0.0], "float32")
        mean = mean * (1.0 - fixed) + BACKGROUND_MEAN_LOGIT * fixed
        concentration = concentration * (1.0 - fixed) + 20.0 * fixed
        alpha, beta = lik.beta_from_mean_concentration(mean, concentration)
        return {"alpha": alpha, "beta": beta}

    def get_config(self):
        return super().get_config() | {
            "filters": self.filters,
            "style_pool": self.style_pool,
            "norm": self.norm,
            "skips": self.skips,
            "upsample": self.upsample,
            "style_mode": self.style_mode,
            "ordered_styles": self.ordered_styles,
        }


@keras.saving.register_keras_serializable(package="stitchnet_tf")
class StitchNet(SegmentationModel, keras.Model):
    """StitchNet (Zammit et al. 2022) as a Keras model with a semi-supervised `train_step`.

    Call it on x [B, H, W, 1] in [0, 1] (H, W multiples of 32) to get a dict of pi_logits,
    alpha, beta [B, H, W, 4] and kl [B, 5] (per-level KL, summed over latent pixels). Train with
    `fit` on batches {"x", "allowed"} (see `stitchnet_tf.data.pipeline`).

    The loss, in nats per lung pixel (pixels whose allowed set is not {background}):
        loss = recon + w_kl · kl + w_sup · supervised
    recon = −log p(x, y ∈ S | z) averaged over lung pixels (x dequantised in training); kl =
    Σ_i KL_i over latent pixels divided by the image's lung pixels; supervised = set-aware
    cross-entropy (over labelled pixels) + soft Dice over GGO and consolidation (`ce_dice`,
    nnU-Net's DC+CE), or the authors' set focal loss (`focal`).

    Args:
        width: width multiplier of the ladder (1.0 = the paper's 32…512 channels).
        backbone_alpha: MobileNetV2's width multiplier.
        backbone_weights: None (from scratch) or a path to ImageNet MobileNetV2 weights.
        backbone_rgb: build the three-channel backbone (set on reload of an ImageNet model).
        head_filters: channels of the full-resolution head (default 16 × width, at least 16).
        light_c: LightSmooth instead of Smooth at the end of mapping (c).
        style_pool: predict style parameters at 1/style_pool resolution.
        style_mode: `pixel` (per-pixel styles, the paper) or `image` (one Beta per class per
            image: the styles cannot copy the image).
        ordered_styles: style means increasing from healthy to GGO to consolidation.
        kl: `analytic` or `mc` (single-sample, the authors') per-level KL.
        likelihood: `exact` (log Σ_{k∈S} π_k Beta_k(x), the paper) or `jensen` (the authors'
            code: Σ_k π_k (−log Beta_k(x)), labels only through the supervised term).
        supervised: `ce_dice` (default) or `focal` (the authors': −(1 − p_S)^γ log p_S).
        supervised_weight: weight of the supervised term (authors: 100 with `focal`).
        generative_weight: weight of −log p(y ∈ A | z) from the z-only π of a skip head
            (DESIGN §7.15). Default 0: it cost segmentation accuracy in a first A/B; `generate`
            then draws labels through a blank-image draft pass instead.
        focal_gamma: γ of the focal loss (authors: 2).
        kl_weight: weight of the KL (after warm-up).
        kl_warmup_steps: linear KL warm-up from 0 over this many steps (0 = none).
        free_bits: per-level free bits, in nats per latent pixel (0 = none).
        eps: x is clipped to [eps, 1 − eps] in the Beta density.
        decision: `prior` (π(z) alone) or `posterior` (r_k ∝ π_k Beta_k(x), uses the pixel's
            intensity), for metrics and `segment`.
        global_clipnorm: clip the global gradient norm to this (None: off; default).
        clipnorm, clipvalue: the paper's per-variable clipping (1.0, 0.5); None to disable.
        seed: seeds the latent samples and the dequantisation noise.
        norm: normalisation in the ladder and head blocks: `group` (default: batch-independent,
            so the two uses of the shared mapping (b) never share statistics and inference
            equals training) or `batch` (the paper).
        head_skips: channels of a deterministic skip from the backbone's d_1 into the head
            (0 = none, the paper).
        upsample: `resize` (×2 resize then conv) or `transpose` (the paper's 4×4 stride 2).
        intensity: the preprocessing the model was trained with, `none` or `standardise`
            (`data.intensity.standardise`); `Predictor`, `evaluate` and the exports follow it.
        consistency_weight, consistency_threshold, consistency_rampup, teacher,
            teacher_decay, consistency_strong, consistency_align, consistency_balance: the
            weak-to-strong consistency term (`models.consistency`; weight 0, the default,
            turns it off).
    """

    stochastic = True  # z can be sampled, and two decision rules

    def __init__(
        self,
        width: float = 0.5,
        backbone_alpha: float = 1.0,
        backbone_weights: str | None = None,
        backbone_rgb: bool = False,
        head_filters: int | None = None,
        light_c: bool = True,
        style_pool: int = STITCHNET_DEFAULTS["style_pool"],
        style_mode: str = STITCHNET_DEFAULTS["style_mode"],
        ordered_styles: bool = STITCHNET_DEFAULTS["ordered_styles"],
        kl: str = STITCHNET_DEFAULTS["kl"],
        likelihood: str = STITCHNET_DEFAULTS["likelihood"],
        supervised: str = STITCHNET_DEFAULTS["supervised"],
        supervised_weight: float = STITCHNET_DEFAULTS["supervised_weight"],
        generative_weight: float = STITCHNET_DEFAULTS["generative_weight"],
        focal_gamma: float = STITCHNET_DEFAULTS["focal_gamma"],
        kl_weight: float = 1.0,
        kl_warmup_steps: int = STITCHNET_DEFAULTS["kl_warmup_steps"],
        free_bits: float = STITCHNET_DEFAULTS["free_bits"],
        eps: float = lik.DEFAULT_EPS,
        decision: str = STITCHNET_DEFAULTS["decision"],
        global_clipnorm: float | None = DEFAULT_GLOBAL_CLIPNORM,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        seed: int | None = None,
        norm: str = STITCHNET_DEFAULTS["norm"],
        head_skips: int = DEFAULT_HEAD_SKIPS,
        upsample: str = "resize",
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
        check_intensity(intensity)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
        if supervised not in SUPERVISED:
            raise ValueError(f"supervised must be one of {SUPERVISED}, got {supervised!r}")
        head_filters = int(head_filters or max(16, round(16 * width)))
        # === Layers === (initialised from `seed`: the same seed, the same initial weights)
        with seeded(seed):
            self.backbone = Backbone(
                width, backbone_alpha, backbone_weights, backbone_rgb, name="backbone"
            )
            self.ladder = SVAELadder(
                self.backbone.filters, light_c, kl, seed, norm, upsample, name="svae"
            )
            self.head = StitchHead(
                head_filters,
                style_pool,
                norm,
                int(head_skips),
                upsample,
                style_mode,
                ordered_styles,
                name="stitch_head",
            )
            self.head_skips, self.upsample = int(head_skips), upsample
            # === Functional model ===
            x = keras.Input((None, None, 1), name="x")
            super().__init__(inputs=x, outputs=self.forward(x), **kwargs)
        # === Config ===
        self.width, self.backbone_alpha, self.backbone_rgb = (
            width,
            backbone_alpha,
            bool(backbone_rgb or backbone_weights is not None),
        )
        self.head_filters, self.light_c, self.style_pool = head_filters, light_c, style_pool
        self.kl, self.likelihood, self.supervised = kl, likelihood, supervised
        self.supervised_weight, self.focal_gamma = supervised_weight, focal_gamma
        self.generative_weight = float(generative_weight)
        self.kl_weight, self.kl_warmup_steps = kl_weight, kl_warmup_steps
        self.free_bits, self.eps, self.decision, self.seed = free_bits, eps, decision, seed
        self.global_clipnorm, self.clipnorm, self.clipvalue = global_clipnorm, clipnorm, clipvalue
        self.norm, self.intensity = norm, intensity
        self.noise_seed = keras.random.SeedGenerator(None if seed is None else seed + 1)
        self.consistency = Consistency(
            self,
            **consistency_options(
                consistency_weight,
                consistency_threshold,
                consistency_rampup,
                teacher,
                teacher_decay,
                consistency_strong,
                consistency_align,
                consistency_balance,
            ),
            seed=seed,
        )
        # === Metrics ===
        self.trackers = {
            name: keras.metrics.Mean(name=name)
            for name in ("loss", "recon", "generative", "kl", "supervised")
            + (("consistency", "confident") if self.consistency.on else ())
            + tuple(f"kl_{i + 1}" for i in range(self.ladder.levels))
        }
        self.gradient_monitor = GradientMonitor(
            ["backbone", *(f"level_{i + 1}" for i in range(self.ladder.levels)), "head"]
        )
        self.skipped = keras.metrics.Mean(name="skipped")  # share of steps with non-finite grads
        self.dice = [SetDice(GGO), SetDice(CON), SetDice((GGO, CON), name="dice_lesion")]

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "intensity": self.intensity,
            "width": self.width,
            "backbone_alpha": self.backbone_alpha,
            "backbone_rgb": self.backbone_rgb,
            "head_filters": self.head_filters,
            "light_c": self.light_c,
            "style_pool": self.style_pool,
            "style_mode": self.head.style_mode,
            "ordered_styles": self.head.ordered_styles,
            "kl": self.kl,
            "likelihood": self.likelihood,
            "supervised": self.supervised,
            "supervised_weight": self.supervised_weight,
            "generative_weight": self.generative_weight,
            "focal_gamma": self.focal_gamma,
            "kl_weight": self.kl_weight,
            "kl_warmup_steps": self.kl_warmup_steps,
            "free_bits": self.free_bits,
            "eps": self.eps,
            "decision": self.decision,
            "lesion_offset": float(self.lesion_offset),
            "global_clipnorm": self.global_clipnorm,
            "clipnorm": self.clipnorm,
            "clipvalue": self.clipvalue,
            "seed": self.seed,
            "norm": self.norm,
            "head_skips": self.head_skips,
            "upsample": self.upsample,
            **self.consistency.config(),
        }

    @classmethod
    def authors(cls, **overrides) -> StitchNet:
        """The authors' model and objective: paper widths, BatchNorm, transposed convolutions,
        Jensen bound, focal loss ×100 (γ = 2), MC KL, per-variable clipping."""
        options = dict(
            width=1.0,
            light_c=False,
            norm="batch",
            likelihood="jensen",
            supervised="focal",
            supervised_weight=100.0,
            focal_gamma=2.0,
            kl="mc",
            global_clipnorm=None,
            clipnorm=1.0,
            clipvalue=0.5,
            head_skips=0,
            upsample="transpose",
        )
        return cls(**(options | overrides))

    # ------------------------------------------------------------------ forward

    def forward(self, x, training=None, sample=None, kl: bool = True, styles: bool = True):
        """The one forward path: backbone → shared ladder → head.

        x [B, H, W, 1] -> {pi_logits, alpha, beta [B, H, W, 4] (no alpha/beta when not
        `styles`), kl [B, L] (when `kl`)}. z is sampled when `sample` (default: when
        training), else the posterior mean. Every other entry point (the functional graph,
        `segmentation_probabilities`, `calibration_forward`, sampled `segment`) calls this.
        """
        ds = self.backbone(x, training=training)
        lad = self.ladder(ds, training=training, sample=sample, kl=kl)
        if self.head_skips:
            x32 = ops.cast(x, self.head.compute_dtype)
            out = self.head(lad["features"], ds[0], x32, training=training, styles=styles)
        else:
            out = self.head(lad["features"], training=training, styles=styles)
        if kl:
            out["kl"] = lad["kl"]
        return out

    # ------------------------------------------------------------------ losses

    @property
    def metrics(self):
        return [*self.trackers.values(), *self.gradient_monitor.metrics, self.skipped, *self.dice]

    def _kl_scale(self):
        if self.kl_warmup_steps <= 0 or self.optimizer is None:
            return ops.convert_to_tensor(self.kl_weight, "float32")
        step = ops.cast(self.optimizer.iterations, "float32")
        return self.kl_weight * ops.minimum(1.0, step / float(self.kl_warmup_steps))

    def dequantise(self, x):
        """x + U(−½, ½)/255 inside the lung field (0 stays 0): the 8-bit CT becomes a
        continuous variable for the Beta density."""
        x = ops.cast(x, "float32")
        noise = keras.random.uniform(ops.shape(x), -0.5, 0.5, seed=self.noise_seed) / 255.0
        return ops.where(x > 0, ops.clip(x + noise, 0.0, 1.0), x)

    def compute_terms(self, x, allowed, outputs) -> dict:
        """The loss terms, each a scalar in nats per lung pixel (see the class docstring).

        x [B,H,W,1]; allowed [B,H,W,4]; outputs of `forward`. Lung pixels are those whose
        allowed set is not exactly {background}; the KL of an image is divided by its lung
        pixels. Returns loss, recon, kl, supervised and kl_levels [L].
        """
        x = ops.cast(x, "float32")
        allowed = ops.cast(allowed, "float32")
        pi_logits, alpha, beta = outputs["pi_logits"], outputs["alpha"], outputs["beta"]
        only_background = (allowed[..., BACKGROUND] > 0.5) & (ops.sum(allowed, -1) < 1.5)
        lung = 1.0 - ops.cast(only_background, "float32")  # [B, H, W]
        lung_pixels = ops.maximum(ops.sum(lung), 1.0)
        if self.likelihood == "exact":
            per_pixel = -lik.stitch_log_likelihood(x, pi_logits, alpha, beta, allowed, self.eps)
        else:
            per_pixel = lik.jensen_reconstruction_loss(x, pi_logits, alpha, beta, self.eps)
        recon = ops.sum(per_pixel * lung) / lung_pixels
        if self.supervised == "ce_dice":
            labelled = ops.cast(ops.sum(allowed, -1) < NUM_CLASSES - 0.5, "float32")
            ce = ops.sum(lik.set_cross_entropy(pi_logits, allowed)) / ops.maximum(
                ops.sum(labelled), 1.0
            )
            has_labels = ops.cast(ops.sum(labelled) > 0, "float32")
            supervised = ce + has_labels * lik.soft_set_dice_loss(pi_logits, allowed, (GGO, CON))
        else:
            supervised = ops.sum(lik.focal_set_loss(pi_logits, allowed, self.focal_gamma) * lung)
            supervised = supervised / lung_pixels
        generative = ops.convert_to_tensor(0.0, "float32")
        if "pi_z_logits" in outputs:  # −log p(y ∈ A | z) of every pixel (background included)
            generative = ops.sum(lik.set_cross_entropy(outputs["pi_z_logits"], allowed))
            generative = generative / lung_pixels
        kl_levels = ops.sum(ops.cast(outputs["kl"], "float32"), axis=0)  # [L], nats per batch
        if self.free_bits > 0:
            h, w = ops.shape(x)[1], ops.shape(x)[2]
            latent_pixels = ops.cast(
                ops.stack([(h // 2**i) * (w // 2**i) for i in range(1, self.ladder.levels + 1)]),
                "float32",
            ) * ops.cast(ops.shape(x)[0], "float32")
            kl_levels = ops.maximum(kl_levels, self.free_bits * latent_pixels)
        kl_levels = kl_levels / lung_pixels
        kl = ops.sum(kl_levels)
        loss = (
            recon
            + self.generative_weight * generative
            + self._kl_scale() * kl
            + self.supervised_weight * supervised
        )
        return {
            "loss": loss,
            "recon": recon,
            "generative": generative,
            "kl": kl,
            "supervised": supervised,
            "kl_levels": kl_levels,
        }

    def _update_metrics(self, terms, allowed, outputs, x, gradients: bool = True, finite=True):
        for name in ("loss", "recon", "generative", "kl", "supervised", "consistency", "confident"):
            if name in terms and name in self.trackers:
                update_if_finite(self.trackers[name], terms[name], finite)
        for i in range(self.ladder.levels):
            update_if_finite(self.trackers[f"kl_{i + 1}"], terms["kl_levels"][i], finite)
        predicted = ops.argmax(self.class_probabilities(x, outputs), axis=-1)
        for dice in self.dice:
            dice.update_state(ops.cast(allowed, "float32"), predicted)
        skip = (
            set()
            if gradients
            else {m.name for m in (*self.gradient_monitor.metrics, self.skipped)}
            | {"consistency", "confident"}
        )
        return self.step_logs({m.name: m.result() for m in self.metrics if m.name not in skip})

    def _variable_block(self, path: str) -> str:
        """The block a variable belongs to, for the per-block gradient norms: `level_i` for
        the ladder's mappings (a)_i, (b)_i, (c)_i and gain of level i, `head`, or `backbone`."""
        parts = path.split("/")
        if parts[0] == self.head.name:
            return "head"
        if parts[0] != self.ladder.name:
            return "backbone"
        for i in range(self.ladder.levels):
            if parts[1] in (f"b_{i + 1}", f"c_{i + 1}", f"a_{i + 1}", f"gain_{i + 1}"):
                return f"level_{i + 1}"
        return "backbone"

    def consistency_term(self, data, outputs):
        """Weak-to-strong consistency on the batch's unlabelled pixels (`models.consistency`):
        the teacher's lesion-view probabilities follow the decision rule (with `posterior`
        they are intensity-informed: r_k ∝ π_k Beta_k(x)); the student's strong view samples
        z; the feature-perturbed pass is this step's own forward (z sampled)."""
        lesion_only = ops.convert_to_tensor([0.0, 1.0, 1.0, 1.0], "float32")
        posterior = self.decision == "posterior"

        def teacher_probs(x_u, keep):
            out = self.forward(x_u, training=True, sample=False, kl=False, styles=posterior)
            if posterior:
                allowed = lesion_only + ops.zeros_like(out["alpha"])
                p = lik.responsibilities(x_u, out["pi_logits"], out["alpha"], out["beta"], allowed)
                return p[..., 1:]
            return ops.softmax(ops.cast(out["pi_logits"][..., 1:], "float32"), axis=-1)

        def student_logits(x_s):
            return self.forward(x_s, training=True, sample=True, kl=False, styles=False)[
                "pi_logits"
            ][..., 1:]

        def perturbed_logits(x_u, keep):
            return tf.boolean_mask(outputs["pi_logits"], keep)[..., 1:]

        return self.consistency.loss(
            data, self.optimizer.iterations, teacher_probs, student_logits, perturbed_logits
        )

    def train_step(self, data):
        x, allowed = data["x"], data["allowed"]
        with tf.GradientTape() as tape:
            outputs = self(x, training=True)
            terms = self.compute_terms(self.dequantise(x), allowed, outputs)
            if self.consistency.on:
                terms["consistency"], terms["confident"] = self.consistency_term(data, outputs)
                terms["loss"] = terms["loss"] + terms["consistency"]
            scaled = self.optimizer.scale_loss(replica_loss(terms["loss"]))
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        blocks = [self._variable_block(v.path) for v in variables]
        grads = clip_gradients(
            grads,
            self.optimizer,
            self.clipnorm,
            self.clipvalue,
            self.global_clipnorm,
            monitor=self.gradient_monitor,
            blocks=blocks,
        )
        grads, finite = skip_non_finite(grads, self.optimizer, self.skipped)
        self.optimizer.apply(grads, variables)
        self.consistency.update_teacher(self.optimizer.iterations)
        return self._update_metrics(terms, allowed, outputs, x, finite=finite)

    def test_step(self, data):
        x, allowed = data["x"], data["allowed"]
        outputs = self(x, training=False)
        terms = self.compute_terms(x, allowed, outputs)
        return self._update_metrics(terms, allowed, outputs, x, gradients=False)

    # ------------------------------------------------------------------ inference

    def class_probabilities(self, x, outputs, lung=None, decision: str | None = None):
        """Per-pixel class probabilities [B, H, W, 4] from the model's outputs.

        `posterior`: r_k ∝ π_k Beta_k(x); `prior`: softmax(π). With a lung field `lung`
        [B, H, W, 1] (from preprocessing), background is certain outside and excluded inside.
        """
        decision = decision or self.decision
        allowed = None
        if lung is not None:
            lung = ops.cast(lung, "float32")
            allowed = ops.concatenate([1.0 - lung, lung, lung, lung], axis=-1)
        if decision == "posterior":
            return lik.responsibilities(
                x, outputs["pi_logits"], outputs["alpha"], outputs["beta"], allowed, self.eps
            )
        logits = outputs["pi_logits"]
        if allowed is not None:  # masked logits: no 0/0 where float16 softmax underflows
            logits = ops.where(allowed > 0, logits, ops.full_like(logits, -1e4))
        return ops.softmax(logits, axis=-1)

    def infer(self, x) -> dict:
        """The model's outputs in inference mode, through a traced function reused across calls
        (an eager call of this large graph costs seconds)."""
        if getattr(self, "_infer_fn", None) is None:
            self._infer_fn = tf.function(lambda t: self(t, training=False), reduce_retracing=True)
        return self._infer_fn(ops.convert_to_tensor(x, "float32"))

    def segmentation_probabilities(self, x, lung, decision: str | None = None):
        """The segmentation path alone, as exported for serving: x [B,H,W,1], lung field
        [B,H,W,1] -> class probabilities [B,H,W,4]. `forward` at the posterior mean without
        the KL, with the heads the decision rule needs (pi only for `prior`)."""
        decision = decision or self.decision
        x = ops.cast(x, "float32")
        outputs = self.forward(
            x, training=False, sample=False, kl=False, styles=decision == "posterior"
        )
        return self.class_probabilities(x, outputs, lung, decision)

    def calibration_forward(self, x):
        """Forward pass for `recalibrate_batchnorm`: normalisation in training mode, z at the
        posterior mean (as at inference)."""
        return self.forward(x, training=True, sample=False, kl=False)

    def sampled_probabilities(self, x, lung, samples: int, decision: str | None = None):
        """Class probabilities [B,H,W,4] averaged over `samples` posterior draws of z."""
        total = 0.0
        for _ in range(samples):
            outputs = self.forward(x, training=False, sample=True, kl=False)
            total = total + self.class_probabilities(x, outputs, lung, decision)
        return total / samples

    def styles(self, x, lung=None, decision: str | None = None) -> dict:
        """The four style images E[Beta_k] = α_k/(α_k+β_k) [B,H,W,4], the segmentation, and the
        stitched reconstruction [B,H,W,1] (each pixel takes the style of its class; Fig. 6b)."""
        x = ops.convert_to_tensor(x, "float32")
        outputs = self.infer(x)
        styles = outputs["alpha"] / (outputs["alpha"] + outputs["beta"])
        labels = ops.argmax(self.class_probabilities(x, outputs, lung, decision), -1)
        onehot = ops.one_hot(labels, NUM_CLASSES)
        stitched = ops.sum(styles * onehot, axis=-1, keepdims=True)
        return {"styles": styles, "labels": labels, "stitched": stitched}

    def generate(
        self,
        n: int,
        size: int,
        sample_pixels: bool = False,
        sample_labels: bool = False,
        temperature: float = 1.0,
    ) -> dict:
        """Draw n new slices of size×size with their segmentations from the prior.

        z from the prior; y = argmax p(y | z) per pixel (`StitchHead.generate`: π from z
        alone), or y ~ Categorical with `sample_labels` (noisy: pixels are independent given
        z); x = the style of y: its mean, or a Beta sample with `sample_pixels`. `temperature`
        scales the prior σ of every level.
        Returns x [n,size,size,1], labels [n,size,size], styles [n,size,size,4].
        """
        check_model_size(size)
        features, _ = self.ladder.generate((n, size // 32, size // 32, 1), temperature=temperature)
        if self.head_skips and not self.generative_weight:
            # p(y | z) was not trained: π needs an image, so stitch the style means by a
            # first π from a blank image and run the segmentation branch on that draft
            blank = ops.zeros((n, size, size, 1), self.compute_dtype)
            skip = self.backbone(blank, training=False)[0]
            outputs = self.head(features, skip, blank, training=False)
            means = outputs["alpha"] / (outputs["alpha"] + outputs["beta"])
            labels = ops.one_hot(ops.argmax(outputs["pi_logits"], -1), NUM_CLASSES)
            draft = ops.cast(ops.sum(means * labels, axis=-1, keepdims=True), self.compute_dtype)
            skip = self.backbone(draft, training=False)[0]
            outputs = self.head(features, skip, draft, training=False)
        else:
            outputs = self.head.generate(features, training=False)
        if sample_labels:
            labels = tf.random.categorical(
                tf.reshape(outputs["pi_logits"], (-1, NUM_CLASSES)), 1, dtype=tf.int32
            )
            labels = tf.reshape(labels, (n, size, size))
        else:
            labels = tf.argmax(outputs["pi_logits"], -1, output_type=tf.int32)
        onehot = tf.one_hot(labels, NUM_CLASSES)
        if sample_pixels:
            import tensorflow_probability as tfp

            pixels = tfp.distributions.Beta(outputs["alpha"], outputs["beta"]).sample()
        else:
            pixels = outputs["alpha"] / (outputs["alpha"] + outputs["beta"])
        styles = outputs["alpha"] / (outputs["alpha"] + outputs["beta"])
        x = tf.reduce_sum(pixels * onehot, -1, keepdims=True)
        return {"x": x, "labels": labels, "styles": styles}
