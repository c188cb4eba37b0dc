"""The 3-D cases the slices of a dataset form, and their voxel spacing (`volume_metrics`).

- A slice of a volume (NIfTI, DICOM) belongs to the case of its volume file, at its slice
  index; with ``by="patient"`` to the case of its patient (all the patient's volumes).
- A 2-D slice file belongs to the case of its patient (the dataset's `patients.csv`, manifest
  or `--patient-pattern`), in the dataset's file order: a stack whose slice spacing is unknown.
  A 2-D slice without a patient id is in no case (it is scored per image only).

The voxel spacing of a volume is (slice, row, column) in millimetres, in the orientation
`io.read_image` gives its slices: from the NIfTI affine (the lengths of its columns; units from
the header, unknown units taken as mm), or from the DICOM header (PixelSpacing, and the median
gap between slice positions, else SpacingBetweenSlices, else SliceThickness). None when unknown.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stitchnet_tf.data import io
from stitchnet_tf.data.datasets import Dataset

CASE_KINDS = ("volume", "patient")
_NIFTI_UNITS = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


def _valid(spacing) -> tuple[float, float, float] | None:
    if spacing is None or any(s is None for s in spacing):
        return None
    out = tuple(float(s) for s in spacing)
    return out if all(math.isfinite(s) and s > 0 for s in out) else None


def _nifti_spacing(path: Path) -> tuple[float, float, float] | None:
    import nibabel as nib

    from stitchnet_tf.data.volumes import volume_spacing

    img = nib.load(str(path))
    units = getattr(img.header, "get_xyzt_units", lambda: ("unknown",))()[0]
    scale = _NIFTI_UNITS.get(units, 1.0)
    # io reads the canonical slices of `volumes`: its spacing is per axis of what io reads
    return _valid(tuple(s * scale for s in volume_spacing(path)))


def _dicom_item(ds, name: str):
    """A header value at the top level, else in the shared functional groups' pixel measures
    (enhanced multi-frame DICOM)."""
    value = getattr(ds, name, None)
    if value not in (None, ""):
        return value
    try:
        return getattr(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0], name, None)
    except (AttributeError, IndexError):
        return None


def _dicom_position(ds) -> float | None:
    pos, ori = (
        getattr(ds, "ImagePositionPatient", None),
        getattr(ds, "ImageOrientationPatient", None),
    )
    if pos is None or ori is None:
        return None
    normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
    return float(np.dot(normal, np.asarray(pos, float)))


def _dicom_spacing(path: Path) -> tuple[float, float, float] | None:
    import pydicom

    files = io.dicom_series_files(path) if path.is_dir() else (str(path),)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    pixel = _dicom_item(first, "PixelSpacing")
    if pixel is None or len(pixel) != 2:
        return None
    slice_gap = None
    if len(files) > 1:
        positions = [_dicom_position(pydicom.dcmread(f, stop_before_pixels=True)) for f in files]
        if None not in positions:
            gaps = np.abs(np.diff(sorted(positions)))
            slice_gap = float(np.median(gaps)) if gaps.size else None
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        if slice_gap:
            break
        value = _dicom_item(first, name)
        slice_gap = float(value) if value not in (None, "") else None
    return _valid((slice_gap, float(pixel[0]), float(pixel[1])))


def voxel_spacing(path: str | os.PathLike) -> tuple[float, float, float] | None:
    """(slice, row, column) voxel size in mm of a volume file or DICOM series folder, in the
    orientation `io.read_image` gives its slices; None when unknown (a 2-D slice file, or a
    header without it)."""
    p = Path(path)
    kind = io.kind_of(p)
    try:
        if kind == "nifti":
            return _nifti_spacing(p)
        if kind in ("dicom", "dicom-series"):
            return _dicom_spacing(p)
    except Exception:  # a header the slices were read without: the spacing is just unknown
        return None
    return None


@dataclass(frozen=True)
class CaseSlice:
    """Where a sample goes: its case, the block (one volume file, or one patient's stack of
    2-D slices) and its position in the block (the slice index in a volume, the order in a
    stack)."""

    case: str
    block: str
    position: int


@dataclass
class CasePlan:
    """The cases of a dataset's samples (`plan_cases`).

    Attributes:
        by: ``volume`` or ``patient``.
        slices: sample id -> its `CaseSlice` (samples in no case are absent).
        kinds: case -> ``volume`` (one volume file) or ``patient``, in the dataset's order.
        counts: case -> its number of samples.
        spacing: block -> (slice, row, column) mm, or None when unknown.
        volume_blocks: the blocks that are volume files (positions are slice indices; slices
            of the volume between them that are not in the dataset are not scored).
        without_case: samples in no case (2-D slices without a patient id).
    """

    by: str
    slices: dict[str, CaseSlice] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    spacing: dict[str, tuple[float, float, float] | None] = field(default_factory=dict)
    volume_blocks: set[str] = field(default_factory=set)
    without_case: int = 0

    def describe(self) -> str:
        """What the cases are, for the report (one paragraph)."""
        if not self.kinds:
            if self.without_case:
                return (
                    "No per-volume metrics: the slices are 2-D files without patient ids, so "
                    "they form no volume (each is scored in the per-image table)."
                )
            return "No per-volume metrics: no slices."
        volumes = [b for b in self.spacing if b in self.volume_blocks]
        stacks = len(self.spacing) - len(volumes)
        unknown = sum(self.spacing[b] is None for b in volumes)
        n = len(self.kinds)
        parts = []
        if self.by == "volume":
            what = f"{n} cases: "
            if volumes:
                what += f"{len(volumes)} volume files (NIfTI / DICOM), slices in slice order"
            if stacks:
                what += "; " if volumes else ""
                what += f"{stacks} patients' stacks of 2-D slice files"
        else:
            what = f"{n} cases: patients (all of a patient's volumes and 2-D slice files)"
        parts.append(what + ".")
        if volumes:
            parts.append(
                "HD95 of a volume is in mm from its voxel spacing (NIfTI affine, DICOM header)"
                + (
                    f", except {unknown} volumes without a known spacing (pixels)"
                    if unknown
                    else ""
                )
                + "."
            )
        if stacks:
            parts.append(
                "A patient's 2-D slices are stacked in file order with unknown slice spacing: "
                "their HD95 is in pixels, one pixel between slices (not a physical distance)."
            )
        if self.without_case:
            parts.append(f"{self.without_case} slices without a patient id are in no case.")
        return " ".join(parts)


def plan_cases(dataset: Dataset, by: str = "volume") -> CasePlan:
    """The cases of `dataset`'s samples (see the module docstring); ``by="patient"`` groups a
    patient's volumes into one case too."""
    if by not in CASE_KINDS:
        raise ValueError(f"unknown case grouping {by!r}: use one of {', '.join(CASE_KINDS)}")
    plan = CasePlan(by)
    stack_len: dict[str, int] = {}
    for s in dataset.samples:
        if s.slice is not None:
            block = str(s.image)
            case = s.id.rpartition("#")[0] if by == "volume" else str(s.patient)
            kind, position = by, int(s.slice)
            if block not in plan.spacing:
                plan.spacing[block] = voxel_spacing(block)
                plan.volume_blocks.add(block)
        elif s.patient:
            case, block, kind = str(s.patient), f"patient {s.patient}", "patient"
            position = stack_len.get(block, 0)
            stack_len[block] = position + 1
            plan.spacing.setdefault(block, None)
        else:
            plan.without_case += 1
            continue
        plan.slices[s.id] = CaseSlice(case, block, position)
        plan.kinds.setdefault(case, kind)
        plan.counts[case] = plan.counts.get(case, 0) + 1
    return plan
