"""Lung-field preprocessing (the paper's pipeline) with an exact inverse.

For each slice: find the lung field (a supplied lung mask, or a `LungSegmenter`), zero
everything outside it, crop to it with a small margin, pad to a square and resize to the model
size. `Geometry` records each step so that predictions at model size map back onto the original
image (`Geometry.to_original`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from stitchnet_tf.data import io
from stitchnet_tf.data.classes import (
    ALL,
    BACKGROUND,
    MaskValueMap,
    bits,
    combine_with_lung,
    lung_field_of,
)
from stitchnet_tf.data.datasets import Dataset, Sample
from stitchnet_tf.data.intensity import check_intensity, standardise, to_uint8
from stitchnet_tf.errors import DataError
from stitchnet_tf.fileio import atomic_dir, check_apart, check_output_dir
from stitchnet_tf.options import CROP_MARGIN, PAPER_SIZE, check_model_size  # noqa: F401 (re-exported)

#: the file that marks a folder written by `preprocess` (what --overwrite may replace)
DATASET_MARKER = "dataset.json"

DEFAULT_SIZE = PAPER_SIZE
DEFAULT_MARGIN = CROP_MARGIN


def _resize(arr: np.ndarray, shape: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resize [H, W] or [H, W, C] to `shape` (rows, cols): `nearest` for labels, else linear."""
    h, w = shape
    if arr.shape[:2] == (h, w):
        return arr.copy()
    if interpolation == "nearest":
        flag = cv2.INTER_NEAREST_EXACT
    elif h < arr.shape[0] or w < arr.shape[1]:
        flag = cv2.INTER_AREA
    else:
        flag = cv2.INTER_LINEAR
    dtype = arr.dtype
    src = arr.astype(np.uint8) if dtype == np.bool_ else arr
    if src.dtype not in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        src = src.astype(np.float32)
    channels = src.shape[2] if src.ndim == 3 else 0
    if channels > 4:  # OpenCV resizes at most 4 channels at once (for some flags)
        out = np.stack([_resize(src[..., c], shape, interpolation) for c in range(channels)], -1)
    else:
        out = cv2.resize(src, (w, h), interpolation=flag)
        if channels == 1:
            out = out[..., None]
    return out.astype(dtype)


