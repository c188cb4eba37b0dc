"""What every segmentation model shares: the `segment` contract and its output dict, the
compile/step plumbing, the training Dice metric and BatchNorm re-estimation.

Every model (StitchNet, the U-Net, SegNet; the threshold rule and the exported models follow the
same contract) maps a prepared slice x [B, S, S, 1] in [0, 1] and its lung field [B, S, S, 1] to
four-class probabilities (background, healthy, GGO, consolidation). `lung=None` means the same for
every model: the field is x > 0, since preprocessing zeroes everything outside it.
"""

from __future__ import annotations

import contextlib
import random

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from stitchnet_tf.data.classes import CLASS_NAMES, NUM_CLASSES
from stitchnet_tf.options import check_deterministic

#: Probability floor inside the entropy's log: a normal float16 number (1e-12 underflows to 0,
#: and log 0 = -inf gives NaN in float16 inference and an unquantizable range in int8); below it
#: p log p is under 1e-3 nats.
ENTROPY_FLOOR = 1e-4


@contextlib.contextmanager
def seeded(seed: int | None):
    """Seed weight initialisation while building, leaving Python's RNG as it was.

    Keras draws each unseeded initialiser's seed from Python's `random` when it is created, so
    without this a model's initial weights depend on whatever drew from it before (other
    models, pipeline layers, cached lung models): the same `--seed` would not give the same run.
    """
    if seed is None:
        yield
        return
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def repeatable_graphs() -> None:
    """Keep TensorFlow from reordering sums in traced graphs, so that a seeded run repeats bit
    for bit. `training.train` calls it. The arithmetic option is process-wide, the memory
    optimizer's for the calling thread (the one that runs `fit`).

    Grappler's arithmetic optimisation folds chains of `+` (the loss terms, for one) into one
    AddN, whose CPU kernel does not sum in a fixed order: the same StitchNet step from the same
    state gave losses differing in the last bit, and training amplified that into runs apart by
    epoch 1 (turning it off cost no measurable step time). On a CPU its memory optimizer turns
    some gradient sums into accumulations in arrival order: two fits on a real pipeline then
    parted after step 95; without it they agree for 200 steps, and a StitchNet train step's
    graph optimisation is some 50 s shorter. It stays on with a GPU, where its swapping to host
    memory may be what lets a model fit (docs/DESIGN.md §2.2, "Seeding").
    """
    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
    if not tf.config.list_physical_devices("GPU"):
        _no_memory_optimizer()


def _no_memory_optimizer() -> None:
    """Turn off Grappler's memory optimizer for the functions this thread calls.

    Its scheduling pass rewrites some AddN of three or more inputs (gradient sums) into
    AssignAdds on a temporary variable, which add in the order their inputs arrive. No public
    option reaches it (`set_experimental_options` has no key for it), so this edits the
    thread's function-call config; `set_experimental_options` and other context changes reset
    that config, so call it after them.
    """
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.eager import context

    options = context.context().function_call_options
    config = config_pb2.ConfigProto.FromString(options.config_proto_serialized)
    rewrite = config.graph_options.rewrite_options
    rewrite.memory_optimization = rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
    options.config_proto_serialized = config


def default_lung(x, lung=None):
    """The lung field [B, S, S, 1] float32: `lung` when given, else x > 0."""
    return ops.cast(x > 0 if lung is None else lung, "float32")


def segmentation_output(probabilities) -> dict:
    """Class probabilities [..., 4] -> the output every model returns: probabilities float32,
    labels int32 [...] (argmax) and the predictive entropy [...] in nats.

    Plain TensorFlow ops: this also runs inside the exported graphs, and Keras' `ops.argmax`
    adds a BitwiseAnd (its −0.0 handling) that TFLite cannot convert.
    """
    probabilities = tf.cast(probabilities, tf.float32)
    log_p = tf.math.log(tf.maximum(probabilities, ENTROPY_FLOOR))
    return {
        "probabilities": probabilities,
        "labels": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
        "entropy": -tf.reduce_sum(probabilities * log_p, axis=-1),
    }


#: Lesion offsets b that `train --decision auto` tries on the val slices (see `calibrate_lesion`).
LESION_OFFSETS = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)


