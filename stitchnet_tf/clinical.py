"""Clinical output formats of a segmentation: `statistics.json`, NIfTI label sidecars and
DICOM Segmentation objects.

- `statistics` measures one label volume [K, H, W] (or slice [H, W]): lung, healthy lung, GGO,
  consolidation and lesion in voxels (pixels for a 2-D slice) and in mL when the voxel size is
  known, their share of the lung, and the mean Hounsfield units of each lung class;
  `write_statistics` writes the entries and their totals to `statistics.json`.
- `write_label_sidecar` writes `<name>_labels.json` beside `<name>_labels.nii.gz`: label values,
  names, colours and codes (ITK-SNAP / 3D Slicer users read these) and the provenance.
- `write_dicom_seg` writes a DICOM Segmentation (highdicom, BINARY) of a CT series, one segment
  per lung class.

Every output carries a `provenance` dict (`provenance()`): the model file and its SHA-256, its
class, the lung segmenter, the CT window, the package version, the date and the input.

Codes (DICOM PS3.16; checked against `pydicom.sr.codedict`, which lacks only consolidation):

| segment | category | property type | anatomic region |
| --- | --- | --- | --- |
| 1 healthy lung | SCT 91723000 Anatomical Structure | SCT 39607008 Lung | - |
| 2 GGO | SCT 49755003 Morphologically Abnormal Structure | DCM 112120 Ground glass opacity | SCT 39607008 Lung |
| 3 consolidation | SCT 49755003 Morphologically Abnormal Structure | SCT 95436008 Lung consolidation | SCT 39607008 Lung |

DCM 112120 is the DICOM code for ground-glass opacity (CID 6104 "Abnormal Opacity Finding or
Feature"); SNOMED 50196008, sometimes quoted for it, is "Perialveolar fibrosis of lung".
"""  # noqa: E501

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import stitchnet_tf
from stitchnet_tf.data.classes import BACKGROUND, CON, GGO, HEALTHY
from stitchnet_tf.errors import DataError
from stitchnet_tf.fileio import atomic_write_text, check_parents, temp_prefix

#: Name of the statistics file `predict` writes beside burden.csv.
STATISTICS_FILE = "statistics.json"
#: Schema tag of statistics.json and of the label sidecars (bumped on incompatible changes).
SCHEMA_VERSION = 1

#: Label value -> (name, RGB colour): the colours of `predict.LABEL_PALETTE`.
LABELS: dict[int, tuple[str, tuple[int, int, int]]] = {
    BACKGROUND: ("background", (0, 0, 0)),
    HEALTHY: ("healthy lung", (110, 110, 110)),
    GGO: ("ground-glass opacity", (0, 200, 0)),
    CON: ("consolidation", (30, 90, 255)),
}

#: (value, scheme, meaning) of the coded concepts (see the module docstring).
_ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical Structure")
_ABNORMAL_STRUCTURE = ("49755003", "SCT", "Morphologically Abnormal Structure")
_LUNG = ("39607008", "SCT", "Lung")
_GROUND_GLASS = ("112120", "DCM", "Ground glass opacity")
_CONSOLIDATION = ("95436008", "SCT", "Lung consolidation")
#: Label value -> segment label, category, property type, anatomic region (None: none).
SEGMENT_CODES: dict[int, tuple[str, tuple, tuple, tuple | None]] = {
    HEALTHY: ("Healthy lung", _ANATOMICAL_STRUCTURE, _LUNG, None),
    GGO: ("Ground-glass opacity", _ABNORMAL_STRUCTURE, _GROUND_GLASS, _LUNG),
    CON: ("Consolidation", _ABNORMAL_STRUCTURE, _CONSOLIDATION, _LUNG),
}

#: Name of the algorithm in the DICOM-SEG Algorithm Identification Sequence.
ALGORITHM_NAME = "stitchnet-tf"
#: Series number of the DICOM Segmentation series.
SEG_SERIES_NUMBER = 900
#: Type 2 patient and study attributes highdicom copies from the source: an anonymised series
#: that dropped them gets them empty (as the standard allows) instead of a failure.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
#: Attributes a DICOM-SEG needs from every source image (checked up front, named when missing).
_REQUIRED = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Rows",
    "Columns",
)
_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness")


