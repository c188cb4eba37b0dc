"""The SVAE's building blocks (paper Fig. 4 and Fig. 5, docs/DESIGN.md §2).

- `Conv`: the paper's convolution; above 64 filters the authors' "linear bottleneck"
  (1×1 down to f/4 → k×k at f/4 → 1×1 back to f), else a plain k×k conv.
- `ResBlock`: pre-activation residual block, Norm → ReLU → Conv → Norm → ReLU → Conv, scaled
  by a learnt gain (initialised small, so a deep stack starts close to the identity) + skip.
- `Smooth`: Conv → BN → ReLU → Conv, then `n_res` ResBlocks, then BN → ReLU; `LightSmooth`
  is `Smooth(n_res=1)`, the paper's Smooth has 3.
- `Upsample`: ×2 resize then 3×3 conv (the paper's 4×4 stride-2 transposed conv drew
  checkerboard patterns in styles and samples; `mode="transpose"` keeps it).
- The three mappings per level: (a) `TopDown` d_i → d̃_{i−1}, (b) `LatentParams` d → (μ, σ)
  of z (shared by inference and generation; its output convolutions start at zero, so q̂
  starts equal to the prior), (c) `LatentToFeatures` z_i → d_i.
See docs/DESIGN.md for the departures from the paper and why.
"""

from __future__ import annotations

import math

import keras
from keras import layers, ops

from stitchnet_tf.options import NORMS, UPSAMPLE_MODES

BOTTLENECK_ABOVE = 64  # the paper: linear bottleneck convolutions where filters > 64
SIGMA_FLOOR = 1e-2
#: initial gain of residual branches (ResBlock, the (c) branch added to the top-down stream)
RESIDUAL_GAIN = 0.1


def _register(cls):
    return keras.saving.register_keras_serializable(package="stitchnet_tf")(cls)


class Block(layers.Layer):
    """A layer made of other layers, which build on its first eager or traced call.

    Without a `build`, Keras builds a layer by first tracing `call` into a scratch graph, even
    when the call is eager: seconds per block on a CPU, half a minute per StitchNet.
    """

    def build(self, input_shape):
        pass

    def call(self, x, training=None):
        """Blocks that are a plain sequence keep their layers in `self.steps`."""
        for step in self.steps:
            x = step(x, training=training)
        return x


