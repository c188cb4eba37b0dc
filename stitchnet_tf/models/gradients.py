"""What the models' `train_step`s do with gradients: the replica share of the loss, clipping
(the paper's per-variable clipnorm 1.0 / clipvalue 0.5, or the default global norm), per-block
norm monitoring, and skipping non-finite steps.

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


class GradientMonitor:
    """Per-block gradient norms, the global norm and whether clipping bound, as Keras metrics.

    `blocks` are block names (e.g. backbone, level_1 … level_5, head); each gets a Mean metric
    `grad_<block>` of its gradient norm, plus `grad_norm` (global, before clipping) and
    `clipped` (share of steps whose gradients were clipped). They show in `fit`'s logs, the
    CSV log and TensorBoard.
    """

    def __init__(self, blocks):
        import keras

        self.blocks = list(blocks)
        self.norms = {b: keras.metrics.Mean(name=f"grad_{b}") for b in self.blocks}
        self.global_norm = keras.metrics.Mean(name="grad_norm")
        self.clipped = keras.metrics.Mean(name="clipped")

    @property
    def metrics(self) -> list:
        return [self.global_norm, self.clipped, *self.norms.values()]

    def update(self, halves, blocks, global_norm, clipped, scale=None) -> None:
        """Record one step from the per-variable ½‖g‖² `halves` (None for no gradient), their
        `blocks`, the global norm, whether clipping bound and the loss scale (None: 1)."""
        finite = tf.math.is_finite(global_norm)  # a skipped step (NaN/Inf) is left out
        for name in self.blocks:
            part = [h for h, b in zip(halves, blocks, strict=True) if b == name and h is not None]
            if part:
                norm = _norm_of(part) if scale is None else _norm_of(part) / scale
                update_if_finite(self.norms[name], norm, finite)
        update_if_finite(self.global_norm, global_norm, finite)
        update_if_finite(self.clipped, tf.cast(clipped, tf.float32), finite)


def _halves(grads) -> list:
    """½‖g‖² of each gradient in float32 (None stays None): one graph op per variable, shared by
    the global norm, the block norms and the finiteness check. A model has hundreds of
    variables, and every per-variable op is paid again in each `train_step` trace."""
    return [None if g is None else tf.nn.l2_loss(tf.cast(g, tf.float32)) for g in grads]


def _norm_of(halves):
    # Not `tf.add_n`: in the traced train_step it summed the same halves differently from one
    # call to the next (last bits; probably its run-time choice of which input buffer to reuse),
    # and with the norm every clipped gradient: runs did not repeat from their seed (DESIGN §2.2).
    return tf.sqrt(2.0 * tf.reduce_sum(tf.stack(halves)))


def clip_gradients(
    grads,
    optimizer,
    clipnorm: float | None,
    clipvalue: float | None,
    global_clipnorm: float | None = None,
    monitor: GradientMonitor | None = None,
    blocks: list[str] | None = None,
):
    """Clip gradients in the units of the unscaled loss: per-variable value then norm
    (the paper's), then the global norm (the default). Records norms in `monitor`.

    Under a `LossScaleOptimizer` the gradients are scaled by its dynamic scale; non-finite
    gradients are left as they are, so that it still sees the overflow and skips the step.
    With several replicas (gradients of `replica_loss`) the global gradients are clipped: they
    are summed over the replicas first and returned divided by the replica count, so that the
    optimizer's own sum gives back the clipped global gradients.
    """
    if not (clipvalue or clipnorm or global_clipnorm or monitor):
        return grads
    ctx = tf.distribute.get_replica_context()
    replicas = ctx.num_replicas_in_sync if ctx is not None else 1
    if replicas > 1:
        present = [g for g in grads if g is not None]
        summed = iter(ctx.all_reduce(tf.distribute.ReduceOp.SUM, present))
        grads = [None if g is None else next(summed) for g in grads]
    scale = getattr(optimizer, "dynamic_scale", None)
    scale = None if scale is None else ops.cast(scale, "float32")
    halves = _halves(grads)
    norm = _norm_of([h for h in halves if h is not None])
    if scale is not None:  # the norm in the units of the unscaled loss
        norm = norm / scale
    out, clipped_any = grads, tf.constant(False)
    if clipvalue or clipnorm:
        s = 1.0 if scale is None else scale
        out = []
        for g in grads:
            if g is not None:
                c = g
                if clipvalue:
                    c = tf.clip_by_value(c, -clipvalue * s, clipvalue * s)
                if clipnorm:
                    c = tf.clip_by_norm(c, clipnorm * s)
                g = tf.where(tf.math.is_finite(g), c, g)
            out.append(g)
        changed = [tf.reduce_any(a != b) for a, b in zip(out, grads, strict=True) if a is not None]
        clipped_any = tf.reduce_any(tf.stack(changed))
    if global_clipnorm:
        factor = tf.minimum(1.0, global_clipnorm / tf.maximum(norm, 1e-12))
        factor = tf.where(tf.math.is_finite(norm), factor, 1.0)
        clipped_any = clipped_any | (factor < 1.0)
        factors = {}  # one cast per dtype, not per variable
        out = [
            None if g is None else g * factors.setdefault(g.dtype, tf.cast(factor, g.dtype))
            for g in out
        ]
    if monitor is not None:
        monitor.update(halves, blocks, norm, clipped_any, scale)
    if replicas > 1:
        out = [None if g is None else g * (1.0 / replicas) for g in out]
    return out


def skip_non_finite(grads, optimizer, skipped=None):
    """Guard one step against a bad batch: when any gradient is NaN or infinite (or their global
    norm overflows float32), every gradient of the step becomes zero, so the weights are not
    poisoned. Returns (grads, finite), finite a scalar bool tensor; `skipped` (a Mean metric)
    records whether the step was skipped.

    A zeroed step still moves the weights by Adam's momentum and the weight decay. Under a
    `LossScaleOptimizer` the gradients are returned as they are: it skips such steps itself
    (and lowers its loss scale).
    """
    finite = tf.math.is_finite(_norm_of([h for h in _halves(grads) if h is not None]))
    if skipped is not None:
        skipped.update_state(1.0 - tf.cast(finite, tf.float32))
    if getattr(optimizer, "dynamic_scale", None) is not None:
        return grads, finite
    zeros = {}  # a scalar zero per dtype, broadcast by `where`
    return [
        None if g is None else tf.where(finite, g, zeros.setdefault(g.dtype, tf.zeros((), g.dtype)))
        for g in grads
    ], finite


def update_if_finite(metric, value, finite) -> None:
    """`metric.update_state(value)`, leaving a step with non-finite gradients out (its loss is
    often NaN, which would make the epoch's mean NaN)."""
    weight = tf.cast(finite, tf.float32)
    value = tf.cast(value, tf.float32)
    metric.update_state(tf.where(finite, value, tf.zeros_like(value)), sample_weight=weight)
