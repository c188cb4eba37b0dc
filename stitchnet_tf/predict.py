"""Segmenting new CT: label masks in the input's own geometry, overlays and lesion burden.

Inputs: a slice file, a NIfTI volume, a DICOM file or series folder, or a folder of these.
Outputs (in one folder, written atomically):
- slices: `<name>_labels.png` (indexed PNG: 0 background, 1 healthy, 2 GGO, 3 consolidation),
  `<name>_overlay.png` (GGO green, consolidation blue, as the paper's Fig. 2), optionally
  `<name>_uncertainty.png` (predictive entropy, 255 = log 4);
- volumes: `<name>_labels.nii.gz` (a NIfTI label volume; the input's affine for NIfTI input)
  and `<name>_overlays/<k>.png`;
- `burden.csv`: lung, GGO and consolidation pixels per slice and per volume, and the percentage
  of the lung that is GGO and consolidation.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from stitchnet_tf.data import io
from stitchnet_tf.data.classes import CON, GGO
from stitchnet_tf.data.intensity import to_uint8
from stitchnet_tf.errors import DataError
from stitchnet_tf.fileio import atomic_dir, check_model_output
from stitchnet_tf.inference import Predictor, check_stitchnet_options, load_model

#: the lesion-burden table, written last: marks a folder written by `predict`
PREDICT_MARKER = "burden.csv"

#: Palette of label PNGs: background black, healthy grey, GGO green, consolidation blue.
LABEL_PALETTE = [0, 0, 0, 110, 110, 110, 0, 200, 0, 30, 90, 255]
OVERLAY_COLOURS = {GGO: (0, 220, 0), CON: (30, 90, 255)}


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Grey image [H, W] in [0, 1] with GGO in green and consolidation in blue: [H, W, 3] uint8."""
    rgb = np.repeat(to_uint8(image)[..., None], 3, axis=-1).astype(np.float32)
    for k, colour in OVERLAY_COLOURS.items():
        m = labels == k
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(colour, np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def burden_row(labels: np.ndarray) -> dict:
    """Lung, GGO and consolidation pixel counts of a label map and their share of the lung."""
    lung = int((labels > 0).sum())
    ggo, con = int((labels == GGO).sum()), int((labels == CON).sum())
    pct = lambda n: round(100.0 * n / lung, 3) if lung else 0.0  # noqa: E731
    return {
        "lung_px": lung,
        "ggo_px": ggo,
        "con_px": con,
        "ggo_pct": pct(ggo),
        "con_pct": pct(con),
        "lesion_pct": pct(ggo + con),
    }


def _inputs(path: Path) -> list[Path]:
    """The slice files, volume files and DICOM series under `path`."""
    if path.is_file():
        io.kind_of(path)
        return [path]
    if not path.is_dir():
        raise DataError(path, io.why_missing(path))
    io.kind_of(path)  # refuses a folder named like an image file
    entries = [e for e in sorted(path.iterdir()) if io.is_image_candidate(e)]
    if entries and all(e.is_file() and io.kind_of(e) == "dicom" for e in entries):
        return [path]  # the folder is one DICOM series
    if (path / "images").is_dir():
        return _inputs(path / "images")
    out = [
        e for e in entries if e.is_dir() or e.suffix.lower() not in (".csv", ".json", ".md", ".txt")
    ]
    for e in out:
        io.kind_of(e)  # a non-image file is an error naming it
    if not out:
        raise DataError(path, "no images found (empty folder)")
    return out


def _nifti_affine(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path)).affine
    except Exception:
        return np.eye(4)


def predict_path(
    model_path: str | os.PathLike,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    size: int | None = None,
    samples: int = 0,
    decision: str | None = None,
    tta: bool = False,
    uncertainty: bool = False,
    window: io.Window = io.Window(),
    batch_size: int = 8,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Segment everything under `input_path` with a trained model; write results to `output`.

    Returns counts of slices and volumes written and the burden CSV path.
    """
    inputs = {"--input": input_path}
    check_model_output(output, model_path, inputs, overwrite=overwrite, marker=PREDICT_MARKER)
    check_stitchnet_options(model_path, samples, decision)
    inputs = _inputs(Path(input_path))
    loaded = load_model(model_path)
    size = loaded.input_size(size)
    predictor = Predictor(loaded.model, size, samples=samples, decision=decision, tta=tta)
    rows: list[dict] = []
    n_slices = n_volumes = 0
    with atomic_dir(output, overwrite, marker=PREDICT_MARKER) as tmp:
        for path in inputs:
            kind = io.kind_of(path)
            name = io.stem_of(path)
            n = io.slice_count(path)
            if n is None:  # a 2-D slice
                image = io.read_image(path, None, window)
                io.check_size(image.shape, path)
                pred = predictor.predict_images([image])[0]
                io.write_png(tmp / f"{name}_labels.png", pred.labels, LABEL_PALETTE)
                Image.fromarray(overlay(image, pred.labels)).save(tmp / f"{name}_overlay.png")
                if uncertainty:
                    ent = pred.entropy_original() / np.log(4.0)
                    io.write_png(tmp / f"{name}_uncertainty.png", to_uint8(ent))
                rows.append(
                    {"input": path.name, "level": "slice", "slice": ""} | burden_row(pred.labels)
                )
                n_slices += 1
                if progress:
                    progress(1)
                continue
            labels_volume, overlay_dir = [], tmp / f"{name}_overlays"
            overlay_dir.mkdir()
            for k0 in range(0, n, batch_size):
                ks = range(k0, min(n, k0 + batch_size))
                images = [io.read_image(path, k, window) for k in ks]
                io.check_size(images[0].shape, path)
                for k, image, pred in zip(
                    ks, images, predictor.predict_images(images), strict=True
                ):
                    labels_volume.append(pred.labels)
                    Image.fromarray(overlay(image, pred.labels)).save(overlay_dir / f"{k:04d}.png")
                    if uncertainty:
                        ent = pred.entropy_original() / np.log(4.0)
                        io.write_png(overlay_dir / f"{k:04d}_uncertainty.png", to_uint8(ent))
                    rows.append(
                        {"input": path.name, "level": "slice", "slice": k} | burden_row(pred.labels)
                    )
                    n_slices += 1
                if progress:
                    progress(len(ks))
            _write_label_volume(tmp / f"{name}_labels.nii.gz", labels_volume, path, kind)
            total = burden_row(np.stack(labels_volume))
            rows.append({"input": path.name, "level": "volume", "slice": ""} | total)
            n_volumes += 1
        with open(tmp / PREDICT_MARKER, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    burden = str(Path(output) / PREDICT_MARKER)
    return {"slices": n_slices, "volumes": n_volumes, "burden": burden}


def _write_label_volume(path: Path, slices: list[np.ndarray], source: Path, kind: str) -> None:
    """Stack per-slice labels [H, W] back into the source volume's (i, j, k) voxel order."""
    import nibabel as nib

    data = np.stack([s.T for s in slices], axis=-1).astype(np.uint8)  # read_image took .T
    affine = _nifti_affine(source) if kind == "nifti" else np.eye(4)
    if kind != "nifti":  # DICOM: rows/columns as stored, slices sorted by position
        data = np.stack(slices, axis=-1).astype(np.uint8)
    img = nib.Nifti1Image(data, affine)
    img.header.set_intent("label")
    nib.save(img, str(path))