@dataclass(frozen=True)
class Geometry:
    """Where the model-size square came from in the original slice.

    Attributes:
        orig_shape: (H, W) of the original slice.
        box: (y0, y1, x0, x1), the half-open crop box in the original slice.
        pad: (top, left), offset of the crop inside the padded square.
        side: side of the padded square, max(y1 - y0, x1 - x0).
        size: model size (the square is resized from `side` to `size`).
    """

    orig_shape: tuple[int, int]
    box: tuple[int, int, int, int]
    pad: tuple[int, int]
    side: int
    size: int

    @classmethod
    def from_field(
        cls, lung_field: np.ndarray, size: int, margin: float = DEFAULT_MARGIN
    ) -> Geometry:
        """Crop box around `lung_field` [H, W] bool plus `margin` of its larger side."""
        H, W = lung_field.shape
        ys, xs = np.nonzero(lung_field.any(1))[0], np.nonzero(lung_field.any(0))[0]
        if ys.size == 0:
            y0, y1, x0, x1 = 0, H, 0, W
        else:
            y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
            m = max(2, int(round(margin * max(y1 - y0, x1 - x0))))
            y0, y1, x0, x1 = max(0, y0 - m), min(H, y1 + m), max(0, x0 - m), min(W, x1 + m)
        h, w = y1 - y0, x1 - x0
        side = max(h, w)
        return cls(
            (H, W),
            (int(y0), int(y1), int(x0), int(x1)),
            (int(side - h) // 2, int(side - w) // 2),
            int(side),
            int(size),
        )

    @classmethod
    def identity(cls, shape: tuple[int, int], size: int) -> Geometry:
        """No crop: the whole slice padded to a square."""
        return cls.from_field(np.zeros(shape, bool), size)

    def to_model(self, arr: np.ndarray, interpolation: str = "linear", fill=0) -> np.ndarray:
        """Original [H, W(, C)] -> model [size, size(, C)]: crop, pad with `fill`, resize."""
        y0, y1, x0, x1 = self.box
        crop = arr[y0:y1, x0:x1]
        square = np.full((self.side, self.side, *arr.shape[2:]), fill, arr.dtype)
        top, left = self.pad
        square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
        return _resize(square, (self.size, self.size), interpolation)

    def to_original(self, arr: np.ndarray, interpolation: str = "nearest", fill=0) -> np.ndarray:
        """Model [size, size(, C)] -> original [H, W(, C)]; outside the crop box is `fill`."""
        square = _resize(arr, (self.side, self.side), interpolation)
        y0, y1, x0, x1 = self.box
        top, left = self.pad
        out = np.full((*self.orig_shape, *arr.shape[2:]), fill, arr.dtype)
        out[y0:y1, x0:x1] = square[top : top + (y1 - y0), left : left + (x1 - x0)]
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(
            tuple(d["orig_shape"]), tuple(d["box"]), tuple(d["pad"]), int(d["side"]), int(d["size"])
        )


@dataclass
class RawSlice:
    """A slice as read: image [H, W] float32 in [0, 1], allowed sets [H, W] uint8 (all four
    classes where unlabelled), supplied lung mask [H, W] bool or None."""

    image: np.ndarray
    allowed: np.ndarray
    lung: np.ndarray | None


@dataclass
class Prepared:
    """A slice ready for the model: x [S, S] float32 in [0, 1] (zero outside the lung field),
    allowed [S, S] uint8 bit sets, lung [S, S] bool lung field, its `Geometry`, and the lung
    field [H, W] bool in the original geometry (`field`)."""

    x: np.ndarray
    allowed: np.ndarray
    lung: np.ndarray
    geometry: Geometry
    field: np.ndarray | None = None


def _same_size(mask: np.ndarray, image: np.ndarray, path: str, what: str) -> None:
    if mask.shape != image.shape:
        raise DataError(
            path,
            f"{what} is {mask.shape[0]}x{mask.shape[1]} but its image is "
            f"{image.shape[0]}x{image.shape[1]}",
        )


def read_sample(
    sample: Sample, mask_map: MaskValueMap, window: io.Window = io.Window()
) -> RawSlice:
    """Read a sample's image, mask (as allowed sets) and lung mask, checking their sizes."""
    image = io.read_image(sample.image, sample.slice, window)
    io.check_size(image.shape, sample.image)
    if sample.mask is not None:
        stored = io.read_mask(sample.mask, sample.slice)
        _same_size(stored, image, sample.mask, "mask")
        allowed = mask_map.to_allowed(stored, sample.mask)
    else:
        allowed = np.full(image.shape, ALL, np.uint8)
    lung = None
    if sample.lung is not None:
        lung = io.read_lung(sample.lung, sample.slice)
        _same_size(lung, image, sample.lung, "lung mask")
    return RawSlice(image, allowed, lung)


def check_samples(
    dataset: Dataset, samples: Sequence[Sample], window: io.Window = io.Window()
) -> int:
    """Read every sample a run will use before its first step (image, mask values, lung mask,
    sizes), so that a bad file is a one-line `DataError` naming it instead of an error inside
    `tf.data`. Of a volume only the first and last slices are read. Returns the slices read."""
    volumes: dict[str, list[int]] = {}
    plain = []
    for s in samples:
        if s.slice is None:
            plain.append(s)
        else:
            volumes.setdefault(str(s.image), []).append(int(s.slice))
    chosen = list(plain)
    for s in samples:
        if s.slice is not None:
            ks = volumes[str(s.image)]
            if s.slice in (min(ks), max(ks)):
                chosen.append(s)
    for s in chosen:
        read_sample(s, dataset.mask_map, window)
    return len(chosen)


def prepare(
    raw: RawSlice,
    size: int = DEFAULT_SIZE,
    segmenter=None,
    margin: float = DEFAULT_MARGIN,
    already_cropped: bool = False,
    use_labels: bool = True,
    intensity: str = "none",
) -> Prepared:
    """The paper's preprocessing of one slice.

    Args:
        raw: the slice as read.
        size: model size (a multiple of 32).
        segmenter: a `LungSegmenter` used when `raw.lung` is None (default: the package's,
            see `lung_unet.default_segmenter`).
        margin: crop margin as a fraction of the lung field's larger side.
        already_cropped: the slice comes from `preprocess` output: its lung mask is the lung
            field and no further crop is made (only a resize if the size differs).
        use_labels: the lung field also takes the label's lesion and healthy-lung pixels and
            drops its exact-background ones (training). False for evaluation and prediction:
            the field, the crop and x come from the image alone (the supplied lung mask or the
            segmenter); `allowed` still carries the label, for scoring.
        intensity: "standardise" maps the slice by `intensity.standardise` with anchors from
            the image-only lung field (never the label) before cropping; "none" keeps it. A
            slice from `preprocess` output (`already_cropped`) was standardised, or not, when
            it was written.
    """
    lung = raw.lung
    if lung is None:
        if segmenter is None:
            from stitchnet_tf.data.lung_unet import default_segmenter

            segmenter = default_segmenter()
        lung = segmenter(raw.image)
    if use_labels:
        field = lung_field_of(raw.allowed, lung)
    else:
        field = np.asarray(lung).astype(bool)
    allowed = combine_with_lung(raw.allowed, field)
    if already_cropped:
        geometry = Geometry.identity(raw.image.shape, size)
    else:
        geometry = Geometry.from_field(field, size, margin)
    image = raw.image
    if check_intensity(intensity) == "standardise" and not already_cropped:
        image = standardise(image, lung)
    x = np.where(field, image, 0.0).astype(np.float32)
    lung_model = geometry.to_model(field, "nearest", fill=False)
    # zero again after resizing, so that x is exactly 0 outside the (model-size) lung field
    x_model = np.where(lung_model, np.clip(geometry.to_model(x, "linear"), 0.0, 1.0), 0.0)
    return Prepared(
        x=x_model.astype(np.float32),
        allowed=geometry.to_model(allowed, "nearest", fill=bits(BACKGROUND)),
        lung=lung_model,
        geometry=geometry,
        field=field,
    )


def check_prepared_intensity(dataset: Dataset, intensity: str) -> None:
    """Raise if `dataset` is a `preprocess` output written with another intensity mode than
    `intensity` (its slices are used as they are)."""
    if dataset.prepared_size is None:
        return
    written = dataset.info.get("intensity", "none")
    if written != intensity:
        raise DataError(
            dataset.root,
            f"preprocessed with intensity '{written}', but '{intensity}' is asked for: "
            f"run preprocess again with --intensity {intensity}",
        )


def output_name(sample: Sample) -> str:
    """A flat file stem for a sample id: `images/a/b.png#3` -> `a__b_0003`."""
    path, _, k = sample.id.partition("#")
    parts = [p for p in path.split("/") if p]
    if len(parts) > 1 and parts[0] == "images":
        parts = parts[1:]
    parts[-1] = io.stem_of(parts[-1])
    name = "__".join(parts)
    return f"{name}_{int(k):04d}" if k else name


def preprocess_dataset(
    dataset: Dataset,
    output: str | os.PathLike,
    *,
    size: int = DEFAULT_SIZE,
    window: io.Window = io.Window(),
    segmenter=None,
    margin: float = DEFAULT_MARGIN,
    intensity: str = "none",
    overwrite: bool = False,
    skip_bad: bool = False,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> dict:
    """Write a preprocessed copy of `dataset` to `output` and return its summary.

    The copy holds `images/` (8-bit PNG, model size, zero outside the lung field), `masks/`
    (allowed-set bits, for labelled slices), `lungs/` (0/255 lung field), `manifest.csv`
    (image, mask, lung, patient, source, slice, geometry) and `dataset.json`; it reads back with
    `discover` and trains without further cropping. Written atomically: a failure leaves
    nothing at `output`. `intensity`: see `prepare` (recorded in dataset.json; a model trained
    on the copy must use the same).
    """
    size = check_model_size(size)
    check_intensity(intensity)
    check_prepared_intensity(dataset, intensity)
    check_apart(output, {"--input": dataset.root})
    check_output_dir(output, overwrite, marker=DATASET_MARKER)
    if segmenter is None:
        from stitchnet_tf.data.lung_unet import default_segmenter

        segmenter = default_segmenter()
    names = [output_name(s) for s in dataset.samples]
    if len(set(names)) != len(names):
        raise DataError(dataset.root, "two samples map to the same output name")

    def work(i: int):
        sample = dataset.samples[i]
        try:
            raw = read_sample(sample, dataset.mask_map, window)
            cropped = dataset.prepared_size is not None
            return i, prepare(raw, size, segmenter, margin, cropped, intensity=intensity)
        except DataError as e:
            if not skip_bad:
                raise
            return i, e

    rows, skipped = [], dataset.skipped
    with atomic_dir(output, overwrite, marker=DATASET_MARKER) as tmp:
        for sub in ("images", "masks", "lungs"):
            (tmp / sub).mkdir()
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            for i, result in pool.map(work, range(len(dataset.samples))):
                sample, name = dataset.samples[i], names[i]
                if isinstance(result, DataError):
                    skipped += 1
                    if warn:
                        warn(f"skipped {result}")
                else:
                    io.write_png(tmp / "images" / f"{name}.png", to_uint8(result.x))
                    io.write_png(tmp / "lungs" / f"{name}.png", result.lung.astype(np.uint8) * 255)
                    mask = ""
                    if sample.labelled:
                        mask = f"masks/{name}.png"
                        io.write_png(tmp / mask, result.allowed)
                    rows.append(
                        {
                            "image": f"images/{name}.png",
                            "mask": mask,
                            "lung": f"lungs/{name}.png",
                            "patient": sample.patient or "",
                            "source": sample.image,
                            "slice": "" if sample.slice is None else sample.slice,
                            "geometry": json.dumps(result.geometry.to_dict()),
                        }
                    )
                if progress:
                    progress(1)
        if not rows:
            raise DataError(dataset.root, f"no slice could be preprocessed ({skipped} skipped)")
        with open(tmp / "manifest.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        summary = {
            "prepared_size": size,
            "mask_values": "bits",
            "source": str(dataset.root),
            "source_mask_values": dataset.mask_map.name,
            "window": {"level": window.level, "width": window.width},
            "margin": margin,
            "intensity": intensity,
            "lung_masks": "supplied" if all(s.lung for s in dataset.samples) else "segmenter",
            "segmenter": getattr(segmenter, "get_config", dict)(),
            "segmenter_name": type(segmenter).__name__,
            "count": len(rows),
            "labelled": sum(bool(r["mask"]) for r in rows),
            "skipped": skipped,
        }
        (tmp / DATASET_MARKER).write_text(json.dumps(summary, indent=1) + "\n")
    return summary
