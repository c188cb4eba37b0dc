"""Loading trained models and segmenting slices in their original geometry.

A `Predictor` runs the training preprocessing on each slice (lung field, crop, pad, resize) with
the lung field taken from the image alone (a supplied lung mask, else the lung segmenter; never
the label), segments it with any model that has `segment(x, lung)` (StitchNet, the baselines,
exports, `ThresholdRule`), maps the class probabilities back onto the original slice through the
kept `Geometry` (linear interpolation) and takes the argmax there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stitchnet_tf.data import io
from stitchnet_tf.data.classes import BACKGROUND, NUM_CLASSES
from stitchnet_tf.data.preprocess import (
    DEFAULT_MARGIN,
    Geometry,
    Prepared,
    RawSlice,
    check_model_size,
    prepare,
)
from stitchnet_tf.errors import DataError
from stitchnet_tf.run import Run
from stitchnet_tf.shipped import resolve


@dataclass
class LoadedModel:
    """A trained model, the size it was trained at (None if unknown) and where it came from."""

    model: object
    size: int | None
    path: Path
    run: Path | None = None

    def input_size(self, size: int | None = None) -> int:
        """The size to run the model at: `size` if given, else the one it was trained at."""
        size = size or self.size
        if size is None:
            raise DataError(self.path, "model size unknown (no config.json beside it): pass --size")
        return check_model_size(size)


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a run folder (its best.keras, else last.keras), a `.keras` file, an export
    (`exported.load_exported`: a SavedModel folder or a `.tflite` file) or a `ThresholdRule`
    JSON file (`models.threshold`); or a shipped model's name (`shipped.SHIPPED`)."""
    p = path = resolve(path)
    if p.suffix == ".json" and p.is_file():
        from stitchnet_tf.models.threshold import ThresholdRule

        rule = ThresholdRule.load(p)
        return LoadedModel(rule, rule.size, p)

    import keras

    import stitchnet_tf.models.baselines  # noqa: F401  (registers the model classes)
    import stitchnet_tf.models.optimizers  # noqa: F401  (the optimizer saved in run checkpoints)
    import stitchnet_tf.models.stitchnet  # noqa: F401
    from stitchnet_tf import exported

    if exported.is_exported(p):
        model = exported.load_exported(p)
        return LoadedModel(model, model.size, model.path)
    run = None
    if p.is_dir():
        run, p = p, Run(p).checkpoint()
        if p is None:
            raise DataError(path, "not a run folder: no best.keras or last.keras inside")
    elif not p.exists():
        raise DataError(path, "model not found")
    elif p.suffix != ".keras":
        raise DataError(
            path, "not a model: expected a run folder, a .keras file or a threshold-rule .json"
        )
    check_keras_archive(p)
    try:
        model = keras.models.load_model(p, safe_mode=True)
    except Exception as e:  # keras raises many types for bad files
        raise DataError(p, f"cannot load model ({type(e).__name__}: {str(e)[:200]})") from None
    if not hasattr(model, "segment"):
        raise DataError(p, "not a stitchnet-tf segmentation model")
    return LoadedModel(model, Run(run or p.parent).size(), p, run)


def model_class(path: str | os.PathLike) -> str | None:
    """The class name of the model at `path` (as `load_model` finds it), read without loading
    any weights: `ThresholdRule`, a Keras class name such as `StitchNet`, `exported` for a
    SavedModel or `.tflite`; None when it cannot be told (then `load_model` reports why)."""
    p = resolve(path)
    if p.suffix == ".json" and p.is_file():
        return "ThresholdRule"
    from stitchnet_tf.exported import is_exported

    if is_exported(p):
        return "exported"
    if p.is_dir():
        p = Run(p).checkpoint() or p
    if p.suffix != ".keras" or not p.is_file():
        return None
    import zipfile

    try:
        with zipfile.ZipFile(p) as archive:
            config = json.loads(archive.read("config.json"))
        return str(config["class_name"])
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, TypeError, EOFError):
        return None


def check_stitchnet_options(
    model_path: str | os.PathLike, samples: int = 0, decision: str | None = None
) -> None:
    """Refuse `samples` / `decision` for a model that has neither, before it is loaded."""
    if not samples and decision is None:
        return
    kind = model_class(model_path)
    if kind not in (None, "StitchNet", "exported"):
        raise DataError(None, f"--samples and --decision apply to StitchNet only, not to {kind}")


