"""Volume geometry: every CT volume read once, whole, in one canonical axial orientation.

A `Volume` is a NIfTI file or a DICOM series (one file, or a folder searched recursively) read
once and presented as axial slices in one **canonical display orientation**:

    data[k, r, c]   k: inferior -> superior,  r (rows): anterior -> posterior,
                    c (columns): patient right -> patient left

the layout of a standard axial DICOM pixel array (ImageOrientationPatient 1\\0\\0\\0\\1\\0): the
radiological view, the patient's right on the viewer's left and anterior at the top. In
nibabel's terms the voxel array is reoriented to axis codes ("L", "P", "S") (`io_orientation`,
`ornt_transform`, `apply_orientation`) and transposed to (S, P, L) order. Reorienting only
permutes and flips axes, it never resamples: an oblique acquisition is shown in its closest
canonical orientation. A volume of one slice whose slice axis is not S-I (one coronal image, a
2-D NIfTI labelled coronal) stays as stored (rows = j, columns = i), so that it remains one slice.

`Volume.affine` is the input's own affine, voxel (i, j, k) -> RAS+ mm (nibabel's convention: x
to the patient's right, y anterior, z superior; DICOM's LPS x and y negated). For a DICOM series
the voxel grid is (column, row, slice) with the slices sorted by position along the slice
normal, and the affine is built from ImagePositionPatient, ImageOrientationPatient and
PixelSpacing. `write_label_volume` undoes the reorientation, so a label map comes back in the
input's voxel order with the input's affine and overlays the CT in any viewer.

Values: Hounsfield units as float32 for CT (DICOM RescaleSlope/Intercept and NIfTI scl_slope/
scl_inter applied), the stored values for uint8 data (8-bit images and label maps). Windowing
to [0, 1] is `io.Window` / `io.to_unit_range`'s job.

DICOM folders are searched recursively (patient/study/series layouts; DICOMDIR, hidden files
and files that are neither DICOM by their magic bytes nor named `.dcm` / `.dicom` are ignored)
and the files grouped by SeriesInstanceUID. `series=UID` picks a series; the default is the
largest axial CT series (`choose_series`). A multi-frame DICOM file keeps its stored frame order;
its geometry comes from the per-frame functional groups (PlanePositionSequence,
PlaneOrientationSequence, PixelMeasuresSequence) when present, else from the top-level
attributes, else it is taken as axial with the PixelSpacing and SliceThickness found (1 mm where
none is).

Every failure is a `DataError` naming the file and the problem.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stitchnet_tf.errors import DataError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: file names never read as images, in any folder
IGNORED_NAMES = ("DICOMDIR", "Thumbs.db")
#: the description written into label NIfTI headers (the header field holds 80 bytes)
LABEL_DESCRIPTION = "stitchnet-tf label map: 0 background 1 healthy 2 GGO 3 consolidation"
#: LPS + RAS: DICOM's patient coordinates to nibabel's
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: nibabel orientation of the canonical array before its transpose: i -> L, j -> P, k -> S
CANONICAL_AXCODES = ("L", "P", "S")
_IDENTITY_ORNT = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])


# --------------------------------------------------------------------------- orientation


def _canonical_ornt() -> np.ndarray:
    from nibabel.orientations import axcodes2ornt

    return axcodes2ornt(CANONICAL_AXCODES)


def canonical_transform(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """nibabel orientation transform [3, 2] taking a voxel array with `affine` and `shape` to
    the canonical (L, P, S) axis order (identity for a single non-axial slice or an affine whose
    axes cannot be told)."""
    from nibabel.orientations import io_orientation, ornt_transform

    ornt = io_orientation(np.asarray(affine, float))
    if np.isnan(ornt).any():
        return _IDENTITY_ORNT.copy()
    if shape[2] == 1 and int(ornt[2, 0]) != 2:  # one slice, not axial: keep it one slice
        return _IDENTITY_ORNT.copy()
    return ornt_transform(ornt, _canonical_ornt())


def _invert(transform: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes `transform`."""
    inverse = np.empty_like(transform)
    for axis, (new_axis, flip) in enumerate(transform):
        inverse[int(new_axis)] = [axis, flip]
    return inverse