def lesion_scale(offset: float) -> np.ndarray:
    """[4] float32 factors of the class probabilities for a lesion offset: e^offset for GGO and
    consolidation, 1 for background and healthy lung."""
    w = np.exp(offset)
    return np.array([1.0, 1.0, w, w], np.float32)


def calibrate_lesion(probabilities, offset: float):
    """Class probabilities [..., 4] with the lesion classes (GGO, CON) scaled by e^offset and
    renormalised: a shift of offset nats in their logits, which moves the lesion extent of the
    argmax (offset > 0: more lesion). offset 0 returns `probabilities` unchanged.

    A model under- or over-segments lesions when its training slices' lesion share differs from
    the slices it meets; the offset, chosen on the val slices with the epoch, corrects that
    (docs/DESIGN.md §7.18)."""
    if not offset:
        return probabilities
    scaled = tf.cast(probabilities, tf.float32) * tf.constant(lesion_scale(offset))
    return scaled / tf.maximum(tf.reduce_sum(scaled, axis=-1, keepdims=True), 1e-12)


class SetDice(keras.metrics.Metric):
    """Dice of a class (or a union of classes) over the labelled pixels seen, over batches.

    A pixel is positive when its allowed set lies inside `classes`, negative when it is disjoint
    from them, and ignored otherwise (e.g. a GGO-or-consolidation pixel for GGO alone, or an
    unlabelled lung pixel).
    """

    def __init__(self, classes, name: str | None = None, **kwargs):
        classes = (classes,) if isinstance(classes, int) else tuple(classes)
        super().__init__(name=name or "dice_" + "_".join(CLASS_NAMES[c] for c in classes), **kwargs)
        self.classes = classes
        self.intersection = self.add_variable((), initializer="zeros", name="intersection")
        self.total = self.add_variable((), initializer="zeros", name="total")

    def update_state(self, allowed, predicted):
        """allowed [B,H,W,4] sets; predicted [B,H,W] class ids."""
        inside = ops.convert_to_tensor([float(k in self.classes) for k in range(NUM_CLASSES)])
        n_in = ops.sum(allowed * inside, -1)
        n_out = ops.sum(allowed * (1.0 - inside), -1)
        truth = ops.cast((n_in > 0) & (n_out == 0), "float32")
        scored = truth + ops.cast(n_in == 0, "float32")
        hit = ops.zeros_like(truth, dtype="bool")
        for k in self.classes:
            hit = hit | (predicted == k)
        pred = ops.cast(hit, "float32") * scored
        self.intersection.assign_add(ops.sum(truth * pred))
        self.total.assign_add(ops.sum(truth) + ops.sum(pred))

    def result(self):
        return ops.where(
            self.total > 0, 2.0 * self.intersection / ops.maximum(self.total, 1.0), 0.0
        )

    def get_config(self):
        return super().get_config() | {"classes": list(self.classes)}