def check_keras_archive(path: Path) -> None:
    """A `.keras` file is a zip archive holding `config.json`: say so when it is truncated or
    something else renamed (Keras itself reports "File not found" for both)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise DataError(
            path, "not a Keras model archive (truncated, or another file renamed .keras)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(path, f"damaged Keras model archive ({e})") from None
    if damaged is not None:
        raise DataError(path, f"damaged Keras model archive: {damaged} fails its checksum")
    if "config.json" not in names:
        raise DataError(path, "not a Keras model archive (no config.json inside)")


#: Class probabilities where nothing was predicted (outside the crop box): background.
BACKGROUND_PROBABILITIES = np.eye(NUM_CLASSES, dtype=np.float32)[BACKGROUND]


def probabilities_to_original(probabilities: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Model-size class probabilities [S, S, 4] -> [H, W, 4] in the original slice, by linear
    interpolation; outside the crop box the background probability is 1."""
    probs = np.asarray(probabilities, np.float32)
    return geometry.to_original(probs, "linear", fill=BACKGROUND_PROBABILITIES)


def labels_to_original(
    probabilities: np.ndarray, geometry: Geometry, field: np.ndarray | None = None
) -> np.ndarray:
    """Labels [H, W] uint8 in the original slice from model-size probabilities [S, S, 4].

    The probabilities are mapped back first (`probabilities_to_original`), the argmax is taken
    there. With the lung field [H, W] bool of the original slice, pixels outside it are
    background and pixels inside it take their most probable lung class (healthy, GGO, CON).
    """
    probs = probabilities_to_original(probabilities, geometry)
    if field is None:
        return np.argmax(probs, -1).astype(np.uint8)
    lung_class = 1 + np.argmax(probs[..., 1:], -1)
    return np.where(field, lung_class, BACKGROUND).astype(np.uint8)


def prepare_inputs(
    raws: list[RawSlice],
    size: int,
    segmenter,
    margin: float = DEFAULT_MARGIN,
    already_cropped: bool = False,
    intensity: str = "none",
) -> list[Prepared]:
    """Preprocess slices for prediction: the lung field comes from the image alone (`raw.lung`,
    else `segmenter`); labels in `raws` never shape the field, the crop or x. `intensity`: the
    model's (`model_intensity`)."""
    return [
        prepare(r, size, segmenter, margin, already_cropped, use_labels=False, intensity=intensity)
        for r in raws
    ]


def model_intensity(model) -> str:
    """The intensity preprocessing `model` was trained with (`none` for models that predate
    the option)."""
    return getattr(model, "intensity", "none") or "none"


FLIPS = ((), (1,), (2,), (1, 2))  # image axes of a [B, S, S, C] batch


def flip_average(segment: Callable, x: np.ndarray, lung: np.ndarray) -> dict:
    """Test-time augmentation: `segment(x, lung)["probabilities"]` [B, S, S, 4] averaged over
    the four flips of the batch (each flipped back); returns probabilities, labels, entropy."""
    total = 0.0
    for axes in FLIPS:
        out = segment(np.flip(x, axes).copy(), np.flip(lung, axes).copy())
        total = total + np.flip(np.asarray(out["probabilities"], np.float32), axes)
    from stitchnet_tf.models.base import segmentation_output

    out = segmentation_output(total / len(FLIPS))
    return {k: np.asarray(v) for k, v in out.items()}


@dataclass
class Prediction:
    """One slice's result: labels [H, W] uint8 (0..3) in the original geometry, the model-size
    probabilities [S, S, 4] and entropy [S, S], the prepared input x [S, S], its lung field
    lung [S, S], its geometry, and the lung field [H, W] bool in the original geometry."""

    labels: np.ndarray
    probabilities: np.ndarray
    entropy: np.ndarray
    x: np.ndarray
    lung: np.ndarray
    geometry: Geometry
    field: np.ndarray | None = None

    def entropy_original(self) -> np.ndarray:
        """Predictive entropy [H, W] mapped back to the original slice (0 outside the crop)."""
        return self.geometry.to_original(self.entropy.astype(np.float32), "linear", fill=0.0)

    def probabilities_original(self) -> np.ndarray:
        """Class probabilities [H, W, 4] mapped back to the original slice (the labels are
        their argmax within the lung field)."""
        return probabilities_to_original(self.probabilities, self.geometry)


