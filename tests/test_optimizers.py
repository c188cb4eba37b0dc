"""The fused Adam / AdamW apply Keras's update, with a fraction of its graph ops."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from stitchnet_tf.models.optimizers import FusedAdam, FusedAdamW

PAIRS = [(keras.optimizers.Adam, FusedAdam), (keras.optimizers.AdamW, FusedAdamW)]


def _variables():
    return [
        keras.Variable(np.arange(12, dtype="float32").reshape(3, 4) / 10, name="kernel"),
        keras.Variable(np.ones(4, "float32"), name="bias"),
    ]


def _optimizer(cls):
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=20, warmup_target=1e-2, warmup_steps=3
    )
    if issubclass(cls, keras.optimizers.AdamW):
        optimizer = cls(schedule, weight_decay=0.05)
        optimizer.exclude_from_weight_decay(var_names=["bias"])
        return optimizer
    return cls(schedule)


@pytest.mark.parametrize(("reference", "fused"), PAIRS)
def test_fused_update_equals_keras(reference, fused):
    results = []
    for cls in (reference, fused):
        variables, optimizer = _variables(), _optimizer(cls)
        rng = np.random.default_rng(1)
        step = tf.function(lambda grads: optimizer.apply(grads, variables))  # noqa: B023
        for _ in range(10):
            step([tf.constant(rng.standard_normal(v.shape), "float32") for v in variables])
        results.append([v.numpy() for v in variables])
    start = _variables()[0].numpy()
    assert np.abs(results[0][0] - start).max() > 0.01  # the steps moved the weights
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)


def _apply_ops(cls) -> int:
    variables = [keras.Variable(np.ones((3, 3), "float32"), name=f"kernel_{i}") for i in range(8)]
    optimizer = _optimizer(cls)
    optimizer.build(variables)
    grads = [tf.TensorSpec((3, 3))] * len(variables)
    fn = tf.function(lambda *g: optimizer.apply(list(g), variables))
    return len(fn.get_concrete_function(*grads).graph.get_operations())


def test_fused_update_builds_few_ops_per_variable():
    keras_ops, fused_ops = _apply_ops(keras.optimizers.AdamW), _apply_ops(FusedAdamW)
    assert fused_ops * 3 < keras_ops, (fused_ops, keras_ops)


def test_fused_optimizer_serialises():
    optimizer = _optimizer(FusedAdamW)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is FusedAdamW and again.weight_decay == pytest.approx(0.05)


def test_ema_of_the_weights_warms_up_as_tensorflow_does():
    """average_t = μ_t·average + (1 − μ_t)·θ_t, μ_t = min(m, (1 + t) / (10 + t)), μ_0 = 0: after a
    short run the average follows the last steps, not the initial weights."""
    variables = _variables()
    optimizer = FusedAdamW(1e-2, weight_decay=0.0, use_ema=True, ema_momentum=0.99)
    rng = np.random.default_rng(2)
    step = tf.function(lambda grads: optimizer.apply(grads, variables))
    average = None
    for t in range(30):
        step([tf.constant(rng.standard_normal(v.shape), "float32") for v in variables])
        theta = variables[0].numpy().astype("float64")
        mu = 0.0 if t == 0 else min(0.99, (1 + t) / (10 + t))
        average = theta if average is None else mu * average + (1 - mu) * theta
    ema = optimizer._model_variables_moving_average[0].numpy()
    np.testing.assert_allclose(ema, average, atol=1e-6)
    start = _variables()[0].numpy()
    # with Keras's μ = 0.99 from step 1, 74% of the first step's weights would remain
    assert np.abs(ema - variables[0].numpy()).max() < 0.5 * np.abs(ema - start).max()
