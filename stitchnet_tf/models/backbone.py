"""The deterministic bottom-up path: Keras' MobileNetV2 on x, projected to d_1 … d_5."""

from __future__ import annotations

import keras
from keras import layers

from stitchnet_tf.models.base import batchnorm_layers

#: MobileNetV2 activations at strides 2, 4, 8, 16, 32 (the U-Net skips of the paper, plus the
#: last activation).
FEATURE_LAYERS = (
    "block_1_expand_relu",
    "block_3_expand_relu",
    "block_6_expand_relu",
    "block_13_expand_relu",
    "out_relu",
)
#: BatchNorm momentum of the backbone (Keras' MobileNetV2 default 0.999 lags on short runs).
BN_MOMENTUM = 0.99
#: Channels of d_1 … d_5 at width 1.0 (paper Table 2).
D_FILTERS = (32, 64, 128, 256, 512)


def scaled_filters(width: float, base=D_FILTERS) -> tuple[int, ...]:
    """Filters per level for a width multiplier (at least 4 each)."""
    return tuple(max(4, int(round(f * width))) for f in base)


def mobilenet_v2(
    alpha: float = 1.0, weights: str | None = None, rgb: bool = False, name: str = "mobilenet_v2"
):
    """Keras' MobileNetV2 without top, on any multiple-of-32 input, giving 5 feature maps.

    One grey channel by default (trained from scratch, the authors' choice); three channels
    with `rgb` (for ImageNet weights, loaded from the file `weights`).
    """
    channels = 3 if rgb or weights is not None else 1
    net = keras.applications.MobileNetV2(
        input_shape=(None, None, channels), include_top=False, weights=weights, alpha=alpha
    )
    set_bn_momentum(net)
    return keras.Model(net.inputs, [net.get_layer(n).output for n in FEATURE_LAYERS], name=name)


def set_bn_momentum(model, momentum: float = BN_MOMENTUM) -> None:
    """Set the moving-average momentum of every BatchNormalization layer in `model`.

    Keras' MobileNetV2 uses 0.999: after a few thousand steps its moving statistics still lean
    on their initial values, and inference-mode predictions (BatchNorm with moving statistics)
    fall far behind training-mode ones. 0.99 is Keras' default elsewhere.
    """
    for layer in batchnorm_layers(model):
        layer.momentum = momentum


@keras.saving.register_keras_serializable(package="stitchnet_tf")
class Backbone(keras.Model):
    """x [B, H, W, 1] in [0, 1] -> [d_1 … d_5], d_i [B, H/2^i, W/2^i, f_i].

    MobileNetV2's activations at strides 2–32, each projected by a 1×1 conv → BN → ReLU to
    f_i = 32, 64, 128, 256, 512 channels times `width`.

    Args:
        width: width multiplier of the d_i (1.0 = the paper).
        alpha: MobileNetV2's own width multiplier.
        weights: None (from scratch, the default) or a path to ImageNet MobileNetV2 weights
            (`include_top=False`); the grey input is then replicated to three channels.
        rgb: build the three-channel variant without loading weights (set when reloading a
            model that was built with ImageNet weights).
    """

    def __init__(
        self,
        width: float = 1.0,
        alpha: float = 1.0,
        weights: str | None = None,
        rgb: bool = False,
        **kwargs,
    ):
        rgb = bool(rgb or weights is not None)
        # === Layers ===
        self.mobilenet = mobilenet_v2(alpha, weights, rgb)
        filters = scaled_filters(width)
        self.projections = [
            keras.Sequential(
                [
                    layers.Conv2D(f, 1, use_bias=False),
                    layers.BatchNormalization(),
                    layers.ReLU(),
                ],
                name=f"project_d{i + 1}",
            )
            for i, f in enumerate(filters)
        ]
        # === Functional model ===
        x = keras.Input((None, None, 1), name="x")
        # MobileNetV2 expects inputs in [-1, 1]
        h = layers.Rescaling(2.0, -1.0, name="to_unit_range")(x)
        if rgb:
            h = layers.Concatenate(name="grey_to_rgb")([h, h, h])
        features = self.mobilenet(h)
        ds = [proj(f) for proj, f in zip(self.projections, features, strict=True)]
        super().__init__(inputs=x, outputs=ds, **kwargs)
        # === Config ===
        self.width, self.alpha, self.rgb = width, alpha, rgb
        self.filters = filters

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "width": self.width,
            "alpha": self.alpha,
            "rgb": self.rgb,  # the weights themselves travel in the saved model
        }
