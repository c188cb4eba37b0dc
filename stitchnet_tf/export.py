"""Export the segmentation path for deployment: SavedModel (TensorFlow Serving) and TFLite.

The exported graph is the segmentation path only (bottom-up path, posterior-mean ladder, heads;
no KL, no sampling, no optimizer) and returns class probabilities and the label map.

SavedModel, in TensorFlow Serving's layout `<root>/<name>/<version>/`, with signatures
- `serving_default`: `image` float32 [B, S, S, 1] in [0, 1], a slice preprocessed as
  `stitchnet-tf preprocess` writes it (cropped to the lung field, 0 outside it; the lung field is
  taken as image > 0) -> `probabilities` [B, S, S, 4], `labels` int32 [B, S, S], `entropy`.
- `serving_lung`: `image` and `lung` [B, S, S, 1] (the lung field given explicitly).
- `serving_bytes` (when the learned lung segmenter is available): `image_bytes` string [B],
  encoded PNG/JPEG slices of one size H×W -> the same outputs at model size plus
  `labels_original` int32 [B, H, W] in the slice's own geometry and `box` int32 [B, 4]
  (y0, y1, x0, x1 of the crop). Preprocessing runs inside the graph: the lung U-Net, threshold,
  crop with margin, pad, resize. As in `Predictor`, the probabilities are mapped back to the
  slice (bilinear) before the argmax, and pixels of the lung field take their most probable lung
  class. Unlike `Predictor`, the lung mask is not cleaned of small components (there is no
  connected-components op in the graph).
`assets.extra/stitchnet.json` records the model size, class names, decision rule, intensity
preprocessing (`none` or `standardise`: x given to `serving_default` / `serving_lung` must be
preprocessed the same way, as `stitchnet-tf preprocess --intensity` writes it) and source.

TFLite: the `serving_lung` signature (`image` and `lung` [1, S, S, 1]; pass `lung` = image > 0
for a preprocessed slice), converted with `TFLiteConverter` with `quantize` none | float16 |
dynamic | int8 (int8: a representative dataset of training slices; float fallback for ops
without an int8 kernel; float32 inputs and outputs). Beside it, `<name>.tflite.json` holds the
same description as the SavedModel's.

Writing is atomic: a temporary folder or file next to the target, renamed at the end, so an
interrupted export never leaves a half model where a server would load it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stitchnet_tf.data.classes import CLASS_NAMES
from stitchnet_tf.errors import DataError
from stitchnet_tf.exported import (  # noqa: F401  (readers, re-exported for callers)
    METADATA,
    ExportedSavedModel,
    ExportedTFLite,
    is_exported,
    is_tflite,
    load_exported,
    tflite_metadata,
)
from stitchnet_tf.fileio import (
    check_apart,
    check_parents,
    model_input,
    old_name,
    sweep_leftovers,
    temp_prefix,
)
from stitchnet_tf.inference import model_intensity
from stitchnet_tf.options import EXPORT_FORMATS as FORMATS
from stitchnet_tf.options import QUANTIZE
from stitchnet_tf.progress import Progress, expect, step
from stitchnet_tf.run import Run

if TYPE_CHECKING:
    from stitchnet_tf.data.datasets import DatasetSpec

#: Where a SavedModel export keeps its description (TF Serving ignores assets.extra/).


class _InGraphPreprocess:
    """The training preprocessing of one decoded slice [H, W, 1] in [0, 1], in TF ops.

    Lung field by the learned lung U-Net (min-max scale, resize to its working size, sigmoid,
    bilinear back, threshold); with `intensity="standardise"` the slice is then standardised
    with that field's anchors (`data.intensity.standardise`); crop box around the field plus
    `margin` of its larger side, pad to a square, resize to the model size S; x is zeroed
    outside the resized lung field.
    """

    def __init__(
        self,
        lung_net,
        size: int,
        margin: float,
        threshold: float = 0.5,
        intensity: str = "none",
    ):
        self.lung_net, self.size, self.margin, self.threshold = lung_net, size, margin, threshold
        self.lung_size = int(lung_net.input_shape[1])
        self.intensity = intensity

    @staticmethod
    def standardise(image, field):
        """`data.intensity.standardise` in TF ops: image [H, W, 1], field [H, W] bool."""
        import tensorflow as tf

        from stitchnet_tf.data import intensity as it

        plane = image[..., 0]
        n = tf.reduce_sum(tf.cast(field, tf.int32))
        r = tf.maximum(
            2, tf.cast(tf.round(it.RING_FRACTION * tf.sqrt(tf.cast(n, tf.float32))), tf.int32)
        )
        grown = tf.cast(field, tf.float32)[None, ..., None]
        grown = tf.while_loop(
            lambda i, g: i < r,
            lambda i, g: (i + 1, tf.nn.max_pool2d(g, 3, 1, "SAME")),
            (tf.constant(0), grown),
        )[1]
        ring = (grown[0, ..., 0] > 0.5) & ~field

        def lower(values, q):  # numpy's percentile(method="lower")
            ordered = tf.sort(values)
            k = tf.cast(tf.floor(q / 100.0 * tf.cast(tf.size(values) - 1, tf.float32)), tf.int32)
            return ordered[tf.maximum(k, 0)]

        lung_values, ring_values = tf.boolean_mask(plane, field), tf.boolean_mask(plane, ring)
        usable = (n >= 16) & (tf.size(ring_values) >= 16)
        lung = tf.cond(usable, lambda: lower(lung_values, it.LUNG_PERCENTILE), lambda: 0.0)
        tissue = tf.cond(usable, lambda: lower(ring_values, 50.0), lambda: 1.0)
        usable = usable & (tissue - lung >= it.MIN_CONTRAST)
        scale = (it.TISSUE_ANCHOR - it.LUNG_ANCHOR) / tf.maximum(tissue - lung, 1e-6)
        mapped = tf.clip_by_value(it.LUNG_ANCHOR + (image - lung) * scale, 0.0, 1.0)
        return tf.where(usable, mapped, image)

    def lung_field(self, image):
        """image [H, W, 1] -> bool [H, W]."""
        import tensorflow as tf

        lo, hi = tf.reduce_min(image), tf.reduce_max(image)
        scaled = (image - lo) / tf.maximum(hi - lo, 1e-6)
        shape = tf.shape(image)[:2]
        small = tf.image.resize(scaled, (self.lung_size, self.lung_size), method="area")
        prob = self.lung_net(small[None], training=False)[0]
        big = tf.image.resize(tf.cast(prob, tf.float32), shape, method="bilinear")
        return (big[..., 0] > self.threshold) & (hi - lo > 1e-6)

    def box(self, field):
        """Half-open crop box (y0, y1, x0, x1) around `field` [H, W] plus the margin."""
        import tensorflow as tf

        H, W = tf.shape(field)[0], tf.shape(field)[1]
        rows = tf.where(tf.reduce_any(field, 1))[:, 0]
        cols = tf.where(tf.reduce_any(field, 0))[:, 0]

        def around():
            y0, y1 = tf.cast(rows[0], tf.int32), tf.cast(rows[-1], tf.int32) + 1
            x0, x1 = tf.cast(cols[0], tf.int32), tf.cast(cols[-1], tf.int32) + 1
            big = tf.cast(tf.maximum(y1 - y0, x1 - x0), tf.float32)
            m = tf.maximum(2, tf.cast(tf.round(self.margin * big), tf.int32))
            return tf.stack(
                [
                    tf.maximum(0, y0 - m),
                    tf.minimum(H, y1 + m),
                    tf.maximum(0, x0 - m),
                    tf.minimum(W, x1 + m),
                ]
            )

        return tf.cond(tf.size(rows) > 0, around, lambda: tf.stack([0, H, 0, W]))

    def __call__(self, image):
        """image [H, W, 1] -> x [S, S, 1], lung [S, S, 1] (float32), box [4] int32 and the
        lung field [H, W] bool."""
        import tensorflow as tf

        field = self.lung_field(image)
        if self.intensity == "standardise":
            image = self.standardise(image, field)
        box = self.box(field)
        y0, y1, x0, x1 = box[0], box[1], box[2], box[3]
        h, w = y1 - y0, x1 - x0
        side = tf.maximum(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        stacked = tf.concat(
            [image * tf.cast(field[..., None], tf.float32), tf.cast(field[..., None], tf.float32)],
            -1,
        )
        square = tf.image.pad_to_bounding_box(stacked[y0:y1, x0:x1], top, left, side, side)
        shrink = side > self.size
        x = tf.cond(
            shrink,
            lambda: tf.image.resize(square[..., :1], (self.size, self.size), method="area"),
            lambda: tf.image.resize(square[..., :1], (self.size, self.size), method="bilinear"),
        )
        lung = tf.image.resize(square[..., 1:], (self.size, self.size), method="nearest")
        x = tf.where(lung > 0.5, tf.clip_by_value(x, 0.0, 1.0), 0.0)
        return x, lung, box, field

    @staticmethod
    def to_original(probabilities, box, field):
        """Model-size probabilities [S, S, C] -> labels [H, W] int32 in the slice, as
        `inference.labels_to_original`: probabilities resized to the crop (area down, bilinear
        up), then the most probable lung class inside the lung field `field` [H, W], background
        outside it."""
        import tensorflow as tf

        y0, y1, x0, x1 = box[0], box[1], box[2], box[3]
        h, w = y1 - y0, x1 - x0
        side = tf.maximum(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        size = tf.shape(probabilities)[0]
        square = tf.cond(
            side < size,
            lambda: tf.image.resize(probabilities, (side, side), method="area"),
            lambda: tf.image.resize(probabilities, (side, side), method="bilinear"),
        )
        crop = square[top : top + h, left : left + w, 1:]
        lung_class = 1 + tf.argmax(crop, axis=-1, output_type=tf.int32)
        shape = tf.shape(field)
        labels = tf.pad(lung_class, [[y0, shape[0] - y1], [x0, shape[1] - x1]])
        return tf.where(field, labels, 0)


def float32_model(model):
    """`model` itself if it computes in float32, else a float32 copy with the same weights (a
    model trained under mixed precision exports and converts to TFLite in float32)."""
    import keras

    if model.dtype_policy.compute_dtype == "float32":
        return model
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        copy = type(model).from_config(model.get_config())
    finally:
        keras.mixed_precision.set_global_policy(previous)
    copy.set_weights(model.get_weights())
    return copy


def _serving_functions(
    model, size: int, decision: str | None, lung_net, margin: float, tta: bool = False
) -> dict:
    """The tf.functions of the exported signatures (see the module docstring); `tta`:
    probabilities averaged over the four flips of the slice."""
    import tensorflow as tf

    image_spec = tf.TensorSpec([None, size, size, 1], tf.float32, name="image")
    lung_spec = tf.TensorSpec([None, size, size, 1], tf.float32, name="lung")

    from stitchnet_tf.models.base import calibrate_lesion, segmentation_output

    offset = float(getattr(model, "lesion_offset", 0.0))  # the val-chosen lesion offset

    def segment(image, lung):
        if not tta:
            probs = model.segmentation_probabilities(image, lung, decision)
            return segmentation_output(calibrate_lesion(probs, offset))
        from stitchnet_tf.inference import FLIPS  # the Predictor's flips, in the graph

        total = 0.0
        for axes in FLIPS:
            flip = (lambda t, a=list(axes): tf.reverse(t, a)) if axes else (lambda t: t)
            probs = model.segmentation_probabilities(flip(image), flip(lung), decision)
            total = total + flip(tf.cast(calibrate_lesion(probs, offset), tf.float32))
        return segmentation_output(total / len(FLIPS))

    @tf.function(input_signature=[image_spec, lung_spec])
    def serving_lung(image, lung):
        return segment(image, lung)

    @tf.function(input_signature=[image_spec])
    def serving_default(image):  # calls serving_lung's graph: the model is traced once
        return serving_lung(image, tf.cast(image > 0, tf.float32))

    functions = {"serving_lung": serving_lung, "serving_default": serving_default}
    if lung_net is None:
        return functions
    pre = _InGraphPreprocess(lung_net, size, margin, intensity=model_intensity(model))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serving_bytes(image_bytes):
        images = tf.map_fn(
            lambda b: tf.io.decode_image(b, channels=1, dtype=tf.float32, expand_animations=False),
            image_bytes,
            fn_output_signature=tf.TensorSpec([None, None, 1], tf.float32),
        )
        x, lung, box, field = tf.map_fn(
            pre,
            images,
            fn_output_signature=(
                tf.TensorSpec([size, size, 1], tf.float32),
                tf.TensorSpec([size, size, 1], tf.float32),
                tf.TensorSpec([4], tf.int32),
                tf.TensorSpec([None, None], tf.bool),
            ),
        )
        out = segment(x, lung)
        out["labels_original"] = tf.map_fn(
            lambda a: pre.to_original(a[0], a[1], a[2]),
            (out["probabilities"], box, field),
            fn_output_signature=tf.TensorSpec([None, None], tf.int32),
        )
        out["box"] = box
        return out

    functions["serving_bytes"] = serving_bytes
    return functions


def _metadata(
    model, size: int, decision: str | None, source: str, signatures, tta: bool = False
) -> dict:
    return {
        "format": "stitchnet-tf segmentation path",
        "model": type(model).__name__,
        "size": int(size),
        "classes": list(CLASS_NAMES),
        "decision": decision or getattr(model, "decision", None),
        "source": source,
        "tta": tta,
        "intensity": model_intensity(model),
        "signatures": sorted(signatures),
    }


def next_version(root: str | os.PathLike) -> int:
    """1 + the largest numeric version folder under `root` (1 when there is none)."""
    root = Path(root)
    versions = [int(p.name) for p in root.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def _write_savedmodel(
    model, target: Path, size, decision, lung_net, margin, source, tta: bool = False
) -> list:
    """Write the SavedModel to `target` (not atomic; see `export_savedmodel`)."""
    import keras

    model = float32_model(model)
    functions = _serving_functions(model, size, decision, lung_net, margin, tta)
    archive = keras.export.ExportArchive()
    archive.track(model)
    if lung_net is not None:
        archive.track(lung_net)
    for name, fn in functions.items():
        archive.add_endpoint(name, fn)
    archive.write_out(str(target), verbose=False)
    meta = target / METADATA
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(
        json.dumps(_metadata(model, size, decision, source, functions, tta), indent=1) + "\n"
    )
    return sorted(functions)


def export_savedmodel(
    model,
    root: str | os.PathLike,
    size: int,
    *,
    version: int | None = None,
    decision: str | None = None,
    lung_model: str | os.PathLike | None | bool = None,
    margin: float | None = None,
    source: str = "",
    overwrite: bool = False,
    tta: bool = False,
    _fail_after_write: bool = False,
) -> Path:
    """Export `model` as `<root>/<version>/` (TensorFlow Serving's layout; `root` is the model's
    base path, e.g. `saved_models/medseg`). Returns the version folder.

    `version` defaults to the next free number. `lung_model`: the lung U-Net `.keras` used by
    the `serving_bytes` signature (None: the shipped one if present; False: no bytes signature).
    The folder is written under a temporary name and renamed when complete.
    """
    from stitchnet_tf.data.preprocess import DEFAULT_MARGIN, check_model_size

    check_model_size(size)
    root = Path(root)
    check_parents(root)
    if root.exists() and not root.is_dir():
        raise DataError(root, "export folder is a file")
    root.mkdir(parents=True, exist_ok=True)
    version = next_version(root) if version is None else int(version)
    final = root / str(version)
    if final.exists() and not overwrite:
        raise DataError(final, "version already exists (use another --version, or --overwrite)")
    if final.exists() and not (final / "saved_model.pb").is_file():
        raise DataError(final, "--overwrite replaces only a SavedModel, and this is not one")
    lung_net = _lung_net(lung_model)
    margin = DEFAULT_MARGIN if margin is None else margin
    sweep_leftovers(root)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(str(version)), dir=root))
    try:
        _write_savedmodel(model, tmp, size, decision, lung_net, margin, source, tta)
        if _fail_after_write:  # tests: a failure after writing, before the rename
            raise RuntimeError("simulated failure during export")
        if final.exists():
            old = root / old_name(str(version))
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _lung_net(lung_model):
    """The lung U-Net for `serving_bytes`, or None (False, or nothing shipped)."""
    if lung_model is False:
        return None
    import keras

    from stitchnet_tf.data.lung_unet import DEFAULT_MODEL

    path = Path(lung_model) if lung_model else DEFAULT_MODEL
    if not path.is_file():
        if lung_model:
            raise DataError(path, "lung model not found")
        return None
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as e:
        raise DataError(path, f"cannot load lung model ({type(e).__name__})") from None


def check_tflite_output(path: Path, overwrite: bool) -> None:
    """`path` can take a new `.tflite` file: it is absent, or with `overwrite` an earlier one."""
    check_parents(path)
    if path.is_dir():
        raise DataError(path, "output is a folder (give a .tflite file)")
    if path.exists() and not overwrite:
        raise DataError(path, "file exists (use --overwrite)")
    if path.exists() and not is_tflite(path):
        raise DataError(path, "--overwrite replaces only a .tflite file, and this is not one")


def export_tflite(
    model,
    path: str | os.PathLike,
    size: int,
    *,
    quantize: str = "none",
    representative: Callable[[], Iterable[np.ndarray]] | None = None,
    decision: str | None = None,
    overwrite: bool = False,
    saved_model: str | os.PathLike | None = None,
    tta: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert the segmentation path to a `.tflite` file with `quantize` (see module doc).

    `representative` yields preprocessed slices [S, S] or [S, S, 1] (int8 only: a hundred or so
    training slices). `saved_model`: convert this earlier `export_savedmodel` output instead of
    tracing `model` again (`model` may then be None). The file is written under a temporary
    name and renamed when complete. `log` hears each stage (tracing, converting).
    """
    log = log or (lambda line: None)

    from stitchnet_tf.data.preprocess import check_model_size

    check_model_size(size)
    if quantize not in QUANTIZE:
        raise DataError(None, f"unknown quantization {quantize!r}: use one of {QUANTIZE}")
    if quantize == "int8" and representative is None:
        raise DataError(None, "int8 quantization needs a representative dataset (--data)")
    path = Path(path)
    check_tflite_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(path.parent)
    with tempfile.TemporaryDirectory(prefix=temp_prefix(path.name), dir=path.parent) as work:
        if saved_model is None:
            saved = Path(work) / "savedmodel"
            log("tracing the model into a SavedModel")
            _write_savedmodel(model, saved, size, decision, None, 0.05, "", tta)
        else:
            saved = Path(saved_model)
        if quantize == "int8":
            slices = np.stack(
                [np.asarray(x, np.float32).reshape(size, size, 1) for x in representative()]
            )
            log(f"converting to TFLite int8, calibrating on {len(slices)} slices")
            flat = _convert_isolated(saved, quantize, slices, Path(work), path)
        else:
            log(f"converting to TFLite ({quantize})")
            try:
                flat = _quiet_convert(str(saved), quantize)
            except Exception as e:
                raise DataError(
                    path, f"TFLite conversion failed ({type(e).__name__}: {str(e)[:200]})"
                ) from None
        tmp = Path(work) / path.name
        tmp.write_bytes(flat)
        if saved_model is None:
            meta = _metadata(model, size, decision, "", ["serving_lung"], tta)
        else:
            written = Path(saved_model) / METADATA
            meta = json.loads(written.read_text()) if written.is_file() else {"size": int(size)}
        meta |= {"format": "stitchnet-tf TFLite (serving_lung)", "quantize": quantize}
        from stitchnet_tf.fileio import atomic_write_text

        atomic_write_text(tflite_metadata(path), json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, path)
    return path


