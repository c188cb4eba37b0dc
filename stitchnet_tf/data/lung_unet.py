"""A small learned lung-field segmenter (U-Net) behind the `LungSegmenter` interface.

`build_lung_unet` makes the network (a plain Keras functional model of built-in layers, so
`keras.models.load_model(path, safe_mode=True)` loads it without custom objects);
`LearnedLungMask` wraps a saved model as a `LungSegmenter`; `default_segmenter()` returns the
shipped model `lung-unet` (`stitchnet_tf.shipped`); a missing or unreadable model file is a
`DataError`, never a silent fallback to the classical `AutoLungMask`. The trained model and how
it was made:
`saved_models/lung_unet/MODEL_CARD.md`; training: `benchmarks/train_lung_unet.py`.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stitchnet_tf.data.lungmask import LungSegmenter, fill_holes
from stitchnet_tf.errors import DataError
from stitchnet_tf.shipped import DEFAULT_LUNG_MODEL, location

#: The shipped model (`saved_models/lung_unet/lung_unet.keras`, installed as package data).
DEFAULT_MODEL = location(DEFAULT_LUNG_MODEL)
#: Environment variable naming another lung model file (e.g. one trained without some slices).
LUNG_MODEL_ENV = "STITCHNET_TF_LUNG_MODEL"
#: Default working size of the network (the slice is resized to size x size).
DEFAULT_SIZE = 128
#: Smallest image side `LearnedLungMask` accepts (smaller slices give an empty mask).
MIN_SIDE = 32


def build_lung_unet(
    size: int = DEFAULT_SIZE, filters: Sequence[int] = (8, 16, 32, 64, 96), name: str = "lung_unet"
):
    """U-Net [B, size, size, 1] in [0, 1] -> lung probability [B, size, size, 1] (sigmoid).

    One level per entry of `filters` (the last is the bottleneck); each level is two
    3x3 Conv -> BatchNorm -> ReLU; 2x2 max pooling down, bilinear upsampling + skip
    concatenation up. Built-in layers only.
    """
    import keras
    from keras import layers

    if size % (2 ** (len(filters) - 1)):
        raise ValueError(f"size {size} must be divisible by {2 ** (len(filters) - 1)}")

    def block(x, f: int, tag: str):
        for j in (1, 2):
            x = layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"{tag}_conv{j}")(x)
            x = layers.BatchNormalization(name=f"{tag}_bn{j}")(x)
            x = layers.ReLU(name=f"{tag}_relu{j}")(x)
        return x

    inp = keras.Input((size, size, 1), name="image")
    x, skips = inp, []
    for i, f in enumerate(filters[:-1]):
        x = block(x, f, f"down{i}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = block(x, filters[-1], "bottom")
    for i in reversed(range(len(filters) - 1)):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{i}")(x)
        x = layers.Concatenate(name=f"skip{i}")([x, skips[i]])
        x = block(x, filters[i], f"dec{i}")
    out = layers.Conv2D(1, 1, activation="sigmoid", name="lung")(x)
    return keras.Model(inp, out, name=name)


def normalise(image: np.ndarray) -> np.ndarray | None:
    """[H, W] (or [H, W, 1]) slice -> float32 min-max scaled to [0, 1]; None if constant."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim != 2:
        raise ValueError(f"expected one slice [H, W] or [H, W, 1], got shape {img.shape}")
    img = np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(img.min()), float(img.max())
    if not hi - lo > 1e-6 * max(1.0, abs(lo), abs(hi)):
        return None
    return (img - lo) * np.float32(1.0 / (hi - lo))


def to_working_size(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W] float32 -> [size, size] float32 (area averaging down, bilinear up)."""
    h, w = image.shape
    interp = cv2.INTER_AREA if h >= size and w >= size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def keep_components(mask: np.ndarray, max_components: int, min_area: float) -> np.ndarray:
    """The largest `max_components` components of at least `min_area` of the image, holes filled."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros(mask.shape, bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(areas)[::-1][:max_components]
    keep = [i + 1 for i in order if areas[i] >= min_area * mask.size]
    if not keep:
        return np.zeros(mask.shape, bool)
    return fill_holes(np.isin(lab, keep))