@_register
class Norm(layers.Layer):
    """The blocks' normalisation: BatchNorm (the paper) or GroupNorm.

    GroupNorm (groups = gcd(8, channels)) normalises each image on its own, so inference
    behaves exactly as training: no moving statistics that lag the weights or that were
    gathered on sampled z while inference uses the posterior mean.
    """

    def __init__(self, norm: str = "batch", **kwargs):
        super().__init__(**kwargs)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm

    def build(self, input_shape):
        if self.norm == "batch":
            self.inner = layers.BatchNormalization(dtype=self.dtype_policy)
        else:
            groups = math.gcd(8, int(input_shape[-1]))
            self.inner = layers.GroupNormalization(groups=groups, dtype=self.dtype_policy)
        self.inner.build(input_shape)

    def call(self, x, training=None):
        if self.norm == "group" and None not in x.shape[1:]:
            return self._group_norm(x)
        return self.inner(x, training=training)

    def _group_norm(self, x):
        """Keras' `GroupNormalization.call` on x [B, H, W, C] of static H, W, C: the same
        arithmetic in the same order (bit-identical: tests/test_model.py), in 28 graph ops a
        call against Keras' 40 (it builds the group shapes from dynamic shape ops and
        constants); GroupNorm was three quarters of StitchNet's traced graph (DESIGN §7.1)."""
        inner = self.inner
        _, h, w, c = x.shape
        grouped = [1, 1, 1, inner.groups, c // inner.groups]
        y = ops.reshape(x, [-1, h, w, *grouped[3:]])
        y = ops.cast(y, keras.backend.result_type(x.dtype, "float32"))
        mean, variance = ops.moments(y, axes=[1, 2, 4], keepdims=True)
        inv = ops.rsqrt(variance + inner.epsilon) * ops.cast(
            ops.reshape(inner.gamma, grouped), y.dtype
        )
        res = -mean * inv + ops.cast(ops.reshape(inner.beta, grouped), y.dtype)
        y = ops.cast(y * inv + res, x.dtype)
        return ops.cast(ops.reshape(y, [-1, h, w, c]), inner.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return super().get_config() | {"norm": self.norm}


@_register
class Conv(Block):
    """The paper's k×k convolution to `filters` channels, [B, H, W, C] -> [B, H, W, filters].

    Above `BOTTLENECK_ABOVE` filters it is a bottleneck 1×1 (f/4) → BN → ReLU → k×k (f/4) →
    BN → ReLU → 1×1 (f), which is what keeps the wide levels affordable.
    """

    def __init__(self, filters: int, kernel_size: int = 3, norm: str = "batch", **kwargs):
        super().__init__(**kwargs)
        self.norm = norm
        self.filters, self.kernel_size = int(filters), int(kernel_size)
        self.bottleneck = self.filters > BOTTLENECK_ABOVE
        if self.bottleneck:
            inner = max(1, self.filters // 4)
            self.steps = [
                layers.Conv2D(inner, 1, use_bias=False, dtype=self.dtype_policy),
                Norm(self.norm, dtype=self.dtype_policy),
                layers.ReLU(dtype=self.dtype_policy),
                layers.Conv2D(
                    inner, self.kernel_size, padding="same", use_bias=False, dtype=self.dtype_policy
                ),
                Norm(self.norm, dtype=self.dtype_policy),
                layers.ReLU(dtype=self.dtype_policy),
                layers.Conv2D(self.filters, 1, use_bias=False, dtype=self.dtype_policy),
            ]
        else:
            self.steps = [
                layers.Conv2D(
                    self.filters,
                    self.kernel_size,
                    padding="same",
                    use_bias=False,
                    dtype=self.dtype_policy,
                )
            ]

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return super().get_config() | {
            "norm": self.norm,
            "filters": self.filters,
            "kernel_size": self.kernel_size,
        }


@_register
class ResBlock(layers.Layer):
    """Pre-activation residual block keeping shape: x + g · Conv(ReLU(N(Conv(ReLU(N(x)))))).

    g is a learnt scalar starting at `RESIDUAL_GAIN`: stacks of blocks start near the identity,
    which keeps gradients through the deep top-down chain from growing level by level.
    """

    def __init__(self, filters: int, norm: str = "batch", **kwargs):
        super().__init__(**kwargs)
        self.norm = norm
        self.filters = int(filters)
        self.bn1 = Norm(self.norm, dtype=self.dtype_policy)
        self.conv1 = Conv(self.filters, norm=self.norm, dtype=self.dtype_policy)
        self.bn2 = Norm(self.norm, dtype=self.dtype_policy)
        self.conv2 = Conv(self.filters, norm=self.norm, dtype=self.dtype_policy)

    def build(self, input_shape):
        self.gain = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(RESIDUAL_GAIN),
            name="gain",
            dtype="float32",
        )

    def call(self, x, training=None):
        h = self.conv1(ops.relu(self.bn1(x, training=training)), training=training)
        h = self.conv2(ops.relu(self.bn2(h, training=training)), training=training)
        return x + ops.cast(self.gain, h.dtype) * h

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return super().get_config() | {"norm": self.norm, "filters": self.filters}


@_register
class Smooth(Block):
    """Conv → BN → ReLU → Conv, `n_res` ResBlocks, BN → ReLU: [B,H,W,C] -> [B,H,W,filters].

    `n_res=3` is the paper's Smooth, `n_res=1` its LightSmooth (see `LightSmooth`).
    """

    def __init__(self, filters: int, n_res: int = 3, norm: str = "batch", **kwargs):
        super().__init__(**kwargs)
        self.norm = norm
        self.filters, self.n_res = int(filters), int(n_res)
        self.conv1 = Conv(self.filters, norm=self.norm, dtype=self.dtype_policy)
        self.bn1 = Norm(self.norm, dtype=self.dtype_policy)
        self.conv2 = Conv(self.filters, norm=self.norm, dtype=self.dtype_policy)
        self.blocks = [
            ResBlock(self.filters, norm=self.norm, dtype=self.dtype_policy)
            for _ in range(self.n_res)
        ]
        self.bn_out = Norm(self.norm, dtype=self.dtype_policy)

    def call(self, x, training=None):
        x = self.conv1(x, training=training)
        x = self.conv2(ops.relu(self.bn1(x, training=training)), training=training)
        for block in self.blocks:
            x = block(x, training=training)
        return ops.relu(self.bn_out(x, training=training))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return super().get_config() | {
            "norm": self.norm,
            "filters": self.filters,
            "n_res": self.n_res,
        }


def LightSmooth(filters: int, **kwargs) -> Smooth:  # noqa: N802 (a block name from the paper)
    """The paper's LightSmooth: a Smooth with one ResBlock."""
    return Smooth(filters, n_res=1, **kwargs)


@_register
class Upsample(Block):
    """×2 upsampling to `filters` channels → Norm → ReLU: [B,h,w,C] -> [B,2h,2w,filters].

    `mode="resize"` (default): nearest-neighbour ×2 then a 3×3 `Conv` (bottlenecked above 64
    filters), free of the checkerboard artefacts of strided transposed convolutions.
    `mode="transpose"`: the paper's 4×4 stride-2 transposed convolution (run at f/4 between two
    1×1 convolutions above 64 filters).
    """

    def __init__(self, filters: int, norm: str = "batch", mode: str = "resize", **kwargs):
        super().__init__(**kwargs)
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
        self.norm, self.mode = norm, mode
        self.filters = int(filters)
        policy = self.dtype_policy
        if mode == "resize":
            self.steps = [
                layers.UpSampling2D(2, interpolation="nearest", dtype=policy),
                Conv(self.filters, norm=norm, dtype=policy),
            ]
        elif self.filters > BOTTLENECK_ABOVE:
            inner = max(1, self.filters // 4)
            self.steps = [
                layers.Conv2D(inner, 1, use_bias=False, dtype=policy),
                Norm(self.norm, dtype=policy),
                layers.ReLU(dtype=policy),
                layers.Conv2DTranspose(inner, 4, 2, padding="same", use_bias=False, dtype=policy),
                Norm(self.norm, dtype=policy),
                layers.ReLU(dtype=policy),
                layers.Conv2D(self.filters, 1, use_bias=False, dtype=policy),
            ]
        else:
            self.steps = [
                layers.Conv2DTranspose(
                    self.filters, 4, 2, padding="same", use_bias=False, dtype=policy
                )
            ]
        self.steps += [Norm(self.norm, dtype=policy), layers.ReLU(dtype=policy)]

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        return (b, None if h is None else 2 * h, None if w is None else 2 * w, self.filters)

    def get_config(self):
        return super().get_config() | {
            "norm": self.norm,
            "filters": self.filters,
            "mode": self.mode,
        }


@_register
class TopDown(Block):
    """Mapping (a), d_i -> d̃_{i−1}: Upsample (×2) → LightSmooth.

    [B, h, w, f_i] -> [B, 2h, 2w, `filters`] with `filters` = f_{i−1}, so that the shared
    mapping (b) of level i−1 applies to d̃_{i−1} as to the bottom-up d_{i−1}.
    """

    def __init__(self, filters: int, norm: str = "batch", upsample: str = "resize", **kwargs):
        super().__init__(**kwargs)
        self.norm, self.upsample = norm, upsample
        self.filters = int(filters)
        self.up = Upsample(self.filters, norm=self.norm, mode=upsample, dtype=self.dtype_policy)
        self.smooth = LightSmooth(self.filters, norm=self.norm, dtype=self.dtype_policy)

    def call(self, d, training=None):
        return self.smooth(self.up(d, training=training), training=training)

    def compute_output_shape(self, input_shape):
        return self.up.compute_output_shape(input_shape)

    def get_config(self):
        return super().get_config() | {
            "norm": self.norm,
            "filters": self.filters,
            "upsample": self.upsample,
        }


@_register
class LatentParams(Block):
    """Mapping (b), d -> (μ, σ) of a one-channel Gaussian z (paper Fig. 5b).

    Conv 3×3 to f/2 → LightSmooth, then two branches, each Conv 3×3 to f/4 → LightSmooth →
    Conv 3×3 to 1 channel: μ, and σ = softplus(·) + floor. [B,h,w,f] -> ([B,h,w,1], [B,h,w,1]),
    float32. One instance per level serves both the bottom-up d_i (inference, q̂) and the
    top-down d̃_i (generation, the prior): the SVAE's shared weights. The two output
    convolutions start at zero, so at initialisation q̂ = prior = N(0, (softplus(0) + floor)²)
    and the first KL is only the merge's, about 0.1 nats per latent pixel (no 1/σ² blow-up
    through the merge and the KL on the first steps).
    """

    def __init__(self, filters: int, norm: str = "batch", **kwargs):
        super().__init__(**kwargs)
        self.norm = norm
        self.filters = int(filters)
        policy = self.dtype_policy
        half, quarter = max(1, self.filters // 2), max(1, self.filters // 4)
        self.conv = Conv(half, norm=self.norm, dtype=policy)
        self.smooth = LightSmooth(half, norm=self.norm, dtype=policy)
        self.mu_branch = [
            Conv(quarter, norm=self.norm, dtype=policy),
            LightSmooth(quarter, norm=self.norm, dtype=policy),
        ]
        self.sigma_branch = [
            Conv(quarter, norm=self.norm, dtype=policy),
            LightSmooth(quarter, norm=self.norm, dtype=policy),
        ]
        self.mu_out = layers.Conv2D(
            1, 3, padding="same", kernel_initializer="zeros", dtype="float32"
        )
        self.sigma_out = layers.Conv2D(
            1, 3, padding="same", kernel_initializer="zeros", dtype="float32"
        )

    def call(self, d, training=None):
        h = self.smooth(self.conv(d, training=training), training=training)
        m, s = h, h
        for layer in self.mu_branch:
            m = layer(m, training=training)
        for layer in self.sigma_branch:
            s = layer(s, training=training)
        mu = self.mu_out(m)
        sigma = ops.softplus(self.sigma_out(s)) + SIGMA_FLOOR
        return mu, sigma

    def compute_output_shape(self, input_shape):
        shape = (*input_shape[:-1], 1)
        return shape, shape

    def get_config(self):
        return super().get_config() | {"norm": self.norm, "filters": self.filters}


@_register
class LatentToFeatures(Block):
    """Mapping (c), z_i -> d_i (paper Fig. 5c): [B,h,w,1] -> [B,h,w,f].

    Conv 3×3 to f/2 → LightSmooth → Conv 3×3 to f → LightSmooth → Smooth (`light=True`
    replaces the last Smooth by a LightSmooth, a measured speed lever).
    """

    def __init__(self, filters: int, light: bool = False, norm: str = "batch", **kwargs):
        super().__init__(**kwargs)
        self.norm = norm
        self.filters, self.light = int(filters), bool(light)
        policy = self.dtype_policy
        half = max(1, self.filters // 2)
        self.steps = [
            Conv(half, norm=self.norm, dtype=policy),
            LightSmooth(half, norm=self.norm, dtype=policy),
            Conv(self.filters, norm=self.norm, dtype=policy),
            LightSmooth(self.filters, norm=self.norm, dtype=policy),
            Smooth(self.filters, n_res=1 if self.light else 3, norm=self.norm, dtype=policy),
        ]

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return super().get_config() | {
            "norm": self.norm,
            "filters": self.filters,
            "light": self.light,
        }