def _convert(saved: str, quantize: str, representative: np.ndarray | None = None) -> bytes:
    """TFLiteConverter on the `serving_lung` signature of a SavedModel; `representative`
    [N, S, S, 1] calibrates int8."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=["serving_lung"])
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":

        def dataset():
            for x in representative:
                x = x[None].astype(np.float32)
                yield {"image": x, "lung": (x > 0).astype(np.float32)}

        converter.representative_dataset = dataset
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS,
        ]
    return converter.convert()


def _quiet_convert(saved: str, quantize: str, representative: np.ndarray | None = None) -> bytes:
    """`_convert` without the converter's native diagnostics (MLIR `error:` lines that the
    exception repeats; the caller reports it in one line) unless TensorFlow logs everything
    (TF_CPP_MIN_LOG_LEVEL unset or 0, as `stitchnet-tf --verbose` leaves it)."""
    from stitchnet_tf import native

    with native.captured_stderr(keep=lambda line: native.logs_everything()):
        return _convert(saved, quantize, representative)


def _convert_child(saved: str, quantize: str, representative, out: str) -> None:
    try:
        Path(out).write_bytes(_quiet_convert(saved, quantize, representative))
    except Exception as e:
        Path(out + ".error").write_text(f"{type(e).__name__}: {str(e)[:200]}")
        raise SystemExit(1) from None


def _convert_isolated(saved, quantize: str, representative, work: Path, path: Path) -> bytes:
    """`_convert` in a child process: the int8 calibrator can abort the whole process (e.g.
    "scale out of expressed type range"), which must become a one-line error here."""
    import multiprocessing

    out = str(work / "converted.tflite")
    child = multiprocessing.get_context("spawn").Process(
        target=_convert_child, args=(str(saved), quantize, representative, out)
    )
    child.start()
    child.join()
    if child.exitcode == 0 and Path(out).is_file():
        return Path(out).read_bytes()
    error = Path(out + ".error")
    reason = error.read_text() if error.is_file() else f"the converter exited ({child.exitcode})"
    raise DataError(
        path, f"TFLite {quantize} conversion failed ({reason}); try --quantize dynamic or float16"
    )


# --------------------------------------------------------------------------- the command


def representative_samples(data, count: int = 100, seed: int = 0):
    """Up to `count` samples of a dataset folder (a path or a `DatasetSpec`) drawn at random
    (seeded), every one read once to check it: the representative dataset of int8
    quantization, checked before the model is loaded. Returns (dataset, samples)."""
    from stitchnet_tf.data.datasets import DatasetSpec
    from stitchnet_tf.data.preprocess import check_samples

    dataset = DatasetSpec.of(data).discover()
    order = np.random.default_rng(seed).permutation(len(dataset.samples))[:count]
    samples = [dataset.samples[i] for i in order]
    check_samples(dataset, samples)
    return dataset, samples


def representative_slices(
    dataset, samples, size: int, intensity: str = "none", progress: Progress | None = None
):
    """A function yielding the preprocessed slices [S, S] of `samples` (from
    `representative_samples`) with the model's `intensity`; `progress`: one unit a slice
    prepared (`stitchnet_tf.progress`)."""
    from stitchnet_tf.data.pipeline import SliceLoader

    loader = SliceLoader(dataset, samples, size, intensity=intensity)
    expect(progress, len(loader))
    slices = []
    for i in range(len(loader)):
        slices.append(loader(i)[0])
        step(progress)
    return lambda: iter(slices)


def export(
    model_path: str | os.PathLike,
    fmt: str = "savedmodel",
    *,
    quantize: str = "none",
    output: str | os.PathLike | None = None,
    version: int | None = None,
    size: int | None = None,
    data: str | os.PathLike | DatasetSpec | None = None,
    count: int = 100,
    decision: str | None = None,
    bytes_signature: bool = True,
    overwrite: bool = False,
    tta: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Export a run folder or `.keras` file (the `export` command); returns what was written.

    Defaults: SavedModel to `saved_models/<run name>/<next version>/`; TFLite to
    `saved_models/<run name>-<quantize>.tflite`. int8's representative slices come from `data`,
    else from the run's own training data (its config.json). `log` hears each stage,
    `progress` (`stitchnet_tf.progress`) the preparation of int8's representative slices.
    """
    log = log or (lambda line: None)
    from stitchnet_tf.inference import load_model

    if fmt not in FORMATS:
        raise DataError(None, f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "savedmodel" and quantize != "none":
        raise DataError(None, "--quantize applies to --format tflite only")
    sources, nest_ok = model_input(model_path)
    if data is not None:
        from stitchnet_tf.data.datasets import DatasetSpec

        data = DatasetSpec.of(data)
    sources |= {"--data": None if data is None else data.path}
    if output is not None:
        check_apart(output, sources, nest_ok)
        if fmt == "tflite":
            check_tflite_output(Path(output), overwrite)
        else:
            check_parents(Path(output))
            if Path(output).is_file():
                raise DataError(output, "export folder is a file")
    chosen = None
    if fmt == "tflite" and quantize == "int8":  # the slices are checked before the model loads
        if data is None and Path(model_path).is_dir():  # the run's own training slices
            config = Run(model_path).config()
            if config is not None:
                data = config.unlabelled_spec() or config.labelled_spec()
        log(f"reading up to {count} representative slices for int8 calibration")
        chosen = representative_samples(data, count)
    loaded = load_model(model_path)
    if decision is not None and not hasattr(loaded.model, "decision"):
        raise DataError(
            model_path,
            f"--decision applies to StitchNet only, not to {type(loaded.model).__name__}",
        )
    size = loaded.input_size(size)
    name = loaded.run.name if loaded.run else loaded.path.stem
    source = str(loaded.path)
    if fmt == "savedmodel":
        root = Path(output) if output else Path("saved_models") / name
        check_apart(root, sources, nest_ok)
        log("tracing the model into a SavedModel (serving signatures)")
        path = export_savedmodel(
            loaded.model,
            root,
            size,
            version=version,
            decision=decision,
            lung_model=None if bytes_signature else False,
            source=source,
            overwrite=overwrite,
            tta=tta,
        )
        nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return {"path": str(path), "bytes": nbytes, "size": size}
    representative = None
    if chosen is not None:
        intensity = model_intensity(loaded.model)
        representative = representative_slices(
            *chosen, size, intensity=intensity, progress=progress
        )
    path = Path(output) if output else Path("saved_models") / f"{name}-{quantize}.tflite"
    check_apart(path, sources, nest_ok)
    export_tflite(
        loaded.model,
        path,
        size,
        quantize=quantize,
        representative=representative,
        decision=decision,
        overwrite=overwrite,
        tta=tta,
        log=log,
    )
    return {"path": str(path), "bytes": path.stat().st_size, "size": size}
