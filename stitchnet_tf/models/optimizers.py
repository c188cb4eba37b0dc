"""Adam and AdamW with one fused kernel (`ResourceApplyAdam`) per variable.

Keras's TensorFlow optimizers build each variable's update from about 40 graph ops, and AdamW
evaluates the learning-rate schedule again for every variable's decay. A StitchNet has some
770 variables, so half of a traced `train_step` (30 000 of 64 000 ops) was the optimizer, and
every run, test and benchmark pays the trace again. These classes apply the same update,

    m ← β₁m + (1 − β₁)g,  v ← β₂v + (1 − β₂)g²,
    θ ← θ − lr·√(1 − β₂ᵗ)/(1 − β₁ᵗ) · m / (√v + ε),

with AdamW's decoupled decay θ ← θ − lr·wd·θ before it, in one to four ops per variable.
Config, state (the moments are Keras's own variables) and serialisation are Keras's, so runs
save, load and resume as before. Under a distribution strategy, with `amsgrad`, sparse
gradients or non-float32 variables, they fall back to Keras's per-op update.

With `use_ema` the moving average of the weights warms up as TensorFlow's
`ExponentialMovingAverage(decay, num_updates)` does: momentum min(m, (1 + t) / (10 + t)) at
step t (docs/DESIGN.md §7.13).
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _tf_variable(v):
    return v.value if isinstance(v, keras.Variable) else v


class _FusedUpdate:
    """The fused `_backend_update_step` and `_apply_weight_decay` of `FusedAdam(W)`, and the
    warmed-up EMA of the weights."""

    def _update_model_variables_moving_average(self, trainable_variables):
        """average ← μ_t·average + (1 − μ_t)·θ with μ_t = min(m, (1 + t) / (10 + t)), μ_0 = 0.

        Keras's EMA uses μ = m from the second step on. At m = 0.99 a 300-step run then still
        holds 5% of its first steps' weights in the average at the end (13% of the first
        epoch's), and its validation and checkpoints see a model that lags the one trained.
        """
        if not self.use_ema:
            return
        t = tf.cast(self.iterations, tf.float32)
        warm = tf.minimum(tf.cast(self.ema_momentum, tf.float32), (1.0 + t) / (10.0 + t))
        momentum = tf.where(t > 0, warm, 0.0)
        for var, average in zip(
            trainable_variables, self._model_variables_moving_average, strict=True
        ):
            if average is None:
                continue
            mu = tf.cast(momentum, average.dtype)
            average.assign(mu * average + (1.0 - mu) * tf.cast(var, average.dtype))

    def _fused(self) -> bool:
        return not self.amsgrad and not tf.distribute.has_strategy()

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None or not self._fused():
            return super()._apply_weight_decay(variables)
        decay = tf.cast(self.learning_rate, tf.float32) * tf.cast(self.weight_decay, tf.float32)
        for v in variables:
            if self._use_weight_decay(v):
                var = _tf_variable(v)
                var.assign_sub(var * tf.cast(decay, var.dtype))

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not self._fused():
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1, beta_2 = tf.cast(self.beta_1, tf.float32), tf.cast(self.beta_2, tf.float32)
        scalars = dict(
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, tf.float32),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, tf.float32),
        )
        for grad, v in zip(grads, trainable_variables, strict=True):
            var = _tf_variable(v)
            if var.dtype != tf.float32 or isinstance(grad, tf.IndexedSlices):
                self.update_step(grad, var, learning_rate)
                continue
            i = self._get_variable_index(var)
            tf.raw_ops.ResourceApplyAdam(
                var=var.handle,
                m=_tf_variable(self._momentums[i]).handle,
                v=_tf_variable(self._velocities[i]).handle,
                grad=tf.cast(grad, tf.float32),
                use_locking=False,
                **scalars,
            )


@keras.saving.register_keras_serializable(package="stitchnet_tf")
class FusedAdam(_FusedUpdate, keras.optimizers.Adam):
    """`keras.optimizers.Adam` with a fused per-variable update (same arguments)."""


@keras.saving.register_keras_serializable(package="stitchnet_tf")
class FusedAdamW(_FusedUpdate, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` with a fused per-variable update (same arguments)."""
