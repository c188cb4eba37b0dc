"""Loading trained models and segmenting slices in their original geometry.

A `Predictor` runs the training preprocessing on each slice (lung field, crop, pad, resize),
segments it with any model that has `segment(x, lung)` (StitchNet and the baselines), and maps
the labels back onto the original slice through the kept `Geometry`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stitchnet_tf.data import io
from stitchnet_tf.data.classes import BACKGROUND
from stitchnet_tf.data.preprocess import (
    DEFAULT_MARGIN,
    Geometry,
    RawSlice,
    check_model_size,
    prepare,
)
from stitchnet_tf.errors import DataError


@dataclass
class LoadedModel:
    """A trained model, the size it was trained at (None if unknown) and where it came from."""

    model: object
    size: int | None
    path: Path
    run: Path | None = None


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a run folder (its best.keras, else last.keras), a `.keras` file, or an export
    (`export.load_exported`: a SavedModel folder or a `.tflite` file)."""
    import keras

    import stitchnet_tf.models.baselines  # noqa: F401  (registers the model classes)
    import stitchnet_tf.models.stitchnet  # noqa: F401
    from stitchnet_tf import export

    p = Path(path)
    if export.is_exported(p):
        exported = export.load_exported(p)
        return LoadedModel(exported, exported.size, exported.path)
    run = None
    if p.is_dir():
        run = p
        for name in ("best.keras", "last.keras"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise DataError(path, "not a run folder: no best.keras or last.keras inside")
    elif not p.exists():
        raise DataError(path, "model not found")
    elif p.suffix != ".keras":
        raise DataError(path, "not a model: expected a run folder or a .keras file")
    try:
        model = keras.models.load_model(p, safe_mode=True)
    except Exception as e:  # keras raises many types for bad files
        raise DataError(p, f"cannot load model ({type(e).__name__}: {str(e)[:200]})") from None
    if not hasattr(model, "segment"):
        raise DataError(p, "not a stitchnet-tf segmentation model")
    size = None
    config_path = (run or p.parent) / "config.json"
    if config_path.is_file():
        try:
            size = int(json.loads(config_path.read_text()).get("size"))
        except (ValueError, TypeError, OSError):
            size = None
    return LoadedModel(model, size, p, run)


@dataclass
class Prediction:
    """One slice's result: labels [H, W] uint8 (0..3) in the original geometry, the model-size
    probabilities [S, S, 4] and entropy [S, S], the prepared input x [S, S] and its geometry."""

    labels: np.ndarray
    probabilities: np.ndarray
    entropy: np.ndarray
    x: np.ndarray
    lung: np.ndarray
    geometry: Geometry

    def entropy_original(self) -> np.ndarray:
        """Predictive entropy [H, W] mapped back to the original slice (0 outside the crop)."""
        return self.geometry.to_original(self.entropy.astype(np.float32), "linear", fill=0.0)


class Predictor:
    """Segments slices with a trained model.

    Args:
        model: a model with `segment(x, lung, samples, decision)` (StitchNet, UNet, SegNet).
        size: model size S (a multiple of 32).
        segmenter: lung segmenter for slices without a lung mask (default: the package's).
        samples: posterior samples to average (StitchNet; 0 = posterior mean).
        decision: StitchNet decision rule (None = the model's own).
    """

    def __init__(
        self,
        model,
        size: int,
        segmenter=None,
        samples: int = 0,
        decision: str | None = None,
        margin: float = DEFAULT_MARGIN,
    ):
        self.model, self.size = model, check_model_size(size)
        fixed = getattr(model, "exported_size", None)
        if fixed is not None and fixed != self.size:
            raise DataError(None, f"the exported model takes {fixed} px slices, not {size}")
        if segmenter is None:
            from stitchnet_tf.data.lungmask import default_segmenter

            segmenter = default_segmenter()
        self.segmenter, self.samples, self.decision, self.margin = (
            segmenter,
            samples,
            decision,
            margin,
        )

    def _segment(self, x: np.ndarray, lung: np.ndarray) -> dict:
        kwargs = {"lung": lung}
        if self.samples:
            kwargs["samples"] = self.samples
        if self.decision:
            kwargs["decision"] = self.decision
        out = self.model.segment(x, **kwargs)
        return {k: np.asarray(v) for k, v in out.items()}

    def predict(self, raws: list[RawSlice], already_cropped: bool = False) -> list[Prediction]:
        """Segment a batch of slices as read (`preprocess.read_sample` or `io.read_image`)."""
        prepared = [
            prepare(r, self.size, self.segmenter, self.margin, already_cropped) for r in raws
        ]
        x = np.stack([p.x for p in prepared])[..., None].astype(np.float32)
        lung = np.stack([p.lung for p in prepared])[..., None].astype(np.float32)
        out = self._segment(x, lung)
        results = []
        for i, p in enumerate(prepared):
            labels = out["labels"][i].astype(np.uint8)
            results.append(
                Prediction(
                    labels=p.geometry.to_original(labels, "nearest", fill=BACKGROUND),
                    probabilities=out["probabilities"][i],
                    entropy=out["entropy"][i],
                    x=p.x,
                    lung=p.lung,
                    geometry=p.geometry,
                )
            )
        return results

    def predict_images(self, images: list[np.ndarray]) -> list[Prediction]:
        """Segment unlabelled slices [H, W] in [0, 1] (lung field from the segmenter)."""
        from stitchnet_tf.data.classes import ALL

        for image in images:
            io.check_size(image.shape, "image")
        return self.predict([RawSlice(im, np.full(im.shape, ALL, np.uint8), None) for im in images])