# --------------------------------------------------------------------------- provenance


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file; of a folder (a SavedModel export), of its files' relative paths
    and contents in sorted order."""
    p = Path(path)
    digest = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            digest.update(f.relative_to(p).as_posix().encode() + b"\0")
            digest.update(bytes.fromhex(sha256_of(f)))
        return digest.hexdigest()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def segmenter_provenance(segmenter: Any) -> dict:
    """How the lung field was found: `{"method": "lung-unet", "model", "sha256"}` for the
    shipped (or another) lung U-Net, `{"method": "classical"}` for `AutoLungMask`,
    `{"method": "user-masks"}` for the string "user-masks" (lung masks given with the input)."""
    if isinstance(segmenter, str):
        return {"method": segmenter}
    config = segmenter.get_config() if hasattr(segmenter, "get_config") else {}
    method = config.get("method")
    if method == "learned-unet" and getattr(segmenter, "path", None) is not None:
        path = Path(segmenter.path)
        return {"method": "lung-unet", "model": str(path), "sha256": sha256_of(path)}
    if method == "auto-classical":
        return {"method": "classical", "name": type(segmenter).__name__}
    return {"method": type(segmenter).__name__}


def provenance(
    model_path: str | os.PathLike,
    *,
    model_class: str | None,
    lung_segmenter: Any,
    window: Any,
    input_path: str | os.PathLike | None = None,
    date: datetime.datetime | None = None,
) -> dict:
    """Where a segmentation came from, for every clinical output.

    Args:
        model_path: the model file (or export folder) that segmented; hashed with SHA-256.
        model_class: e.g. `StitchNet`, `ThresholdRule` (`inference.model_class`).
        lung_segmenter: a `LungSegmenter` or "user-masks" (`segmenter_provenance`).
        window: the CT window: an `io.Window` (level, width) or None for 8-bit input.
        input_path: the segmented input.
        date: when (default now, UTC).
    """
    if window is not None and not isinstance(window, dict):
        window = {"level": float(window.level), "width": float(window.width)}
    return {
        "model": {
            "path": str(model_path),
            "sha256": sha256_of(model_path),
            "class": model_class,
        },
        "lung_segmenter": segmenter_provenance(lung_segmenter),
        "window": window,
        "software": {"name": ALGORITHM_NAME, "version": stitchnet_tf.__version__},
        "date": (date or datetime.datetime.now(datetime.UTC)).isoformat(timespec="seconds"),
        "input": None if input_path is None else str(input_path),
    }


# --------------------------------------------------------------------------- statistics


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL from a 4×4 voxel-to-mm affine: |det(affine[:3, :3])| / 1000."""
    return float(abs(np.linalg.det(np.asarray(affine, np.float64)[:3, :3]))) / 1000.0


