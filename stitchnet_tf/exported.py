"""Reading exports back: `load_exported` gives a SavedModel (TF Serving layout) or a `.tflite`
file written by `stitchnet_tf.export` the `segment(x, lung)` API of the Keras models, so that
`predict` and `evaluate` accept them. Kept apart from the writers so that `inference` can load
an export without importing them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from stitchnet_tf import native
from stitchnet_tf.errors import DataError

#: The export's description inside a SavedModel: size, decision rule, intensity preprocessing.
METADATA = "assets.extra/stitchnet.json"


def tflite_metadata(path: str | os.PathLike) -> Path:
    """The description written beside a `.tflite` file (`<name>.tflite.json`): size, decision
    rule and intensity preprocessing, which the flat buffer does not hold."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _interpreter(path: Path):
    """LiteRT's interpreter (`ai-edge-litert`) when installed, else `tf.lite.Interpreter`."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - depends on the environment
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter(model_path=str(path))


class ExportedSavedModel:
    """A SavedModel written by `export_savedmodel`, with the `segment(x, lung)` API of the
    Keras models (so `Predictor`, `evaluate` and `predict` accept it)."""

    def __init__(self, path: str | os.PathLike):
        import tensorflow as tf

        self.path = Path(path)
        meta = self.path / METADATA
        if not meta.is_file():
            raise DataError(self.path, f"not a stitchnet-tf export: {METADATA} is missing")
        self.metadata = json.loads(meta.read_text())
        self.size = self.exported_size = int(self.metadata["size"])
        self.decision = self.metadata.get("decision")
        self.intensity = self.metadata.get("intensity", "none")
        try:
            self.loaded = tf.saved_model.load(str(self.path))
        except Exception as e:
            raise DataError(self.path, f"cannot load SavedModel ({type(e).__name__})") from None
        self.signature = self.loaded.signatures["serving_lung"]

    def segment(self, x, lung=None, samples: int = 0, decision: str | None = None) -> dict:
        """x, lung [B, S, S, 1] -> probabilities [B,S,S,4], labels [B,S,S], entropy [B,S,S]."""
        _check_fixed(self.path, samples, decision, self.decision)
        x = np.asarray(x, np.float32)
        lung = (x > 0).astype(np.float32) if lung is None else np.asarray(lung, np.float32)
        out = self.signature(image=x, lung=lung)
        return {k: np.asarray(out[k]) for k in ("probabilities", "labels", "entropy")}


class ExportedTFLite:
    """A `.tflite` file written by `export_tflite`, with the `segment(x, lung)` API."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with native.captured_stderr():  # LiteRT's "Created ... XNNPACK delegate" line
                self.interpreter = _interpreter(self.path)
                self.interpreter.allocate_tensors()
            self.runner = self.interpreter.get_signature_runner("serving_lung")
        except Exception as e:
            raise DataError(self.path, f"cannot load TFLite model ({type(e).__name__})") from None
        details = self.runner.get_input_details()["image"]
        self.size = self.exported_size = int(details["shape_signature"][1])
        self.decision = None
        meta = tflite_metadata(self.path)
        try:
            self.metadata = json.loads(meta.read_text()) if meta.is_file() else {}
        except (OSError, ValueError):
            raise DataError(meta, "unreadable TFLite description") from None
        self.intensity = self.metadata.get("intensity", "none")

    def segment(self, x, lung=None, samples: int = 0, decision: str | None = None) -> dict:
        """As `ExportedSavedModel.segment`; the batch runs one slice at a time."""
        _check_fixed(self.path, samples, decision, None)
        x = np.asarray(x, np.float32)
        lung = (x > 0).astype(np.float32) if lung is None else np.asarray(lung, np.float32)
        outs = [self.runner(image=x[i : i + 1], lung=lung[i : i + 1]) for i in range(len(x))]
        return {
            k: np.concatenate([np.asarray(o[k]) for o in outs])
            for k in ("probabilities", "labels", "entropy")
        }


def _check_fixed(path: Path, samples: int, decision: str | None, exported: str | None) -> None:
    if samples:
        raise DataError(path, "an exported model segments at the posterior mean (no --samples)")
    if decision and exported and decision != exported:
        raise DataError(path, f"exported with the {exported!r} decision rule, not {decision!r}")


def load_exported(path: str | os.PathLike):
    """An exported model: a `.tflite` file, a SavedModel version folder, or a model base folder
    holding numeric versions (the newest is used, as TensorFlow Serving does)."""
    p = Path(path)
    if p.suffix == ".tflite":
        if not p.is_file():
            raise DataError(p, "model not found")
        return ExportedTFLite(p)
    if (p / "saved_model.pb").is_file():
        return ExportedSavedModel(p)
    versions = sorted(
        (int(v.name) for v in p.glob("*") if v.is_dir() and v.name.isdigit()), reverse=True
    )
    for v in versions:
        if (p / str(v) / "saved_model.pb").is_file():
            return ExportedSavedModel(p / str(v))
    raise DataError(p, "not an exported model: no saved_model.pb and no version folders")


def is_tflite(path: str | os.PathLike) -> bool:
    """Whether the file at `path` is a TFLite flatbuffer (file identifier "TFL3")."""
    try:
        with open(path, "rb") as f:
            return f.read(8)[4:8] == b"TFL3"
    except OSError:
        return False


def is_exported(path: str | os.PathLike) -> bool:
    """Whether `path` looks like an export (not a run folder or a `.keras` file)."""
    p = Path(path)
    if p.suffix == ".tflite":
        return True
    if not p.is_dir():
        return False
    if (p / "saved_model.pb").is_file():
        return True
    return any(v.is_dir() and v.name.isdigit() for v in p.glob("*"))
