"""Gradient clipping shared by the models' `train_step`s (the paper: clipnorm 1.0, clipvalue 0.5).

Keras optimizers take only one of clipnorm / clipvalue, so the models clip themselves.
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops


def replica_loss(loss):
    """A replica's share of the loss to differentiate: its mean loss / replicas in sync.

    The optimizer sums the replicas' gradients, so this makes them the gradients of the mean
    loss over the global batch, as on one device.
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss if replicas == 1 else loss * (1.0 / replicas)


def clip_gradients(grads, optimizer, clipnorm: float | None, clipvalue: float | None):
    """Per-variable value then norm clipping, in the units of the unscaled loss.

    Under a `LossScaleOptimizer` the gradients are scaled by its dynamic scale; non-finite
    gradients are left as they are, so that it still sees the overflow and skips the step.
    With several replicas (gradients of `replica_loss`) the global gradients are clipped: they
    are summed over the replicas first and returned divided by the replica count, so that the
    optimizer's own sum gives back the clipped global gradients.
    """
    if not (clipvalue or clipnorm):
        return grads
    ctx = tf.distribute.get_replica_context()
    replicas = ctx.num_replicas_in_sync if ctx is not None else 1
    if replicas > 1:
        present = [g for g in grads if g is not None]
        summed = iter(ctx.all_reduce(tf.distribute.ReduceOp.SUM, present))
        grads = [None if g is None else next(summed) for g in grads]
    scale = getattr(optimizer, "dynamic_scale", None)
    scale = 1.0 if scale is None else ops.cast(scale, "float32")
    clipped = []
    for g in grads:
        if g is not None:
            c = g
            if clipvalue:
                c = tf.clip_by_value(c, -clipvalue * scale, clipvalue * scale)
            if clipnorm:
                c = tf.clip_by_norm(c, clipnorm * scale)
            g = tf.where(tf.math.is_finite(g), c, g)
            if replicas > 1:
                g = g * (1.0 / replicas)
        clipped.append(g)
    return clipped


def recalibrate_batchnorm(model, batches, steps: int = 20, momentum: float = 0.9) -> int:
    """Re-estimate every BatchNorm layer's moving statistics under inference conditions.

    Moving averages gathered during training lag the weights and, in StitchNet, were gathered
    on sampled z while inference uses the posterior mean: inference-mode predictions can then
    fall far behind training-mode ones. This runs `steps` batches of `batches` (dicts with `x`)
    forward in training mode without gradients, through the model's `calibration_forward`
    (z at the posterior mean) when it has one: the first batch sets the statistics outright,
    the others are averaged in with `momentum`. Returns the number of batches used.
    """
    import keras

    norms = [
        la for la in model._flatten_layers() if isinstance(la, keras.layers.BatchNormalization)
    ]
    if not norms:
        return 0
    forward = getattr(model, "calibration_forward", None) or (lambda x: model(x, training=True))
    saved = [layer.momentum for layer in norms]
    used = 0
    try:
        for batch in batches.take(steps):
            # the momentum is read when the function is traced: one function per momentum
            m = 0.0 if used == 0 else momentum
            for layer in norms:
                layer.momentum = m
            if used <= 1:
                step = tf.function(forward, reduce_retracing=True)
            step(batch["x"])
            used += 1
    finally:
        for layer, m in zip(norms, saved, strict=True):
            layer.momentum = m
    return used


class CompiledOnce:
    """Mixin for the models' `compile`: builds the optimizer's variables at once.

    Keras builds them lazily inside the first traced step when no distribution strategy is set,
    which makes TensorFlow trace that (large) step twice. XLA is off by default: it is slower
    on CPU for these models.
    """

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def compile(self, optimizer="adam", **kwargs):
        kwargs.setdefault("jit_compile", False)
        super().compile(optimizer=optimizer, **kwargs)
        self.optimizer.build(self.trainable_variables)

    def step_logs(self, logs: dict) -> dict:
        """A train/test step's logs; [1]-shaped under a multi-worker strategy.

        Keras 3 averages step logs over the workers along axis 0, which scalars lack
        (tensorflow/tensorflow#72388).
        """
        strategy = tf.distribute.get_strategy()
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Skip Keras' symbolic build when model and optimizer are built (after `compile`).

        Under a strategy Keras first reduces a batch over the replicas, which fails for dict
        batches under MultiWorkerMirroredStrategy (Keras 3.15).
        """
        built = self.optimizer is not None and self.optimizer.built
        if built and all(layer.built for layer in self._flatten_layers()):
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def compile_from_config(self, config):
        """Recompile a loaded model with its saved optimizer (used by `load_model`)."""
        import keras

        self.compile(**keras.saving.deserialize_keras_object(config))