def _as_volume(labels: np.ndarray, hu: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels[None]
    if labels.ndim != 3:
        raise ValueError(f"labels must be [K, H, W] or [H, W], got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > CON):
        raise ValueError(f"labels must be 0..{CON}, got values up to {labels.max()}")
    if hu is not None:
        hu = np.asarray(hu, np.float64)
        if hu.ndim == 2:
            hu = hu[None]
        if hu.shape != labels.shape:
            raise ValueError(f"HU shape {hu.shape} does not match labels shape {labels.shape}")
    return labels, hu


def _pct(n: float, lung: float) -> float:
    return round(100.0 * n / lung, 3) if lung else 0.0


def statistics(
    labels: np.ndarray,
    hu: np.ndarray | None,
    voxel_volume_ml: float | None,
    provenance: dict,
) -> dict:
    """Measurements of one input's labels [K, H, W] (a slice [H, W] is [1, H, W]).

    Args:
        labels: 0 background, 1 healthy lung, 2 GGO, 3 consolidation.
        hu: Hounsfield units of the same voxels, or None (8-bit input: no mean HU).
        voxel_volume_ml: one voxel's volume in mL (`voxel_volume_ml(affine)`), or None when the
            spacing is unknown (2-D slice files): then the volumes in mL are null.
        provenance: `provenance()` of this input, stored with the entry.

    Returns a JSON-ready dict: `lung_px`, `healthy_px`, `ggo_px`, `con_px`, `lesion_px` (voxel
    counts; pixels for a slice), the same in mL (`*_ml`, null when `spacing_known` is false),
    `ggo_pct`, `con_pct`, `lesion_pct` (of the lung), `mean_hu` per lung class (null without HU
    or for an empty class), and the provenance.
    """
    labels, hu = _as_volume(labels, hu)
    counts = {
        "healthy": int((labels == HEALTHY).sum()),
        "ggo": int((labels == GGO).sum()),
        "con": int((labels == CON).sum()),
    }
    counts["lesion"] = counts["ggo"] + counts["con"]
    counts["lung"] = counts["healthy"] + counts["lesion"]
    known = voxel_volume_ml is not None
    entry: dict[str, Any] = {
        "input": provenance.get("input"),
        "shape": list(labels.shape),
        "spacing_known": known,
        "voxel_volume_ml": float(voxel_volume_ml) if known else None,
    }
    order = ("lung", "healthy", "ggo", "con", "lesion")
    entry |= {f"{k}_px": counts[k] for k in order}
    entry |= {f"{k}_ml": round(counts[k] * voxel_volume_ml, 6) if known else None for k in order}
    entry |= {f"{k}_pct": _pct(counts[k], counts["lung"]) for k in ("ggo", "con", "lesion")}
    mean_hu = {}
    for name, value in (("healthy", HEALTHY), ("ggo", GGO), ("con", CON)):
        n = counts[name]
        mean_hu[name] = (
            None if hu is None or n == 0 else round(float(hu[labels == value].mean()), 2)
        )
    entry["mean_hu"] = mean_hu
    entry["provenance"] = provenance
    return entry


def totals(entries: Sequence[dict]) -> dict:
    """The sums over `statistics` entries: voxel counts always; mL only when every entry's
    spacing is known (else null); percentages of the summed lung (by mL when known); mean HU
    per class weighted by voxel count over the entries that have HU (null if none)."""
    order = ("lung", "healthy", "ggo", "con", "lesion")
    known = bool(entries) and all(e["spacing_known"] for e in entries)
    out: dict[str, Any] = {"inputs": len(entries), "spacing_known": known}
    out |= {f"{k}_px": sum(e[f"{k}_px"] for e in entries) for k in order}
    for k in order:  # from the counts: the entries' mL are rounded
        ml = sum(e[f"{k}_px"] * e["voxel_volume_ml"] for e in entries) if known else None
        out[f"{k}_ml"] = None if ml is None else round(ml, 6)
    unit = "ml" if known else "px"
    lung = out[f"lung_{unit}"]
    out |= {f"{k}_pct": _pct(out[f"{k}_{unit}"], lung) for k in ("ggo", "con", "lesion")}
    mean_hu = {}
    for name in ("healthy", "ggo", "con"):
        with_hu = [e for e in entries if e["mean_hu"][name] is not None]
        n = sum(e[f"{name}_px"] for e in with_hu)
        mean_hu[name] = (
            round(sum(e["mean_hu"][name] * e[f"{name}_px"] for e in with_hu) / n, 2) if n else None
        )
    out["mean_hu"] = mean_hu
    return out


def _dump(document: dict) -> str:
    return json.dumps(document, indent=2, allow_nan=False) + "\n"


def write_statistics(path: str | os.PathLike, entries: Sequence[dict]) -> dict:
    """Write `statistics.json` (atomically): `{"schema", "entries": [...], "totals": {...}}`
    with one `statistics` entry per input volume or slice; returns the document."""
    document = {
        "schema": {"name": "stitchnet-tf statistics", "version": SCHEMA_VERSION},
        "units": {
            "px": "voxels (pixels for a 2-D slice)",
            "ml": "millilitres; null where the spacing is unknown",
            "pct": "percent of the lung (healthy + GGO + consolidation)",
            "mean_hu": "HU; null without HU input (8-bit slices) or for an empty class",
        },
        "entries": list(entries),
        "totals": totals(entries),
    }
    atomic_write_text(path, _dump(document))
    return document


# --------------------------------------------------------------------------- NIfTI sidecar


def sidecar_path(nifti_path: str | os.PathLike) -> Path:
    """`<name>_labels.json` for `<name>_labels.nii.gz` (or `.nii`)."""
    p = Path(nifti_path)
    name = p.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return p.with_name(name[: -len(suffix)] + ".json")
    raise ValueError(f"{p}: not a NIfTI file name (.nii or .nii.gz)")


def _code(concept: tuple | None) -> dict | None:
    if concept is None:
        return None
    value, scheme, meaning = concept
    return {"CodeValue": value, "CodingSchemeDesignator": scheme, "CodeMeaning": meaning}


def label_descriptions() -> list[dict]:
    """The labels `{"value", "name", "color": [r, g, b]}`, lung classes with their DICOM codes
    (`category`, `type`, `region`: CodeValue, CodingSchemeDesignator, CodeMeaning)."""
    out = []
    for value, (name, colour) in LABELS.items():
        item: dict[str, Any] = {"value": value, "name": name, "color": list(colour)}
        if value in SEGMENT_CODES:
            _, category, kind, region = SEGMENT_CODES[value]
            item |= {"category": _code(category), "type": _code(kind), "region": _code(region)}
        out.append(item)
    return out


def write_label_sidecar(nifti_path: str | os.PathLike, provenance: dict) -> Path:
    """Write `<name>_labels.json` beside the label volume `nifti_path` (atomically): its label
    values, names, colours and codes, and the provenance; returns the sidecar's path."""
    path = sidecar_path(nifti_path)
    document = {
        "schema": {"name": "stitchnet-tf label sidecar", "version": SCHEMA_VERSION},
        "file": Path(nifti_path).name,
        "labels": label_descriptions(),
        "provenance": provenance,
    }
    atomic_write_text(path, _dump(document))
    return path


# --------------------------------------------------------------------------- DICOM-SEG


def _concept(concept: tuple):
    import highdicom as hd

    value, scheme, meaning = concept
    return hd.sr.CodedConcept(value, scheme, meaning)


def _algorithm(provenance: dict):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    model = provenance.get("model") or {}
    parameters = {
        key: str(value)
        for key, value in (
            ("model", Path(model["path"]).name if model.get("path") else None),
            ("model_sha256", model.get("sha256")),
            ("model_class", model.get("class")),
            ("lung_segmenter", (provenance.get("lung_segmenter") or {}).get("method")),
        )
        if value
    }
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.DCM.ArtificialIntelligence,
        version=stitchnet_tf.__version__,
        parameters=parameters or None,
    )


def segment_descriptions(provenance: dict) -> list:
    """highdicom `SegmentDescription`s of segments 1 healthy lung, 2 GGO, 3 consolidation
    (AUTOMATIC, this package's algorithm, display colours of `LABELS`)."""
    import highdicom as hd

    algorithm = _algorithm(provenance)
    out = []
    for value, (label, category, kind, region) in SEGMENT_CODES.items():
        out.append(
            hd.seg.SegmentDescription(
                segment_number=value,
                segment_label=label,
                segmented_property_category=_concept(category),
                segmented_property_type=_concept(kind),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                anatomic_regions=None if region is None else [_concept(region)],
                display_color=hd.color.CIELabColor.from_rgb(*LABELS[value][1]),
            )
        )
    return out


def _metadata_copy(ds):
    """`ds` without its pixel data, missing type 2 patient/study attributes set empty."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for element in ds:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            out.add(element)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def check_source(labels: np.ndarray, source_datasets: Sequence, where: Any = None) -> None:
    """Raise a `DataError` unless `labels` [K, H, W] matches the source images pixel for pixel
    (K single-frame images, or one multi-frame image of K frames, of H rows and W columns) and
    every image has what a DICOM-SEG needs (frame of reference, position, spacing ...)."""
    if labels.ndim != 3:
        raise DataError(where, f"labels must be [K, H, W], got shape {labels.shape}")
    if not source_datasets:
        raise DataError(where, "no source DICOM images for the segmentation")
    frames = [int(getattr(ds, "NumberOfFrames", 1) or 1) for ds in source_datasets]
    if len(source_datasets) > 1 and max(frames) > 1:
        raise DataError(where, "source: several multi-frame images (expected one series)")
    n = frames[0] if len(source_datasets) == 1 else len(source_datasets)
    if labels.shape[0] != n:
        raise DataError(
            where,
            f"labels have {labels.shape[0]} slices but the source series has {n} "
            f"{'frames' if len(source_datasets) == 1 and n > 1 else 'images'}",
        )
    multiframe = len(source_datasets) == 1 and frames[0] > 1
    needed = _REQUIRED if multiframe else _REQUIRED + _GEOMETRY
    for k, ds in enumerate(source_datasets):
        missing = [key for key in needed if getattr(ds, key, None) in (None, "")]
        if missing:
            raise DataError(
                getattr(ds, "filename", None) or where,
                f"source image {k} lacks {', '.join(missing)} (needed for a DICOM-SEG)",
            )
        if (int(ds.Rows), int(ds.Columns)) != labels.shape[1:]:
            raise DataError(
                where,
                f"labels are {labels.shape[1]}×{labels.shape[2]} px but source image {k} is "
                f"{ds.Rows}×{ds.Columns} (rows × columns)",
            )
    if len({str(ds.SeriesInstanceUID) for ds in source_datasets}) > 1:
        raise DataError(where, "source images belong to more than one series")
    if len({str(ds.SOPInstanceUID) for ds in source_datasets}) < len(source_datasets):
        raise DataError(where, "source images repeat a SOP Instance UID")


def dicom_seg(labels: np.ndarray, source_datasets: Sequence, provenance: dict):
    """A highdicom `Segmentation` (BINARY; segments 1 healthy lung, 2 GGO, 3 consolidation) of
    the source images; `labels[k]` is the label map of `source_datasets[k]` (of frame k of a
    single multi-frame image) pixel for pixel. Empty segments are kept (they have no frames);
    an all-background label volume keeps all frames, empty."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    labels = np.asarray(labels)
    check_source(labels, source_datasets, provenance.get("input"))
    labels, _ = _as_volume(labels, None)
    model = provenance.get("model") or {}
    seg = hd.seg.Segmentation(
        source_images=[_metadata_copy(ds) for ds in source_datasets],
        pixel_array=labels.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(provenance),
        series_instance_uid=generate_uid(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=ALGORITHM_NAME,
        manufacturer_model_name=str(model.get("class") or "unknown")[:64],
        software_versions=stitchnet_tf.__version__,
        device_serial_number=str(model.get("sha256") or "unknown")[:16],
        content_description="COVID-19 lung lesions: healthy lung, GGO, consolidation",
        content_label="LUNGLESIONS",
        omit_empty_frames=bool(labels.any()),  # an all-empty SEG keeps every frame
    )
    seg.SeriesDescription = f"{ALGORITHM_NAME} lung lesion segmentation"
    return seg


def write_dicom_seg(
    path: str | os.PathLike,
    labels: np.ndarray,
    source_datasets: Sequence,
    provenance: dict,
) -> Path:
    """Write `dicom_seg(labels, source_datasets, provenance)` to `path` (atomically: a
    temporary beside it, then a rename); returns `path`. A `DataError` names a mismatch between
    the labels and the source series, or what the source images lack."""
    seg = dicom_seg(labels, source_datasets, provenance)
    path = Path(path)
    check_parents(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{temp_prefix(path.name)}.dcm")
    try:
        seg.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