class Predictor:
    """Segments slices with a trained model.

    Args:
        model: a model with `segment(x, lung, samples, decision)` (StitchNet, UNet, SegNet,
            an export, a `ThresholdRule`).
        size: model size S (a multiple of 32).
        segmenter: lung segmenter for slices without a lung mask (default: the package's).
        samples: posterior samples to average (StitchNet; 0 = posterior mean).
        decision: StitchNet decision rule (None = the model's own).
        margin: crop margin around the lung field.
        tta: average the probabilities over the four flips of each slice (test-time
            augmentation; the models trained with flips).

    Slices are preprocessed with the model's own intensity mode (`model_intensity`).
    """

    def __init__(
        self,
        model,
        size: int,
        segmenter=None,
        samples: int = 0,
        decision: str | None = None,
        margin: float = DEFAULT_MARGIN,
        tta: bool = False,
    ):
        self.model, self.size, self.tta = model, check_model_size(size), tta
        fixed = getattr(model, "exported_size", None)
        if fixed is not None and fixed != self.size:
            raise DataError(None, f"the exported model takes {fixed} px slices, not {size}")
        if segmenter is None:
            from stitchnet_tf.data.lung_unet import default_segmenter

            segmenter = default_segmenter()
        self.segmenter, self.samples, self.decision, self.margin = (
            segmenter,
            samples,
            decision,
            margin,
        )
        self.intensity = model_intensity(model)

    def _segment(self, x: np.ndarray, lung: np.ndarray) -> dict:
        kwargs = {}
        if self.samples:
            kwargs["samples"] = self.samples
        if self.decision:
            kwargs["decision"] = self.decision
        if not self.tta:
            out = self.model.segment(x, lung=lung, **kwargs)
            return {k: np.asarray(v) for k, v in out.items()}
        return flip_average(lambda a, b: self.model.segment(a, lung=b, **kwargs), x, lung)

    def prepare(self, raws: list[RawSlice], already_cropped: bool = False) -> list[Prepared]:
        """Label-free preprocessing of slices as read (see `prepare_inputs`)."""
        return prepare_inputs(
            raws, self.size, self.segmenter, self.margin, already_cropped, self.intensity
        )

    def predict_prepared(self, prepared: list[Prepared]) -> list[Prediction]:
        """Segment prepared slices (`prepare`) as one batch; labels in the original geometry."""
        x = np.stack([p.x for p in prepared])[..., None].astype(np.float32)
        lung = np.stack([p.lung for p in prepared])[..., None].astype(np.float32)
        out = self._segment(x, lung)
        results = []
        for i, p in enumerate(prepared):
            probabilities = out["probabilities"][i].astype(np.float32)
            results.append(
                Prediction(
                    labels=labels_to_original(probabilities, p.geometry, p.field),
                    probabilities=probabilities,
                    entropy=out["entropy"][i],
                    x=p.x,
                    lung=p.lung,
                    geometry=p.geometry,
                    field=p.field,
                )
            )
        return results

    def predict(self, raws: list[RawSlice], already_cropped: bool = False) -> list[Prediction]:
        """Segment a batch of slices as read (`preprocess.read_sample` or `io.read_image`);
        their labels, if any, are not used."""
        return self.predict_prepared(self.prepare(raws, already_cropped))

    def predict_images(
        self, images: list[np.ndarray], lungs: list[np.ndarray] | None = None
    ) -> list[Prediction]:
        """Segment unlabelled slices [H, W] in [0, 1]; the lung field from `lungs` ([H, W] bool
        each, e.g. the user's masks) where given, else from the segmenter."""
        from stitchnet_tf.data.classes import ALL

        for image in images:
            io.check_size(image.shape, "image")
        lungs = lungs if lungs is not None else [None] * len(images)
        return self.predict(
            [
                RawSlice(im, np.full(im.shape, ALL, np.uint8), lung)
                for im, lung in zip(images, lungs, strict=True)
            ]
        )
