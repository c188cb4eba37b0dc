"""tf.data input pipelines: lazy, parallel, streaming, with augmentation (the paper's or ours).

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
from stitchnet_tf.data.intensity import check_intensity
from stitchnet_tf.data.preprocess import (
    DEFAULT_MARGIN,
    check_model_size,
    check_prepared_intensity,
    prepare,
    read_sample,
)
from stitchnet_tf.errors import DataError
from stitchnet_tf.options import AUGMENTATIONS

AUTOTUNE = tf.data.AUTOTUNE
KEYS = ("x", "allowed", "lung")


class PipelineErrors:
    """The first error raised while reading a slice inside `tf.data` (where it would otherwise
    surface as a long TensorFlow traceback, or not at all), and an optional hook called with
    its one-line message (training uses it to end a run that hangs after such an error)."""

    def __init__(self):
        self.first: str | None = None
        self.hook = None

    def record(self, message: str) -> None:
        if self.first is None:
            self.first = message
        if self.hook is not None:
            self.hook(message)

    def reset(self) -> None:
        self.first, self.hook = None, None


#: errors of every `SliceLoader` in this process
pipeline_errors = PipelineErrors()


class SliceLoader:
    """Reads and preprocesses sample `i` of a list: i -> (x, allowed, lung) numpy arrays.

    Args:
        dataset: where the samples come from (mask map, whether already preprocessed).
        samples: the samples to serve, by position.
        size: model size S.
        window: CT window for Hounsfield data.
        segmenter: lung segmenter for slices without a lung mask (default: the package's).
        margin: crop margin around the lung field.
        intensity: "none" or "standardise" (`preprocess.prepare`).
    """

    def __init__(
        self,
        dataset: Dataset,
        samples: Sequence[Sample],
        size: int,
        window: io.Window = io.Window(),
        segmenter=None,
        margin: float = DEFAULT_MARGIN,
        intensity: str = "none",
    ):
        self.dataset, self.samples = dataset, list(samples)
        self.size, self.window, self.margin = check_model_size(size), window, margin
        self.intensity = check_intensity(intensity)
        check_prepared_intensity(dataset, intensity)
        if segmenter is None:
            from stitchnet_tf.data.lung_unet import default_segmenter

            segmenter = default_segmenter()
        self.segmenter = segmenter

    def __len__(self) -> int:
        return len(self.samples)

    def __call__(self, i) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sample = self.samples[int(i)]
        try:
            raw = read_sample(sample, self.dataset.mask_map, self.window)
            p = prepare(
                raw,
                self.size,
                self.segmenter,
                self.margin,
                already_cropped=self.dataset.prepared_size is not None,
                intensity=self.intensity,
            )
        except DataError as e:
            pipeline_errors.record(str(e))
            raise
        except Exception as e:
            error = DataError(sample.image, f"cannot read ({type(e).__name__}: {e})")
            pipeline_errors.record(str(error))
            raise error from None
        return (
            p.x[..., None].astype(np.float32),
            allowed_to_onehot(p.allowed),
            p.lung[..., None].astype(np.float32),
        )


def _stateless_bool(seed, p: float):
    return tf.random.stateless_uniform([], seed) < p


def _uniform(seed, low: float, high: float):
    return tf.random.stateless_uniform([], seed, low, high)


PAPER_AUGMENTATION = dict(
    crop_fraction=0.8,
    crop_probability=0.5,
    flips=True,
    rotations=True,
    affine_probability=0.0,
    lesion_focus=0.0,
    intensity=False,
)
"""The paper's augmentation: random crops of 80% resized back, flips, 90° rotations."""

RECIPE_AUGMENTATION = dict(
    crop_probability=0.0,
    flips=True,
    rotations=True,
    affine_probability=0.5,
    scale=(0.85, 1.25),
    degrees=15.0,
    lesion_focus=0.33,
    intensity=True,
)
"""The default recipe (docs/DESIGN.md §7): the paper's flips and 90° rotations, plus a random
scale in 0.85–1.25 and rotation within ±15° on half the slices, a third of labelled slices
zoomed onto a lesion pixel, and nnU-Net's intensity transforms inside the lung field."""

AUGMENTATION_SPECS = {"recipe": RECIPE_AUGMENTATION, "paper": PAPER_AUGMENTATION}


def _affine(images, centre, scale, angle, interpolation: str):
    """Resample [S, S, C] `images` so that output pixel o reads input c + R(angle)/scale·(o − m)
    (m the image centre, c = `centre`): a zoom by `scale` and a rotation about `centre`."""
    size = tf.cast(tf.shape(images)[0], tf.float32)
    m = (size - 1.0) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    transform = tf.stack(
        [
            cos,
            -sin,
            centre[1] - cos * m + sin * m,
            sin,
            cos,
            centre[0] - sin * m - cos * m,
            0.0,
            0.0,
        ]
    )
    return keras.ops.image.affine_transform(
        images, transform, interpolation=interpolation, fill_mode="constant"
    )


def _lesion_centre(allowed, seed):
    """(row, col) of a random lesion pixel (background and healthy both excluded), or the
    image centre when there is none, as float32 [2]."""
    size = tf.shape(allowed)[0]
    lesion = tf.reshape((allowed[..., 0] + allowed[..., 1]) == 0, [-1])
    logits = tf.where(lesion, 0.0, -1e9)[None]
    i = tf.random.stateless_categorical(logits, 1, seed)[0, 0]
    found = tf.reduce_any(lesion)
    m = tf.cast(size - 1, tf.float32) / 2.0
    rc = tf.cast(tf.stack([i // tf.cast(size, tf.int64), i % tf.cast(size, tf.int64)]), tf.float32)
    return tf.where(found, rc, tf.stack([m, m])), found


def _gaussian_blur(x, sigma):
    """[S, S, 1] image blurred by a 5x5 Gaussian of width `sigma` (pixels)."""
    r = tf.range(-2.0, 3.0)
    k = tf.exp(-(r**2) / (2.0 * sigma**2))
    k = k / tf.reduce_sum(k)
    kernel = (k[:, None] * k[None, :])[:, :, None, None]
    return tf.nn.conv2d(x[None], kernel, 1, "SAME")[0]


def augment_intensity(x, lung, seed):
    """nnU-Net's intensity transforms on `x` [S, S, 1] inside the lung field `lung`:
    brightness ×0.75–1.25 (p 0.15), contrast ×0.75–1.25 about the lung mean (p 0.15),
    gamma 0.7–1.5 (p 0.3), Gaussian noise σ ≤ 0.03 (p 0.1), Gaussian blur σ 0.5–1 (p 0.2);
    clipped to [0, 1] and zero outside the lung field."""
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 10)

    def maybe(i, p, fn, v):
        return tf.cond(_stateless_bool(s[i], p), lambda: fn(v), lambda: v)

    area = tf.maximum(tf.reduce_sum(lung), 1.0)
    x = maybe(0, 0.15, lambda v: v * _uniform(s[1], 0.75, 1.25), x)

    def contrast(v):
        mean = tf.reduce_sum(v * lung) / area
        return (v - mean) * _uniform(s[3], 0.75, 1.25) + mean

    x = maybe(2, 0.15, contrast, x)
    x = maybe(4, 0.3, lambda v: tf.clip_by_value(v, 0.0, 1.0) ** _uniform(s[5], 0.7, 1.5), x)
    x = maybe(
        6,
        0.1,
        lambda v: v + tf.random.stateless_normal(tf.shape(v), s[7]) * _uniform(s[7], 0.0, 0.03),
        x,
    )
    x = maybe(8, 0.2, lambda v: _gaussian_blur(v, _uniform(s[9], 0.5, 1.0)), x)
    return tf.clip_by_value(x, 0.0, 1.0) * tf.cast(lung > 0, x.dtype)


def augment(
    example: dict,
    seed,
    crop_fraction: float = 0.8,
    crop_probability: float = 0.5,
    flips: bool = True,
    rotations: bool = True,
    affine_probability: float = 0.0,
    scale: tuple[float, float] = (0.85, 1.25),
    degrees: float = 15.0,
    lesion_focus: float = 0.0,
    intensity: bool = False,
) -> dict:
    """Augmentation, identical in geometry on image, allowed sets and lung mask.

    The defaults are the paper's: with probability `crop_probability` a random square crop of
    `crop_fraction` of the side, resized back (image bilinear, masks nearest); random vertical
    and horizontal flips; a random multiple of 90° rotation. Beyond the paper (see
    `RECIPE_AUGMENTATION`): with probability `affine_probability` a zoom by a factor in `scale`
    (below 1 shrinks, the border filled with background) and a rotation within ±`degrees`;
    with probability `lesion_focus`, on slices with a lesion pixel, a zoom of 1–1.25 whose
    window holds a random lesion pixel (foreground oversampling); `intensity`:
    `augment_intensity`. `seed` is a stateless [2] int seed.
    """
    x, allowed, lung = example["x"], example["allowed"], example["lung"]
    size = tf.shape(x)[0]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 13)
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
    if affine_probability > 0 or lesion_focus > 0:
        m = tf.cast(size - 1, tf.float32) / 2.0
        centre, zoom, angle = tf.stack([m, m]), tf.constant(1.0), tf.constant(0.0)
        if affine_probability > 0:
            use = _stateless_bool(seeds[6], affine_probability)
            zoom = tf.where(use, tf.exp(_uniform(seeds[7], *map(float, np.log(scale)))), 1.0)
            rad = degrees * np.pi / 180.0
            angle = tf.where(use, _uniform(seeds[8], -rad, rad), 0.0)
        if lesion_focus > 0:
            target, found = _lesion_centre(masks[..., :NUM_CLASSES], seeds[9])
            focus = tf.logical_and(found, _stateless_bool(seeds[10], lesion_focus))
            zoom = tf.where(focus, tf.maximum(zoom, _uniform(seeds[11], 1.0, 1.25)), zoom)
            # the window (side S/zoom) moves as far towards the lesion pixel as the image allows
            half = (tf.cast(size, tf.float32) / zoom) / 2.0
            held = tf.clip_by_value(target, half - 0.5, tf.cast(size, tf.float32) - half - 0.5)
            centre = tf.where(focus, held, centre)

        def resample():
            xs = tf.cast(_affine(x, centre, zoom, angle, "bilinear"), x.dtype)
            ms = tf.cast(_affine(masks, centre, zoom, angle, "nearest"), masks.dtype)
            # pixels brought in from outside the slice are known background
            empty = tf.reduce_sum(ms[..., :NUM_CLASSES], -1, keepdims=True) == 0
            first = tf.one_hot(0, NUM_CLASSES, dtype=ms.dtype)
            classes = tf.where(empty, first, ms[..., :NUM_CLASSES])
            return xs, tf.concat([classes, ms[..., NUM_CLASSES:]], -1)

        # most slices keep the identity transform: no resampling for them
        moved = (zoom != 1.0) | (angle != 0.0) | tf.reduce_any(centre != m)
        x, masks = tf.cond(moved, resample, lambda: (x, masks))
    if intensity:
        x = augment_intensity(x, masks[..., NUM_CLASSES:], seeds[12])
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


def augmentation_options(augmentation: str | dict | bool) -> dict | None:
    """`augment` options for a named augmentation (`recipe`, `paper`, `none`), a dict of
    options, True (the recipe) or False (none)."""
    if augmentation is True:
        return dict(RECIPE_AUGMENTATION)
    if augmentation is False or augmentation == "none":
        return None
    if isinstance(augmentation, dict):
        return augmentation
    if augmentation not in AUGMENTATION_SPECS:
        raise DataError(
            None,
            f"unknown augmentation {augmentation!r}: use one of {', '.join(AUGMENTATIONS)}",
        )
    return dict(AUGMENTATION_SPECS[augmentation])


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
    augmentation: str | dict | bool = False,
    cache: str | bool = False,
    skip_bad: bool = False,
    num_parallel_calls: int = AUTOTUNE,
) -> tf.data.Dataset:
    """Unbatched examples served by `loader`, read lazily and in parallel.

    Args:
        shuffle: reshuffle each epoch (the order of indices; with `cache`, a buffer of examples).
        seed: seeds the shuffle and the augmentation.
        repeat: repeat forever (for step-based training).
        augmentation: a name (`recipe`, `paper`, `none`), True (the recipe), False, or a dict
            of `augment` options.
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
    options = augmentation_options(augmentation)
    if options is not None:
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
    use_withheld: bool = True,
    unlabelled_per_batch: int | None = None,
    seed: int = 0,
    augmentation: str | dict | bool = True,
    cache: str | bool = False,
    skip_bad: bool = False,
    segmenter=None,
    window: io.Window = io.Window(),
    intensity: str = "none",
) -> tf.data.Dataset:
    """Endless shuffled, augmented training batches mixing labelled and unlabelled slices.

    Args:
        labelled: the labelled dataset; `train_ids` (a split's train part) selects from it.
        unlabelled: an unlabelled dataset, or None.
        withheld_ids: train ids whose labels are withheld (`Split.unlabelled`): never in the
            labelled stream; they join the unlabelled stream without their masks when
            `use_withheld`, else (a supervised run) they are left out.
        batch_size: labelled examples in each batch.
        unlabelled_per_batch: unlabelled examples added to each batch when there are any
            (default: `batch_size`), so that a run with unlabelled data sees as many labelled
            slices per step as one without.
    """
    wanted = set(train_ids if train_ids is not None else (s.id for s in labelled.samples))
    withheld = set(withheld_ids)
    lab = [s for s in labelled.samples if s.id in wanted and s.id not in withheld and s.labelled]
    pool = [s.unlabel() for s in labelled.samples if s.id in wanted and s.id in withheld]
    pool = pool if use_withheld else []
    if not lab:
        raise DataError(labelled.root, "no labelled training slices (check the split)")
    common = dict(
        seed=seed, shuffle=True, repeat=True, augmentation=augmentation, skip_bad=skip_bad
    )
    lab_ds = slice_dataset(
        SliceLoader(labelled, lab, size, window, segmenter, intensity=intensity),
        cache=f"{cache}-labelled" if isinstance(cache, str) else cache,
        **common,
    )
    streams = []
    if pool:
        streams.append(
            slice_dataset(
                SliceLoader(labelled, pool, size, window, segmenter, intensity=intensity),
                cache=f"{cache}-withheld" if isinstance(cache, str) else cache,
                **common,
            )
        )
    if unlabelled is not None and len(unlabelled):
        streams.append(
            slice_dataset(
                SliceLoader(
                    unlabelled,
                    [s.unlabel() for s in unlabelled.samples],
                    size,
                    window,
                    segmenter,
                    intensity=intensity,
                ),
                cache=f"{cache}-unlabelled" if isinstance(cache, str) else cache,
                **common,
            )
        )
    if not streams:
        return mixed_batches(lab_ds, None, batch_size)
    if len(streams) == 2:  # draw unlabelled slices from both pools in proportion to their size
        n_pool, n_unl = len(pool), len(unlabelled.samples)
        unl_ds = tf.data.Dataset.sample_from_datasets(
            streams, weights=[n_pool / (n_pool + n_unl), n_unl / (n_pool + n_unl)], seed=seed
        )
    else:
        unl_ds = streams[0]
    extra = batch_size if unlabelled_per_batch is None else unlabelled_per_batch
    if extra < 1:
        raise ValueError(f"unlabelled_per_batch must be at least 1, got {extra}")
    return mixed_batches(lab_ds, unl_ds, batch_size + extra, labelled_per_batch=batch_size)