def mask_from_probability(
    prob: np.ndarray,
    shape: tuple[int, int],
    threshold: float = 0.5,
    upsample: str = "linear",
    max_components: int = 3,
    min_area: float = 0.002,
) -> np.ndarray:
    """Working-size lung probability [S, S] -> cleaned [H, W] bool mask.

    `upsample`: "linear" resizes the probability bilinearly and then thresholds (smoother edges,
    about +0.006 Dice on the validation patients at 256 px); "nearest" thresholds first and
    resizes the binary mask with nearest neighbour.
    """
    h, w = shape
    if upsample == "linear":
        big = cv2.resize(prob.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        mask = big > threshold
    elif upsample == "nearest":
        small = (prob > threshold).astype(np.uint8)
        mask = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    else:
        raise ValueError(f"upsample must be 'linear' or 'nearest', got {upsample!r}")
    if not mask.any():
        return mask
    return keep_components(mask, max_components, min_area)


class LearnedLungMask:
    """Lung-field mask of one axial slice by a small U-Net (a `LungSegmenter`).

    The slice is min-max scaled, resized to the network's working size and segmented; the
    probability is resized back (bilinear, `upsample="linear"`, the default) and thresholded at
    `threshold` (or thresholded and resized with nearest neighbour, `upsample="nearest"`), and
    the mask is cleaned: the largest `max_components` components of at least `min_area`
    (fraction of H*W) are kept and their holes filled.

    Input: [H, W] (or [H, W, 1]) lung-window slice of any size >= 32 px (smaller ones give an
    empty mask); output [H, W] bool, empty for a constant slice. Calls are thread-safe (the
    network runs under a lock; resizing and cleaning run in parallel).

    Args:
        model: path of a saved `.keras` model (default: the shipped one).
        threshold: on the lung probability.
        upsample: "linear" or "nearest", see above.
        max_components, min_area: post-processing, see above.
        batch_size: chunk size of `predict_batch`.
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        threshold: float = 0.5,
        upsample: str = "linear",
        max_components: int = 3,
        min_area: float = 0.002,
        batch_size: int = 16,
    ) -> None:
        import keras
        import tensorflow as tf

        self.path = Path(model)
        self.net = keras.models.load_model(self.path, safe_mode=True, compile=False)
        shape = tuple(self.net.input_shape)
        if len(shape) != 4 or shape[1] != shape[2] or shape[1] is None or shape[3] != 1:
            raise ValueError(f"{self.path}: expected input [B, S, S, 1], got {shape}")
        self.size = int(shape[1])
        self.threshold = float(threshold)
        if upsample not in ("linear", "nearest"):
            raise ValueError(f"upsample must be 'linear' or 'nearest', got {upsample!r}")
        self.upsample = upsample
        self.max_components = int(max_components)
        self.min_area = float(min_area)
        self.batch_size = int(batch_size)
        self._lock = threading.Lock()
        spec = tf.TensorSpec([None, self.size, self.size, 1], tf.float32)
        self._predict = tf.function(
            lambda x: self.net(x, training=False), input_signature=[spec], reduce_retracing=True
        )
        self._predict(tf.zeros([1, self.size, self.size, 1]))  # trace once, now

    def get_config(self) -> dict[str, Any]:
        """Method name, model file name, working size and post-processing parameters."""
        return {
            "method": "learned-unet",
            "model": self.path.name,
            "size": self.size,
            "threshold": self.threshold,
            "upsample": self.upsample,
            "max_components": self.max_components,
            "min_area": self.min_area,
        }

    def __repr__(self) -> str:
        return f"LearnedLungMask({str(self.path)!r}, threshold={self.threshold})"

    def probability(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Lung probability [N, S, S] at the working size of N slices (constant ones: zeros)."""
        x = np.zeros((len(images), self.size, self.size, 1), np.float32)
        live = []
        for k, image in enumerate(images):
            img = normalise(image)
            if img is not None and min(img.shape) >= MIN_SIDE:
                x[k, ..., 0] = to_working_size(img, self.size)
                live.append(k)
        out = np.zeros((len(images), self.size, self.size), np.float32)
        for s in range(0, len(live), self.batch_size):
            idx = live[s : s + self.batch_size]
            with self._lock:
                out[idx] = np.asarray(self._predict(x[idx]))[..., 0]
        return out

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Masks of several slices (any sizes) with batched network calls."""
        shapes = []
        for image in images:
            a = np.asarray(image)
            if a.ndim == 3 and a.shape[-1] == 1:
                a = a[..., 0]
            if a.ndim != 2:
                raise ValueError(f"expected one slice [H, W] or [H, W, 1], got shape {a.shape}")
            shapes.append(a.shape)
        probs = self.probability(images)
        return [
            mask_from_probability(
                p, s, self.threshold, self.upsample, self.max_components, self.min_area
            )
            for p, s in zip(probs, shapes, strict=True)
        ]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.predict_batch([image])[0]


@functools.lru_cache(maxsize=8)
def _cached_segmenter(path: Path) -> LungSegmenter:
    if not path.is_file():
        raise DataError(path, "lung model not found (reinstall stitchnet-tf for the shipped one)")
    try:
        return LearnedLungMask(path)
    except Exception as e:  # keras raises many types for bad files
        raise DataError(
            path, f"cannot load the lung model ({type(e).__name__}: {str(e)[:200]})"
        ) from None


def default_segmenter(path: str | os.PathLike | None = None) -> LungSegmenter:
    """`LearnedLungMask(path)`, loaded once per process and path.

    `path` defaults to the file named by the environment variable `STITCHNET_TF_LUNG_MODEL`,
    else the shipped `lung-unet`. A missing or unreadable file is a `DataError`: the classical
    `AutoLungMask` (Dice 0.924 against 0.968) is used only when asked for by name.
    """
    if path is None and os.environ.get(LUNG_MODEL_ENV):
        path = Path(os.environ[LUNG_MODEL_ENV])
        if not path.is_file():
            raise DataError(path, f"lung model named by {LUNG_MODEL_ENV} not found")
    return _cached_segmenter(Path(DEFAULT_MODEL if path is None else path).resolve())