def _transformed_shape(shape: tuple[int, ...], transform: np.ndarray) -> tuple[int, int, int]:
    out = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(transform):
        out[int(new_axis)] = int(shape[axis])
    return tuple(out)


def canonical_shape(affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """[K, H, W] of the canonical array of a voxel array of `shape` with `affine`."""
    lps = _transformed_shape(shape, canonical_transform(affine, shape))
    return lps[2], lps[1], lps[0]


def _reorient(arr: np.ndarray, transform: np.ndarray) -> np.ndarray:
    from nibabel.orientations import apply_orientation

    return apply_orientation(arr, transform)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Length (mm) of each voxel axis of `affine`."""
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


# --------------------------------------------------------------------------- the volume


@dataclass(frozen=True)
class Series:
    """One DICOM series found in a folder (headers only).

    `files` are sorted by position along the slice normal (by InstanceNumber where there is no
    ImagePositionPatient); `positions` are their ImagePositionPatient (LPS mm) or None;
    `pixel_spacing` is (row spacing, column spacing) mm as DICOM stores it.
    """

    uid: str
    description: str
    modality: str
    files: tuple[str, ...]
    rows: int
    columns: int
    orientation: tuple[float, ...] | None = None
    positions: tuple[tuple[float, float, float], ...] | None = None
    pixel_spacing: tuple[float, float] | None = None
    thickness: float | None = None
    #: the files' datasets without pixel data, in `files` order (DICOM-SEG sources)
    headers: tuple = field(default=(), compare=False, repr=False)

    @property
    def slices(self) -> int:
        return len(self.files)

    @property
    def axialness(self) -> float:
        """|cos| of the angle between the slice normal and the S-I axis (1 = axial)."""
        if self.orientation is None:
            return 1.0
        normal = np.cross(self.orientation[:3], self.orientation[3:])
        norm = float(np.linalg.norm(normal))
        return abs(float(normal[2])) / norm if norm else 0.0

    def describe(self) -> str:
        text = f"{self.uid}"
        if self.description:
            text += f" {self.description!r}"
        return f"{text} ({self.slices} slices, {self.modality or 'no modality'})"

    def affine(self) -> np.ndarray:
        """Voxel (column, row, slice) -> RAS mm of the series' files in `files` order."""
        positions = None if self.positions is None else np.asarray(self.positions, float)
        return dicom_affine(self.orientation, self.pixel_spacing, positions, self.thickness)


@dataclass(frozen=True, eq=False)
class Volume:
    """A whole volume in canonical orientation (see the module docstring).

    Attributes:
        data: [K, H, W] canonical axial slices: float32 Hounsfield units, or the stored uint8
            values. Read-only (volumes are shared by the read cache).
        affine: 4x4 voxel -> RAS mm of the input's own voxel grid (for DICOM: (column, row,
            slice) with slices sorted along the normal).
        spacing: (slice, row, column) spacing in mm of `data`.
        kind: "nifti", "dicom" (one file) or "dicom-series" (a folder).
        path: the file or folder read.
        source_shape: the input's voxel shape as stored (2-D, 3-D, or 4-D with one frame).
        transform: nibabel orientation transform from the input's (i, j, k) axes to the
            canonical (L, P, S) axes; `data` is that array transposed to (S, P, L).
        header: a copy of the input's NIfTI header (NIfTI input only).
        series: the DICOM series read (a folder); `series_found`: every series found there.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    kind: str
    path: str
    source_shape: tuple[int, ...]
    transform: np.ndarray
    header: Any = None
    series: Series | None = None
    series_found: tuple[Series, ...] = field(default=())

    @property
    def slices(self) -> int:
        return int(self.data.shape[0])

    @property
    def shape3(self) -> tuple[int, int, int]:
        """The input's (i, j, k) voxel shape (a 2-D input has k = 1)."""
        return _shape3(self.source_shape)

    @property
    def canonical_affine(self) -> np.ndarray:
        """Voxel (column, row, slice) of `data` -> RAS mm: `data[k, r, c]` is voxel (c, r, k)."""
        from nibabel.orientations import inv_ornt_aff

        return self.affine @ inv_ornt_aff(self.transform, self.shape3)

    def slice(self, k: int) -> np.ndarray:
        """Canonical slice k [H, W] (read-only view); out of range is a DataError."""
        if not 0 <= k < self.slices:
            where = {
                "nifti": f"volume has {self.slices} slices",
                "dicom-series": f"series has {self.slices} slices",
            }.get(self.kind, f"DICOM has {self.slices} frames")
            if self.kind == "dicom" and self.slices == 1:
                where = "single-frame DICOM"
            raise DataError(self.path, f"slice {k} out of range ({where})")
        return self.data[k]

    def to_source(self, canonical: np.ndarray) -> np.ndarray:
        """An array [K, H, W] in canonical orientation -> the input's voxel order and shape."""
        canonical = np.asarray(canonical)
        if canonical.shape[:3] != self.data.shape:
            raise RuntimeError(
                f"internal error: array {canonical.shape} does not match the volume's "
                f"canonical shape {self.data.shape}"
            )
        lps = np.transpose(canonical, (2, 1, 0))
        source = _reorient(lps, _invert(self.transform))
        return np.ascontiguousarray(source).reshape(self.source_shape)

    def to_stored_slices(self, canonical: np.ndarray) -> np.ndarray:
        """An array [K, H, W] in canonical orientation -> [N, rows, columns] slice by slice as
        the input stores them: for DICOM, `stored[n]` lines up pixel for pixel with the pixel
        array of `files[n]` (frame n of a multi-frame file); for NIfTI, `stored[n]` is
        `dataobj[:, :, n].T`."""
        return np.transpose(self.to_source(canonical).reshape(self.shape3), (2, 1, 0))

    @property
    def files(self) -> tuple[str, ...]:
        """The files read: a DICOM series' files in slice order, else the one file."""
        return self.series.files if self.series is not None else (self.path,)

    def series_choice(self) -> str | None:
        """One line naming the series read and every series found, when there were several."""
        if self.series is None or len(self.series_found) < 2:
            return None
        others = "; ".join(s.describe() for s in self.series_found if s.uid != self.series.uid)
        return (
            f"{self.path}: {len(self.series_found)} DICOM series found; reading "
            f"{self.series.describe()} (--series UID picks another); others: {others}"
        )


def _shape3(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 2:
        return (int(shape[0]), int(shape[1]), 1)
    return tuple(int(n) for n in shape[:3])


def _make_volume(
    source: np.ndarray,
    affine: np.ndarray,
    kind: str,
    path: Path,
    source_shape: tuple[int, ...],
    **extra,
) -> Volume:
    """The canonical volume of a voxel array `source` [i, j, k] with `affine`."""
    shape3 = _shape3(source_shape)
    transform = canonical_transform(affine, shape3)
    lps = _reorient(source.reshape(shape3), transform)
    data = np.ascontiguousarray(np.transpose(lps, (2, 1, 0)))
    data.setflags(write=False)
    from nibabel.orientations import inv_ornt_aff

    sizes = voxel_sizes(affine @ inv_ornt_aff(transform, shape3))
    spacing = (float(sizes[2]), float(sizes[1]), float(sizes[0]))
    return Volume(
        data=data,
        affine=np.asarray(affine, float),
        spacing=spacing,
        kind=kind,
        path=str(path),
        source_shape=tuple(int(n) for n in source_shape),
        transform=transform,
        **extra,
    )


# --------------------------------------------------------------------------- NIfTI


def suffix_of(path: str | os.PathLike) -> str:
    """Lower-case suffix, `.nii.gz` counted as one."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def load_nifti(path: str | os.PathLike):
    """The nibabel image of a NIfTI file (header only; data stays on disk) and its voxel shape
    (2-D, 3-D, or 4-D with one frame; anything else is a DataError)."""
    import nibabel as nib

    p = Path(path)
    try:
        img = nib.load(str(p))
    except FileNotFoundError:
        raise DataError(p, "file not found") from None
    except Exception as e:  # nibabel raises several types for bad headers
        raise DataError(p, f"unreadable NIfTI file ({type(e).__name__}: {e})") from None
    shape = tuple(int(n) for n in img.shape)
    if not (len(shape) in (2, 3) or (len(shape) == 4 and shape[3] == 1)):
        raise DataError(p, f"expected a 3-D volume, got shape {img.shape}")
    return img, shape


def _nifti_values(img, path: Path, slicer: tuple | None = None) -> np.ndarray:
    """The voxel array (or `dataobj[slicer]`): uint8 as stored when unscaled, else float32
    with scl_slope / scl_inter applied."""
    proxy = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    dtype = np.uint8 if img.get_data_dtype() == np.uint8 and (slope, inter) == (1, 0) else None
    try:
        if slicer is None:
            return np.asarray(proxy, dtype=dtype or np.float32)
        return np.asarray(proxy[slicer]).astype(dtype or np.float32, copy=False)
    except Exception as e:
        raise DataError(path, f"corrupt or truncated NIfTI data ({e})") from None


def _nifti_slice(path: Path, k: int) -> np.ndarray:
    """Canonical slice k of a NIfTI file, reading only the voxels of that slice (for
    uncompressed files, which can seek to them)."""
    img, shape = load_nifti(path)
    shape3 = _shape3(shape)
    transform = canonical_transform(img.affine, shape3)
    n = _transformed_shape(shape3, transform)[2]
    if not 0 <= k < n:
        raise DataError(path, f"slice {k} out of range (volume has {n} slices)")
    if len(shape) == 2:
        values = _nifti_values(img, path).reshape(shape3)
    else:
        axis = int(np.flatnonzero(transform[:, 0] == 2)[0])
        index = k if transform[axis, 1] > 0 else shape3[axis] - 1 - k
        slicer = [slice(None)] * 3
        slicer[axis] = slice(index, index + 1)
        values = _nifti_values(img, path, tuple(slicer) + ((0,) if len(shape) == 4 else ()))
    lps = _reorient(values, transform)  # [W, H, 1]
    return np.ascontiguousarray(lps[:, :, 0].T)


def _read_nifti(path: Path) -> Volume:
    img, shape = load_nifti(path)
    values = _nifti_values(img, path)
    return _make_volume(values, img.affine, "nifti", path, shape, header=img.header.copy())


# --------------------------------------------------------------------------- DICOM


def has_dicom_magic(path: Path) -> bool:
    """Whether the file carries the DICOM preamble magic `DICM` at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_dicom(path: Path, pixels: bool = True):
    """A pydicom dataset (`pixels=False`: header only); a DataError for anything unreadable."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=not pixels, force=False)
    except InvalidDicomError:
        raise DataError(path, "unreadable DICOM (not a DICOM file)") from None
    except Exception as e:
        raise DataError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from None
    return ds


def dicom_hu(ds, path: Path) -> np.ndarray:
    """Pixel data with RescaleSlope / RescaleIntercept applied, float32 ([R, C] or frames
    [F, R, C])."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as e:
        raise DataError(path, f"DICOM pixel data cannot be decoded ({e})") from None
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return arr.astype(np.float32) * slope + intercept


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _first(ds, *path_and_name):
    """`ds.A[0].B[0]...name`, or None when any step is missing."""
    *seqs, name = path_and_name
    node = ds
    for seq in seqs:
        items = getattr(node, seq, None)
        if not items:
            return None
        node = items[0]
    return getattr(node, name, None)


def dicom_affine(
    orientation, pixel_spacing, positions: np.ndarray | None, thickness: float | None
) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm of DICOM slices at `positions` [N, 3] (LPS, in
    slice order), by the DICOM equation P = S + X·Δc·c + Y·Δr·r, the slice step the mean step
    between the first and last positions (the normal times `thickness` for one slice)."""
    iop = np.asarray(orientation if orientation is not None else (1, 0, 0, 0, 1, 0), float)
    along_row, along_column = iop[:3], iop[3:]  # directions of increasing column, row index
    dr, dc = pixel_spacing if pixel_spacing is not None else (1.0, 1.0)
    normal = np.cross(along_row, along_column)
    step = normal * float(thickness or 1.0)
    origin = np.zeros(3)
    if positions is not None and len(positions):
        origin = positions[0]
        if len(positions) > 1:
            mean_step = (positions[-1] - positions[0]) / (len(positions) - 1)
            if np.linalg.norm(mean_step) > 1e-6:
                step = mean_step
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = along_row * dc, along_column * dr, step, origin
    return LPS_TO_RAS @ lps


def _thickness(ds) -> float | None:
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        value = _floats([getattr(ds, name, None)], 1)
        if value is not None and value[0] > 0:
            return value[0]
    return None


def _multiframe_geometry(ds, frames: int):
    """(orientation, pixel spacing, positions [F, 3] or None, thickness) of a multi-frame file:
    per-frame and shared functional groups first, then top-level attributes."""
    groups = ("SharedFunctionalGroupsSequence",)
    orientation = _floats(
        _first(ds, *groups, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
    ) or _floats(getattr(ds, "ImageOrientationPatient", None), 6)
    spacing = _floats(_first(ds, *groups, "PixelMeasuresSequence", "PixelSpacing"), 2) or _floats(
        getattr(ds, "PixelSpacing", None), 2
    )
    measures = _first(ds, *groups, "PixelMeasuresSequence", "SliceThickness")
    thickness = _floats([measures], 1)
    thickness = thickness[0] if thickness else _thickness(ds)
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None) or []
    positions = []
    for item in per_frame[:frames]:
        if orientation is None:
            orientation = _floats(
                _first(item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
            )
        if spacing is None:
            spacing = _floats(_first(item, "PixelMeasuresSequence", "PixelSpacing"), 2)
        pos = _floats(_first(item, "PlanePositionSequence", "ImagePositionPatient"), 3)
        if pos is None:
            break
        positions.append(pos)
    positions = np.asarray(positions, float) if len(positions) == frames else None
    if positions is None and frames == 1:
        pos = _floats(getattr(ds, "ImagePositionPatient", None), 3)
        positions = None if pos is None else np.asarray([pos], float)
    return orientation, spacing, positions, thickness


def _read_dicom_file(path: Path) -> Volume:
    ds = read_dicom(path)
    hu = dicom_hu(ds, path)
    frames = hu if hu.ndim == 3 else hu[None]
    orientation, spacing, positions, thickness = _multiframe_geometry(ds, len(frames))
    affine = dicom_affine(orientation, spacing, positions, thickness)
    source = np.transpose(frames, (2, 1, 0))  # (column, row, frame)
    return _make_volume(source, affine, "dicom", path, source.shape)


def _is_candidate(path: Path) -> bool:
    return not path.name.startswith(".") and path.name not in IGNORED_NAMES


def dicom_files(folder: Path) -> list[Path]:
    """Every DICOM file under `folder`, recursively (by magic bytes or a .dcm/.dicom suffix;
    hidden entries, DICOMDIR and other files are passed over), sorted by path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(root) / name
            if _is_candidate(p) and (suffix_of(p) in DICOM_SUFFIXES or has_dicom_magic(p)):
                found.append(p)
    return found


def _tree_stamp(folder: Path) -> tuple:
    """Modification times of `folder` and every folder under it (a changed file list changes
    one of them)."""
    try:
        stamps = [folder.stat().st_mtime_ns]
    except OSError:
        raise DataError(folder, "DICOM folder not found") from None
    for root, dirs, _ in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in dirs:
            try:
                stamps.append((Path(root) / d).stat().st_mtime_ns)
            except OSError:
                pass
    return tuple(stamps)


def find_series(folder: str | os.PathLike) -> tuple[Series, ...]:
    """The image series under `folder` (headers only), largest first; cached until a folder in
    the tree changes. No DICOM image at all is a DataError."""
    p = Path(folder)
    return _find_series(str(p), _tree_stamp(p))


_SERIES_CACHE: OrderedDict = OrderedDict()
_SERIES_LOCK = threading.Lock()


def _find_series(folder: str, stamp: tuple) -> tuple[Series, ...]:
    key = (folder, stamp)
    with _SERIES_LOCK:
        if key in _SERIES_CACHE:
            _SERIES_CACHE.move_to_end(key)
            return _SERIES_CACHE[key]
    found = _scan_series(Path(folder))
    with _SERIES_LOCK:
        _SERIES_CACHE[key] = found
        while len(_SERIES_CACHE) > 16:
            _SERIES_CACHE.popitem(last=False)
    return found


def _scan_series(p: Path) -> tuple[Series, ...]:
    files = dicom_files(p)
    if not files:
        raise DataError(p, "empty DICOM folder: no DICOM files found (sub-folders searched)")
    groups: dict[str, list] = {}
    for f in files:
        ds = read_dicom(f, pixels=False)
        if getattr(ds, "Rows", None) is None:
            continue  # not an image (a report, a structure set)
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "unknown")
        groups.setdefault(uid, []).append((f, ds))
    if not groups:
        raise DataError(p, "no DICOM images found (only non-image DICOM objects)")
    out = [_series_of(uid, members) for uid, members in groups.items()]
    return tuple(sorted(out, key=lambda s: (-s.slices, s.uid)))


def _series_of(uid: str, members: list) -> Series:
    first = members[0][1]
    orientation = _floats(getattr(first, "ImageOrientationPatient", None), 6)
    keyed = []
    for f, ds in members:
        pos = _floats(getattr(ds, "ImagePositionPatient", None), 3)
        number = int(getattr(ds, "InstanceNumber", 0) or 0)
        if pos is not None and orientation is not None:
            along = float(np.dot(np.cross(orientation[:3], orientation[3:]), pos))
        elif pos is not None:
            along = pos[2]
        else:
            along = float(number)
        keyed.append((along, number, str(f), pos, ds))
    keyed.sort(key=lambda t: t[:3])
    positions = tuple(t[3] for t in keyed)
    return Series(
        uid=uid,
        description=str(getattr(first, "SeriesDescription", "") or ""),
        modality=str(getattr(first, "Modality", "") or ""),
        files=tuple(t[2] for t in keyed),
        rows=int(first.Rows),
        columns=int(getattr(first, "Columns", 0) or 0),
        orientation=orientation,
        positions=None if any(q is None for q in positions) else positions,
        pixel_spacing=_floats(getattr(first, "PixelSpacing", None), 2),
        thickness=_thickness(first),
        headers=tuple(t[4] for t in keyed),
    )


#: a series counts as axial when its slice normal is within ~37 degrees of S-I
AXIAL_COSINE = 0.8


def choose_series(found: tuple[Series, ...], folder, series: str | None = None) -> Series:
    """`series` (a SeriesInstanceUID) if given, else the largest axial CT series: CT first,
    then axial (`AXIAL_COSINE`), then most slices, then closest to axial. An unknown UID is a
    DataError listing the series there are."""
    if series is not None:
        for s in found:
            if s.uid == str(series).strip():
                return s
        listed = "; ".join(s.describe() for s in found)
        raise DataError(folder, f"no DICOM series {series}; found {len(found)}: {listed}")
    return max(
        found,
        key=lambda s: (
            s.modality.upper() == "CT",
            s.axialness >= AXIAL_COSINE,
            s.slices,
            s.axialness,
            s.uid,
        ),
    )


def _check_spacing(series: Series, folder: Path) -> None:
    if series.positions is None or series.slices < 3 or series.orientation is None:
        return
    normal = np.cross(series.orientation[:3], series.orientation[3:])
    along = np.asarray(series.positions, float) @ normal
    steps = np.diff(along)
    if steps.size and np.abs(steps - steps.mean()).max() > 0.1 * max(abs(steps.mean()), 1e-6):
        log.warning(
            "%s: uneven slice spacing in series %s (%.3g to %.3g mm): missing slices? The "
            "affine uses the mean step",
            folder,
            series.uid,
            steps.min(),
            steps.max(),
        )


def _read_series(folder: Path, series: str | None) -> Volume:
    found = find_series(folder)
    chosen = choose_series(found, folder, series)
    _check_spacing(chosen, folder)
    slices = []
    for f in chosen.files:
        fp = Path(f)
        hu = dicom_hu(read_dicom(fp), fp)
        hu = hu[0] if hu.ndim == 3 else hu
        if hu.shape != (chosen.rows, chosen.columns):
            raise DataError(
                fp,
                f"slice is {hu.shape[0]}x{hu.shape[1]} but series {chosen.uid} is "
                f"{chosen.rows}x{chosen.columns}",
            )
        slices.append(hu)
    source = np.transpose(np.stack(slices), (2, 1, 0))  # (column, row, slice)
    volume = _make_volume(
        source,
        chosen.affine(),
        "dicom-series",
        folder,
        source.shape,
        series=chosen,
        series_found=found,
    )
    message = volume.series_choice()
    if message:
        log.info(message)
    return volume


# --------------------------------------------------------------------------- public


def read_volume(path: str | os.PathLike, series: str | None = None) -> Volume:
    """Read a NIfTI file, a DICOM file or a DICOM folder (searched recursively) once, whole.

    `series` picks a SeriesInstanceUID in a DICOM folder (default: `choose_series`).
    """
    p = Path(path)
    if p.is_dir():
        return _read_series(p, series)
    if not p.exists():
        raise DataError(p, "file not found")
    if suffix_of(p) in NIFTI_SUFFIXES:
        return _read_nifti(p)
    return _read_dicom_file(p)


def header_geometry(
    path: str | os.PathLike, series: str | None = None
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The input's affine and (i, j, k) voxel shape from its headers alone (no pixel data)."""
    p = Path(path)
    if p.is_dir():
        chosen = choose_series(find_series(p), p, series)
        return chosen.affine(), (chosen.columns, chosen.rows, chosen.slices)
    if suffix_of(p) in NIFTI_SUFFIXES:
        img, shape = load_nifti(p)
        return np.asarray(img.affine, float), _shape3(shape)
    if not p.exists():
        raise DataError(p, "file not found")
    ds = read_dicom(p, pixels=False)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    orientation, spacing, positions, thickness = _multiframe_geometry(ds, frames)
    affine = dicom_affine(orientation, spacing, positions, thickness)
    rows, columns = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    return affine, (columns, rows, frames)


def volume_shape(path: str | os.PathLike, series: str | None = None) -> tuple[int, int, int]:
    """The canonical [K, H, W] of a volume, from its headers alone."""
    return canonical_shape(*header_geometry(path, series))


def volume_spacing(
    path: str | os.PathLike, series: str | None = None
) -> tuple[float, float, float]:
    """The (slice, row, column) voxel size of a volume's canonical array, in the affine's units
    (mm, bar NIfTI headers in other units), from its headers alone."""
    from nibabel.orientations import inv_ornt_aff

    affine, shape = header_geometry(path, series)
    sizes = voxel_sizes(affine @ inv_ornt_aff(canonical_transform(affine, shape), shape))
    return float(sizes[2]), float(sizes[1]), float(sizes[0])


#: whole volumes kept by `cached_volume`: the image, mask and lung mask of one sample
CACHE_SIZE = 3
_CACHE: OrderedDict = OrderedDict()
_CACHE_LOCK = threading.Lock()
_KEY_LOCKS: dict = {}


def _stamp(p: Path) -> tuple:
    if p.is_dir():
        return _tree_stamp(p)
    try:
        st = p.stat()
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_size)


def cached_volume(path: str | os.PathLike, series: str | None = None) -> Volume:
    """`read_volume` through a small cache of whole volumes (`CACHE_SIZE`, least recently used
    first out), keyed by path, modification time and size (for a folder: every folder's
    modification time), so that reading a volume slice by slice reads it once."""
    p = Path(path)
    key = (os.path.abspath(p), series, _stamp(p))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:  # one reader per volume; the others wait for its result
        with _CACHE_LOCK:
            if key in _CACHE:
                return _CACHE[key]
        try:
            volume = read_volume(p, series)
            with _CACHE_LOCK:
                _CACHE[key] = volume
                while len(_CACHE) > CACHE_SIZE:
                    _CACHE.popitem(last=False)
        finally:
            with _CACHE_LOCK:
                _KEY_LOCKS.pop(key, None)
    return volume


def _series_slice(folder: Path, k: int) -> np.ndarray | None:
    """Canonical slice k of a DICOM folder's series read from its one file, when the series is
    axial (its slices are the canonical slices); None otherwise."""
    chosen = choose_series(find_series(folder), folder)
    shape3 = (chosen.columns, chosen.rows, chosen.slices)
    transform = canonical_transform(chosen.affine(), shape3)
    if int(transform[2, 0]) != 2:
        return None
    if not 0 <= k < chosen.slices:
        raise DataError(folder, f"slice {k} out of range (series has {chosen.slices} slices)")
    f = Path(chosen.files[k if transform[2, 1] > 0 else chosen.slices - 1 - k])
    hu = dicom_hu(read_dicom(f), f)
    hu = hu[0] if hu.ndim == 3 else hu
    if hu.shape != (chosen.rows, chosen.columns):
        raise DataError(
            f,
            f"slice is {hu.shape[0]}x{hu.shape[1]} but series {chosen.uid} is "
            f"{chosen.rows}x{chosen.columns}",
        )
    lps = _reorient(hu.T[:, :, None], transform)  # [W, H, 1]
    return np.ascontiguousarray(lps[:, :, 0].T)


def read_slice(path: str | os.PathLike, k: int) -> np.ndarray:
    """Canonical slice k [H, W] of a volume (values as in `Volume.data`), read the cheapest
    way: from an uncompressed `.nii` only that slice's voxels, from an axial DICOM series only
    that slice's file (random access, as training does, then costs one slice); anything else
    (`.nii.gz`, a multi-frame DICOM file, a non-axial series) through `cached_volume`, one
    whole read for all its slices."""
    p, k = Path(path), int(k)
    if p.is_dir():
        out = _series_slice(p, k)
        if out is not None:
            return out
    elif suffix_of(p) == ".nii":
        return _nifti_slice(p, k)
    return cached_volume(p).slice(k)


def clear_cache() -> None:
    """Forget every cached volume and DICOM folder scan."""
    with _CACHE_LOCK:
        _CACHE.clear()
    with _SERIES_LOCK:
        _SERIES_CACHE.clear()


def write_label_volume(path: str | os.PathLike, labels: np.ndarray, volume: Volume) -> Path:
    """Write labels [K, H, W] uint8 in `volume`'s canonical orientation as a NIfTI label map in
    the input's own voxel order, shape and affine.

    NIfTI input: the input's header is kept (qform/sform and their codes, units, dim info) with
    datatype uint8, no scaling, intent "label" and a description saying what the values are.
    DICOM input: the series' affine as qform and sform (code 1, scanner), units mm.
    A shape or affine that does not come back as the input's is an internal error.
    """
    import nibabel as nib

    labels = np.asarray(labels)
    if labels.shape != volume.data.shape:
        raise RuntimeError(
            f"internal error: labels {labels.shape} do not match the volume {volume.data.shape}"
        )
    data = volume.to_source(labels.astype(np.uint8))
    from nibabel.orientations import inv_ornt_aff

    back = volume.canonical_affine @ inv_ornt_aff(_invert(volume.transform), labels.shape[::-1])
    if volume.header is not None:
        header = volume.header.copy()
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        if not isinstance(header, nib.Nifti1Header):
            header = None  # not a NIfTI header: start afresh
            klass = nib.Nifti1Image
    else:
        header, klass = None, nib.Nifti1Image
    img = klass(data, volume.affine, header=header)
    hdr = img.header
    if header is None:
        hdr.set_qform(volume.affine, code=1)
        hdr.set_sform(volume.affine, code=1)
        hdr.set_xyzt_units("mm", "sec")
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(1.0, 0.0)
    hdr.set_intent("label", (), name="stitchnet-tf")
    hdr["cal_min"], hdr["cal_max"] = 0, 3
    hdr["descrip"] = LABEL_DESCRIPTION.encode("ascii")
    if (
        img.shape != tuple(volume.source_shape)
        or not np.allclose(back, volume.affine, atol=1e-4)
        or not np.allclose(img.affine, volume.affine, atol=1e-4)
    ):
        raise RuntimeError(
            f"internal error: label volume {img.shape} / affine {img.affine.tolist()} does not "
            f"match the input {volume.source_shape} / {volume.affine.tolist()}"
        )
    out = Path(path)
    nib.save(img, str(out))
    return out
