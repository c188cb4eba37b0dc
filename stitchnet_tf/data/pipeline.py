"""tf.data input pipelines: lazy, parallel, streaming, with the paper's augmentation.

An example is a dict of
- `x`: [S, S, 1] float32 in [0, 1], the preprocessed slice (zero outside the lung field);
- `allowed`: [S, S, 4] float32, 1 where a class is allowed (the label as a class set);
- `lung`: [S, S, 1] float32, the lung field.
Slices are read and preprocessed in parallel `tf.numpy_function` workers only when the pipeline
reaches them, so a dataset of any size streams from disk; only the list of sample paths is held
in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from stitchnet_tf.data import io
from stitchnet_tf.data.classes import NUM_CLASSES, allowed_to_onehot
from stitchnet_tf.data.datasets import Dataset, Sample
from stitchnet_tf.data.preprocess import DEFAULT_MARGIN, check_model_size, prepare, read_sample
from stitchnet_tf.errors import DataError

AUTOTUNE = tf.data.AUTOTUNE
KEYS = ("x", "allowed", "lung")


class SliceLoader:
    """Reads and preprocesses sample `i` of a list: i -> (x, allowed, lung) numpy arrays.

    Args:
        dataset: where the samples come from (mask map, whether already preprocessed).
        samples: the samples to serve, by position.
        size: model size S.
        window: CT window for Hounsfield data.
        segmenter: lung segmenter for slices without a lung mask (default: the package's).
        margin: crop margin around the lung field.
    """

    def __init__(
        self,
        dataset: Dataset,
        samples: Sequence[Sample],
        size: int,
        window: io.Window = io.Window(),
        segmenter=None,
        margin: float = DEFAULT_MARGIN,
    ):
        self.dataset, self.samples = dataset, list(samples)
        self.size, self.window, self.margin = check_model_size(size), window, margin
        if segmenter is None:
            from stitchnet_tf.data.lungmask import default_segmenter

            segmenter = default_segmenter()
        self.segmenter = segmenter

    def __len__(self) -> int:
        return len(self.samples)

    def __call__(self, i) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sample = self.samples[int(i)]
        raw = read_sample(sample, self.dataset.mask_map, self.window)
        p = prepare(
            raw,
            self.size,
            self.segmenter,
            self.margin,
            already_cropped=self.dataset.prepared_size is not None,
        )
        return (
            p.x[..., None].astype(np.float32),
            allowed_to_onehot(p.allowed),
            p.lung[..., None].astype(np.float32),
        )


def _stateless_bool(seed, p: float):
    return tf.random.stateless_uniform([], seed) < p


def augment(
    example: dict,
    seed,
    crop_fraction: float = 0.8,
    crop_probability: float = 0.5,
    flips: bool = True,
    rotations: bool = True,
) -> dict:
    """The paper's augmentation, identical on image, allowed sets and lung mask.

    With probability `crop_probability` a random square crop of `crop_fraction` of the side,
    resized back (image bilinear, masks nearest); random vertical and horizontal flips; a
    random multiple of 90° rotation. `seed` is a stateless [2] int seed.
    """
    x, allowed, lung = example["x"], example["allowed"], example["lung"]
    size = tf.shape(x)[0]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
    masks = tf.concat([allowed, lung], axis=-1)
    if crop_probability > 0:
        side = tf.cast(tf.round(tf.cast(size, tf.float32) * crop_fraction), tf.int32)
        limit = size - side + 1
        oy = tf.random.stateless_uniform([], seeds[0], 0, limit, tf.int32)
        ox = tf.random.stateless_uniform([], seeds[1], 0, limit, tf.int32)

        def crop():
            xs = tf.image.resize(x[oy : oy + side, ox : ox + side], [size, size], "bilinear")
            ms = tf.image.resize(masks[oy : oy + side, ox : ox + side], [size, size], "nearest")
            return tf.cast(xs, x.dtype), tf.cast(ms, masks.dtype)

        x, masks = tf.cond(_stateless_bool(seeds[2], crop_probability), crop, lambda: (x, masks))
    both = tf.concat([x, masks], axis=-1)
    if flips:
        both = tf.cond(_stateless_bool(seeds[3], 0.5), lambda: tf.reverse(both, [0]), lambda: both)
        both = tf.cond(_stateless_bool(seeds[4], 0.5), lambda: tf.reverse(both, [1]), lambda: both)
    if rotations:
        k = tf.random.stateless_uniform([], seeds[5], 0, 4, tf.int32)
        both = tf.image.rot90(both, k)
    return {
        "x": both[..., :1],
        "allowed": both[..., 1 : 1 + NUM_CLASSES],
        "lung": both[..., 1 + NUM_CLASSES :],
    }


@keras.saving.register_keras_serializable(package="stitchnet_tf")
class PairedAugmentation(keras.layers.Layer):
    """Keras preprocessing layer around `augment` for a batch of examples.

    Call it on a dict batch {x [B,S,S,1], allowed [B,S,S,4], lung [B,S,S,1]}; in inference
    (`training=False`) it is the identity.
    """

    def __init__(
        self,
        crop_fraction: float = 0.8,
        crop_probability: float = 0.5,
        flips: bool = True,
        rotations: bool = True,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.crop_fraction, self.crop_probability = crop_fraction, crop_probability
        self.flips, self.rotations, self.seed = flips, rotations, seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self._allow_non_tensor_positional_args = True

    def call(self, inputs: dict, training: bool = True) -> dict:
        if not training:
            return inputs
        batch = tf.shape(inputs["x"])[0]
        base = tf.cast(self.seed_generator.next(), tf.int64)
        seeds = tf.random.experimental.stateless_split(base, batch)
        return tf.map_fn(
            lambda args: augment(
                args[0],
                args[1],
                self.crop_fraction,
                self.crop_probability,
                self.flips,
                self.rotations,
            ),
            ({k: inputs[k] for k in KEYS}, seeds),
            fn_output_signature={k: inputs[k].dtype for k in KEYS},
        )

    def get_config(self) -> dict:
        return super().get_config() | {
            "crop_fraction": self.crop_fraction,
            "crop_probability": self.crop_probability,
            "flips": self.flips,
            "rotations": self.rotations,
            "seed": self.seed,
        }


def slice_dataset(
    loader: SliceLoader,
    *,
    shuffle: bool = False,
    seed: int = 0,
    repeat: bool = False,
    augmentation: dict | bool = False,
    cache: str | bool = False,
    skip_bad: bool = False,
    num_parallel_calls: int = AUTOTUNE,
) -> tf.data.Dataset:
    """Unbatched examples served by `loader`, read lazily and in parallel.

    Args:
        shuffle: reshuffle each epoch (the order of indices; with `cache`, a buffer of examples).
        seed: seeds the shuffle and the augmentation.
        repeat: repeat forever (for step-based training).
        augmentation: True for the paper's augmentation, or a dict of `augment` options.
        cache: True to cache preprocessed slices in memory, or a file path prefix.
        skip_bad: drop slices that fail to read (each logged) instead of stopping.
    """
    n = len(loader)
    size = loader.size

    def load(i):
        x, allowed, lung = tf.numpy_function(
            loader, [i], (tf.float32, tf.float32, tf.float32), stateful=False
        )
        x.set_shape([size, size, 1])
        allowed.set_shape([size, size, NUM_CLASSES])
        lung.set_shape([size, size, 1])
        return {"x": x, "allowed": allowed, "lung": lung}

    ds = tf.data.Dataset.range(n)
    if shuffle and not cache:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(load, num_parallel_calls=num_parallel_calls)
    if skip_bad:
        ds = ds.ignore_errors(log_warning=True)
    if cache:
        ds = ds.cache("" if cache is True else str(cache))
        if shuffle:
            ds = ds.shuffle(min(n, 512), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if augmentation:
        options = augmentation if isinstance(augmentation, dict) else {}
        seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda ex, s: augment(ex, s, **options), num_parallel_calls=num_parallel_calls
        )
    return ds


def mixed_batches(
    labelled: tf.data.Dataset,
    unlabelled: tf.data.Dataset | None,
    batch_size: int,
    labelled_per_batch: int | None = None,
) -> tf.data.Dataset:
    """Batches holding exactly `labelled_per_batch` labelled and the rest unlabelled examples.

    Both inputs are unbatched and should repeat (training runs by steps). With no unlabelled
    data, or `labelled_per_batch == batch_size`, batches are labelled only.
    """
    if labelled_per_batch is None:
        labelled_per_batch = batch_size if unlabelled is None else max(1, batch_size // 2)
    if not 0 <= labelled_per_batch <= batch_size or batch_size < 1:
        raise ValueError(
            f"labelled_per_batch must be in [0, batch_size={batch_size}], got {labelled_per_batch}"
        )
    n_unlabelled = batch_size - labelled_per_batch
    if unlabelled is None or n_unlabelled == 0:
        return labelled.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
    if labelled_per_batch == 0:
        return unlabelled.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
    pairs = tf.data.Dataset.zip(
        labelled.batch(labelled_per_batch, drop_remainder=True),
        unlabelled.batch(n_unlabelled, drop_remainder=True),
    )
    return pairs.map(
        lambda a, b: {k: tf.concat([a[k], b[k]], axis=0) for k in KEYS},
        num_parallel_calls=AUTOTUNE,
    ).prefetch(AUTOTUNE)


def training_batches(
    labelled: Dataset,
    unlabelled: Dataset | None,
    size: int,
    batch_size: int,
    *,
    train_ids: Sequence[str] | None = None,
    withheld_ids: Sequence[str] = (),
    labelled_per_batch: int | None = None,
    seed: int = 0,
    augmentation: dict | bool = True,
    cache: str | bool = False,
    skip_bad: bool = False,
    segmenter=None,
    window: io.Window = io.Window(),
) -> tf.data.Dataset:
    """Endless shuffled, augmented training batches mixing labelled and unlabelled slices.

    Args:
        labelled: the labelled dataset; `train_ids` (a split's train part) selects from it.
        unlabelled: an unlabelled dataset, or None.
        withheld_ids: train ids whose labels are withheld (`Split.unlabelled`): they join the
            unlabelled stream without their masks.
        labelled_per_batch: labelled examples in each batch (default: half, or all when there
            is nothing unlabelled).
    """
    wanted = set(train_ids if train_ids is not None else (s.id for s in labelled.samples))
    withheld = set(withheld_ids)
    lab = [s for s in labelled.samples if s.id in wanted and s.id not in withheld and s.labelled]
    pool = [s.unlabel() for s in labelled.samples if s.id in wanted and s.id in withheld]
    if not lab:
        raise DataError(labelled.root, "no labelled training slices (check the split)")
    common = dict(
        seed=seed, shuffle=True, repeat=True, augmentation=augmentation, skip_bad=skip_bad
    )
    lab_ds = slice_dataset(
        SliceLoader(labelled, lab, size, window, segmenter),
        cache=f"{cache}-labelled" if isinstance(cache, str) else cache,
        **common,
    )
    streams = []
    if pool:
        streams.append(
            slice_dataset(
                SliceLoader(labelled, pool, size, window, segmenter),
                cache=f"{cache}-withheld" if isinstance(cache, str) else cache,
                **common,
            )
        )
    if unlabelled is not None and len(unlabelled):
        streams.append(
            slice_dataset(
                SliceLoader(
                    unlabelled, [s.unlabel() for s in unlabelled.samples], size, window, segmenter
                ),
                cache=f"{cache}-unlabelled" if isinstance(cache, str) else cache,
                **common,
            )
        )
    if not streams:
        return mixed_batches(lab_ds, None, batch_size, labelled_per_batch)
    if len(streams) == 2:  # draw unlabelled slices from both pools in proportion to their size
        n_pool, n_unl = len(pool), len(unlabelled.samples)
        unl_ds = tf.data.Dataset.sample_from_datasets(
            streams, weights=[n_pool / (n_pool + n_unl), n_unl / (n_pool + n_unl)], seed=seed
        )
    else:
        unl_ds = streams[0]
    return mixed_batches(lab_ds, unl_ds, batch_size, labelled_per_batch)
