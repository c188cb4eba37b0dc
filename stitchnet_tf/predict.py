"""Segmenting new CT: label masks in the input's own geometry, overlays and lesion burden.

Inputs: a slice file, a NIfTI volume, a DICOM file or series folder, or a folder of these.
Outputs (in one folder, written atomically):
- slices: `<name>_labels.png` (indexed PNG: 0 background, 1 healthy, 2 GGO, 3 consolidation),
  `<name>_overlay.png` (GGO green, consolidation blue, as the paper's Fig. 2), optionally
  `<name>_uncertainty.png` (predictive entropy, 255 = log 4);
- volumes: `<name>_labels.nii.gz` (a NIfTI label volume in the input's voxel order with its
  affine, so that it overlays the CT in a viewer: the input's header for NIfTI input, the
  series' geometry for DICOM; `volumes.write_label_volume`) and `<name>_overlays/<k>.png`
  (slice k of the canonical orientation, `volumes`);
- volumes: `<name>_labels.json`, the label names, values, colours and codes of the NIfTI, and
  the provenance (`clinical.write_label_sidecar`);
- DICOM series: `<name>_seg.dcm`, a DICOM Segmentation (highdicom) of the series with one
  segment per class, coded, and the algorithm identified (`clinical.write_dicom_seg`);
- `statistics.json`: per input and in total, lung, GGO and consolidation volumes in mL (voxel
  volume from the affine; null for 2-D slices), percent of lung, mean HU per class, and
  provenance: model file and SHA-256, lung segmenter, window, package version (`clinical`);
- `burden.csv`: lung, GGO and consolidation pixels per slice and per volume (and mL per
  volume), and the percentage of the lung that is GGO and consolidation; written last.

The lung field comes from the shipped lung U-Net, or from the user's masks (`lungs=DIR`,
`data.user_lungs`: lungmask or TotalSegmentator output).

A volume is read once, whole (`volumes.read_volume`), and segmented slice by slice in its
canonical orientation (`segment_volume`); a DICOM folder is searched recursively and its series
chosen by `volumes.choose_series` (`series=` picks one).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stitchnet_tf import clinical
from stitchnet_tf.data import io, user_lungs
from stitchnet_tf.data.classes import CON, GGO
from stitchnet_tf.data.intensity import to_uint8
from stitchnet_tf.data.volumes import Volume, read_volume, write_label_volume
from stitchnet_tf.errors import DataError
from stitchnet_tf.fileio import atomic_dir, check_model_output
from stitchnet_tf.inference import Predictor, check_stitchnet_options, load_model, model_class
from stitchnet_tf.progress import expect

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


def _kind_or_none(path: Path) -> str | None:
    try:
        return io.kind_of(path)
    except DataError:
        return None


def _inputs(path: Path) -> list[Path]:
    """The slice files, volume files and DICOM folders under `path`.

    A folder that holds DICOM files or sub-folders but no slice or NIfTI file is one DICOM
    input, searched recursively (patient/study/series trees; its series chosen by
    `volumes.choose_series`). In a folder of slices and volumes each sub-folder is one DICOM
    input; a dataset root is read through its `images/` folder.
    """
    if path.is_file():
        io.kind_of(path)
        return [path]
    if not path.is_dir():
        raise DataError(path, io.why_missing(path))
    io.kind_of(path)  # refuses a folder named like an image file
    entries = [e for e in sorted(path.iterdir()) if io.is_image_candidate(e)]
    if (path / "images").is_dir():
        return _inputs(path / "images")
    kinds = {_kind_or_none(e) for e in entries}
    if kinds & {"dicom", "dicom-series"} and not kinds & {"slice", "nifti"}:
        return [path]  # the folder is one DICOM input
    out = [
        e for e in entries if e.is_dir() or e.suffix.lower() not in (".csv", ".json", ".md", ".txt")
    ]
    for e in out:
        io.kind_of(e)  # a non-image file is an error naming it
    if not out:
        raise DataError(path, "no images found (empty folder)")
    return out


@dataclass(frozen=True)
class SegmentedVolume:
    """A volume input segmented by `predict_path`: its output name, the `Volume` read (geometry,
    NIfTI header, DICOM series) and its labels [K, H, W] uint8 in the volume's canonical
    orientation (`volume.to_source(labels)` gives them in the input's voxel order)."""

    name: str
    volume: Volume
    labels: np.ndarray


def segment_volume(
    predictor: Predictor,
    volume: Volume,
    window: io.Window = io.Window(),
    batch_size: int = 8,
    each: Callable[[int, np.ndarray, object], None] | None = None,
    lungs: np.ndarray | None = None,
) -> np.ndarray:
    """Labels [K, H, W] uint8 of every canonical slice of `volume`, segmented in batches of
    `batch_size`; `each(k, image, prediction)` is called for every slice as it is done (image
    [H, W] in [0, 1], an `inference.Prediction`). `lungs` [K, H, W] bool: the lung field (else
    the predictor's segmenter finds it)."""
    io.check_size(volume.data.shape[1:], volume.path)
    labels = np.zeros(volume.data.shape, np.uint8)
    for k0 in range(0, volume.slices, batch_size):
        ks = range(k0, min(volume.slices, k0 + batch_size))
        images = [io.volume_slice(volume, k, window) for k in ks]
        field = None if lungs is None else [lungs[k] for k in ks]
        preds = predictor.predict_images(images, field)
        for k, image, pred in zip(ks, images, preds, strict=True):
            labels[k] = pred.labels
            if each is not None:
                each(k, image, pred)
    return labels


def hounsfield(volume: Volume) -> np.ndarray | None:
    """The volume's Hounsfield units [K, H, W], or None when it stores 8-bit or [0, 1] values."""
    data = volume.data
    if volume.kind != "nifti":
        return data
    if data.dtype == np.uint8 or (data.size and data.min() >= 0.0 and data.max() <= 1.0):
        return None
    return data


def dicom_sources(volume: Volume) -> list:
    """The DICOM datasets (no pixel data) of a series volume, in `to_stored_slices` order:
    those read when its series was found, else read again."""
    from stitchnet_tf.data.volumes import read_dicom

    if volume.series is not None and len(volume.series.headers) == len(volume.files):
        return list(volume.series.headers)
    return [read_dicom(Path(f), pixels=False) for f in volume.files]


def write_volume_outputs(
    folder: Path, result: SegmentedVolume, provenance: dict, log: Callable[[str], None] | None
) -> dict:
    """The per-volume files of `predict` beside the overlays: `<name>_labels.nii.gz` and its
    sidecar `<name>_labels.json`, and for a DICOM series `<name>_seg.dcm`; returns the
    volume's `clinical.statistics` entry."""
    nifti = folder / f"{result.name}_labels.nii.gz"
    write_label_volume(nifti, result.labels, result.volume)
    clinical.write_label_sidecar(nifti, provenance)
    if result.volume.kind == "dicom-series":
        sources = dicom_sources(result.volume)
        stored = result.volume.to_stored_slices(result.labels)
        try:
            clinical.check_source(stored, sources, result.volume.path)
        except DataError as e:  # a series without full geometry still gets its NIfTI
            if log is not None:
                log(f"warning: no DICOM-SEG for {result.name}: {e}")
        else:
            clinical.write_dicom_seg(folder / f"{result.name}_seg.dcm", stored, sources, provenance)
    ml = clinical.voxel_volume_ml(result.volume.affine)
    return clinical.statistics(result.labels, hounsfield(result.volume), ml, provenance)


def _slice_total(inputs: list[Path], series: str | None) -> int:
    """How many slices `predict_path` will segment (a progress bar's total; 0: unknown)."""
    from stitchnet_tf.data.volumes import volume_shape

    try:
        return sum(
            1 if io.kind_of(p) == "slice" else volume_shape(p, series if p.is_dir() else None)[0]
            for p in inputs
        )
    except DataError:  # said again, in full, where the input is read
        return 0


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
    series: str | None = None,
    log: Callable[[str], None] | None = None,
    lungs: str | os.PathLike | None = None,
) -> dict:
    """Segment everything under `input_path` with a trained model (a path or a shipped model's
    name); write results to `output`.

    `series` picks a SeriesInstanceUID in a DICOM folder (default: the largest axial CT
    series); `log` receives a line naming the series read when a folder holds several, and
    warnings. `lungs`: a folder of the user's lung masks (`data.user_lungs`) used instead of
    the lung segmenter. Returns counts of slices and volumes written and the paths of the
    burden CSV and statistics JSON.
    """
    inputs = {"--input": input_path}
    check_model_output(output, model_path, inputs, overwrite=overwrite, marker=PREDICT_MARKER)
    check_stitchnet_options(model_path, samples, decision)
    inputs = _inputs(Path(input_path))
    if lungs is not None:
        lungs = user_lungs.check_folder(lungs)
    if series is not None and not any(p.is_dir() for p in inputs):
        raise DataError(input_path, "--series picks a series of a DICOM folder; there is none")
    loaded = load_model(model_path)
    size = loaded.input_size(size)
    segmenter = user_lungs.no_segmenter if lungs is not None else None
    predictor = Predictor(
        loaded.model, size, segmenter, samples=samples, decision=decision, tta=tta
    )
    base = clinical.provenance(
        loaded.path,
        model_class=model_class(loaded.path),
        lung_segmenter="user-masks" if lungs is not None else predictor.segmenter,
        window=window,
    )
    if lungs is not None:
        base["lung_segmenter"]["folder"] = str(lungs)
    rows: list[dict] = []
    entries: list[dict] = []
    n_slices = n_volumes = 0
    if progress is not None:  # the slices to come, from the headers
        expect(progress, _slice_total(inputs, series))
    with atomic_dir(output, overwrite, marker=PREDICT_MARKER) as tmp:
        for path in inputs:
            name = io.stem_of(path)
            provenance = base | {"input": str(path)}
            if io.kind_of(path) == "slice":
                image = io.read_image(path, None, window)
                io.check_size(image.shape, path)
                field = (
                    None if lungs is None else [user_lungs.slice_lungs(lungs, name, image.shape)]
                )
                pred = predictor.predict_images([image], field)[0]
                io.write_png(tmp / f"{name}_labels.png", pred.labels, LABEL_PALETTE)
                Image.fromarray(overlay(image, pred.labels)).save(tmp / f"{name}_overlay.png")
                if uncertainty:
                    ent = pred.entropy_original() / np.log(4.0)
                    io.write_png(tmp / f"{name}_uncertainty.png", to_uint8(ent))
                rows.append(
                    {"input": path.name, "level": "slice", "slice": ""} | burden_row(pred.labels)
                )
                entries.append(clinical.statistics(pred.labels, None, None, provenance))
                n_slices += 1
                if progress:
                    progress(1)
                continue
            volume = read_volume(path, series if path.is_dir() else None)
            choice = volume.series_choice()
            if choice and log is not None:
                log(choice)
            overlay_dir = tmp / f"{name}_overlays"
            overlay_dir.mkdir()

            def each(k: int, image: np.ndarray, pred, path=path, overlay_dir=overlay_dir) -> None:
                Image.fromarray(overlay(image, pred.labels)).save(overlay_dir / f"{k:04d}.png")
                if uncertainty:
                    ent = pred.entropy_original() / np.log(4.0)
                    io.write_png(overlay_dir / f"{k:04d}_uncertainty.png", to_uint8(ent))
                rows.append(
                    {"input": path.name, "level": "slice", "slice": k} | burden_row(pred.labels)
                )
                if progress:
                    progress(1)

            field = None if lungs is None else user_lungs.volume_lungs(lungs, name, volume)
            labels = segment_volume(predictor, volume, window, batch_size, each, field)
            entry = write_volume_outputs(
                tmp, SegmentedVolume(name, volume, labels), provenance, log
            )
            entries.append(entry)
            ml = {f"{k}_ml": round(entry[f"{k}_ml"], 3) for k in ("lung", "ggo", "con")}
            rows.append(
                {"input": path.name, "level": "volume", "slice": ""} | burden_row(labels) | ml
            )
            n_slices += volume.slices
            n_volumes += 1
        clinical.write_statistics(tmp / clinical.STATISTICS_FILE, entries)
        with open(tmp / PREDICT_MARKER, "w", newline="") as f:
            fields = list(rows[0]) + [k for k in ("lung_ml", "ggo_ml", "con_ml") if n_volumes]
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(fields)), restval="")
            writer.writeheader()
            writer.writerows(rows)
    burden = str(Path(output) / PREDICT_MARKER)
    statistics = str(Path(output) / clinical.STATISTICS_FILE)
    return {"slices": n_slices, "volumes": n_volumes, "burden": burden, "statistics": statistics}