class SegmentationModel:
    """Mixin of every Keras segmentation model (before `keras.Model` in the bases).

    Owns `segment` (the one inference entry point: `segmentation_probabilities`, traced once
    per decision rule, or `sampled_probabilities` when `samples` > 0) and the compile plumbing:
    the optimizer's variables are built at once (Keras builds them lazily inside the first
    traced step when no distribution strategy is set, which makes TensorFlow trace that large
    step twice); XLA is off by default (slower on CPU for these models).

    A subclass implements `segmentation_probabilities(x, lung, decision)`; a model with a latent
    to sample or a decision rule sets `stochastic = True` and implements
    `sampled_probabilities(x, lung, samples, decision)`.
    """

    #: whether `samples` and `decision` mean anything for this model
    stochastic = False
    #: lesion offset applied to every output probability (`calibrate_lesion`); saved in the
    #: config and carried into the exports
    lesion_offset = 0.0

    def segmentation_probabilities(self, x, lung, decision: str | None = None):
        """x [B,S,S,1], lung field [B,S,S,1] -> class probabilities [B,S,S,4], inference mode
        (the path exported for serving)."""
        raise NotImplementedError

    def sampled_probabilities(self, x, lung, samples: int, decision: str | None = None):
        """Class probabilities [B,S,S,4] averaged over `samples` latent draws."""
        raise NotImplementedError

    def segment(self, x, lung=None, samples: int = 0, decision: str | None = None) -> dict:
        """Segment x [B, S, S, 1] in inference mode: probabilities [B,S,S,4], labels [B,S,S]
        and entropy [B,S,S] (`segmentation_output`). The lung field is `lung` [B,S,S,1], or
        x > 0 when None. `samples` > 0 averages over latent draws and `decision` picks the
        decision rule: a deterministic model refuses both with a `DataError`."""
        if not self.stochastic:
            check_deterministic(self, samples, decision)
        else:  # resolved now: the traced function is keyed by it, and `decision` may change
            decision = decision or self.decision
        x = ops.convert_to_tensor(x, "float32")
        lung = default_lung(x, lung)
        offset = float(self.lesion_offset)
        if samples > 0:
            probabilities = self.sampled_probabilities(x, lung, samples, decision)
            return segmentation_output(calibrate_lesion(probabilities, offset))
        fn = self._traced_probabilities(decision, offset, tuple(x.shape[1:3]))
        return segmentation_output(fn(x, lung))

    def _traced_probabilities(self, decision: str | None, offset: float, size: tuple[int, int]):
        """`segmentation_probabilities` for one decision rule, lesion offset and slice size
        [H, W], traced once for any batch size and reused (an eager call of StitchNet's graph
        costs seconds, and so does a trace: a trace per batch size would double it for a last,
        short batch)."""
        cache = self.__dict__.get("_probability_fns")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_probability_fns", cache)  # not tracked by Keras
        key = (decision, offset, *size)
        if key not in cache:
            spec = tf.TensorSpec([None, *size, 1], tf.float32)
            cache[key] = tf.function(
                lambda x, lung: calibrate_lesion(
                    self.segmentation_probabilities(x, lung, decision), offset
                ),
                input_signature=[spec, spec],
            )
        return cache[key]

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        offset = float(config.pop("lesion_offset", 0.0))
        model = cls(**config)
        model.lesion_offset = offset
        return model

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


def batchnorm_layers(model) -> list:
    """Every BatchNormalization layer of `model`, nested ones included."""
    return [la for la in model._flatten_layers() if isinstance(la, keras.layers.BatchNormalization)]


def recalibrate_batchnorm(model, batches, steps: int = 20, momentum: float = 0.9) -> int:
    """Re-estimate every BatchNorm layer's moving statistics under inference conditions.

    Moving averages gathered during training lag the weights and, in StitchNet, were gathered
    on sampled z while inference uses the posterior mean: inference-mode predictions can then
    fall far behind training-mode ones. This runs `steps` batches of `batches` (dicts with `x`)
    forward in training mode without gradients, through the model's `calibration_forward`
    (z at the posterior mean) when it has one: the first batch sets the statistics outright,
    the others are averaged in with `momentum`. Returns the number of batches used.

    Each forward runs with the layers' momentum at 0 (a BatchNorm layer reads its momentum when
    traced, so the forward is traced once per model and reused every epoch), which leaves the
    batch's own statistics in the moving variables; the average is taken here.
    """
    norms = batchnorm_layers(model)
    if not norms:
        return 0
    step = model.__dict__.get("_calibration_fn")
    if step is None:
        forward = getattr(model, "calibration_forward", None) or (lambda x: model(x, training=True))
        step = tf.function(forward, reduce_retracing=True)
        object.__setattr__(model, "_calibration_fn", step)  # not tracked by Keras
    saved = [layer.momentum for layer in norms]
    moving = [v for layer in norms for v in (layer.moving_mean, layer.moving_variance)]
    average: list[np.ndarray] = []
    used = 0
    try:
        for layer in norms:
            layer.momentum = 0.0
        for batch in batches.take(steps):
            step(batch["x"])
            now = [np.asarray(v) for v in moving]
            if used:
                now = [
                    momentum * a + (1.0 - momentum) * b for a, b in zip(average, now, strict=True)
                ]
            average = now
            used += 1
    finally:
        for layer, m in zip(norms, saved, strict=True):
            layer.momentum = m
        for variable, value in zip(moving, average, strict=False):
            variable.assign(value)
    return used
