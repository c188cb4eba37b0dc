"""Mixed precision: float16 with loss scaling on GPU, bfloat16 on CPU.

The distribution heads (π, α, β, the latent μ, σ) and the loss always stay in float32: TFP's
Beta has no bfloat16 kernel on CPU and refuses float16 samples.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def mixed_policy_name() -> str:
    """`mixed_float16` where a GPU is visible, else `mixed_bfloat16`."""
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


def set_precision(mixed: bool) -> str:
    """Set Keras' global dtype policy before building a model; returns the policy's name.

    With mixed_float16, `compile` wraps the optimizer in a `LossScaleOptimizer`.
    """
    name = mixed_policy_name() if mixed else "float32"
    keras.mixed_precision.set_global_policy(name)
    return name
