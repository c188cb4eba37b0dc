"""Readers for CT slices, volumes and masks.

Slices: 8-bit PNG / JPEG / TIFF and NumPy `.npy`. Volumes: NIfTI (`.nii`, `.nii.gz`) and DICOM
(one file, or a folder searched recursively for its series). Every axial slice of a volume is a
sample, addressed by `(path, slice_index)`: slice k of the volume in the canonical orientation
of `volumes` (rows anterior -> posterior, columns patient right -> left, k inferior -> superior).
A volume is read whole, once, through `volumes.cached_volume`, however many of its slices are
read (`volumes.read_slice`: an uncompressed `.nii` or an axial DICOM series is read one slice
at a time instead, which costs no more).
Images come out as [H, W] float32 in [0, 1]: Hounsfield data through a CT window, 8-bit
data scaled by 1/255. Masks come out as the stored integer values [H, W]; a `MaskValueMap` says
what they mean.

Every failure is a `DataError` naming the file and the problem.
"""

from __future__ import annotations

import errno
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stitchnet_tf.data import volumes
from stitchnet_tf.data.intensity import LUNG_WINDOW_LEVEL, LUNG_WINDOW_WIDTH, window_hu
from stitchnet_tf.data.volumes import (
    DICOM_SUFFIXES,
    IGNORED_NAMES,
    NIFTI_SUFFIXES,
    has_dicom_magic,
    suffix_of,
)
from stitchnet_tf.errors import DataError

SLICE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")
MIN_SIDE = 32  # five stride-2 levels need at least 32 px


@dataclass(frozen=True)
class Window:
    """A CT window (level, width) in Hounsfield units; the default is the lung window."""

    level: float = LUNG_WINDOW_LEVEL
    width: float = LUNG_WINDOW_WIDTH

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        return window_hu(hu, self.level, self.width)


def stem_of(path: str | os.PathLike) -> str:
    """File name without its (possibly double) suffix; a folder's whole name."""
    if Path(path).is_dir():
        return Path(path).name
    name = Path(path).name
    suffix = suffix_of(path)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


def check_name(path: str | os.PathLike) -> None:
    """A file name that is not valid UTF-8 cannot be written to the CSV and JSON outputs that
    name each slice: refuse it up front."""
    try:
        Path(path).name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(path, "file name is not valid UTF-8 (rename the file)") from None


def why_missing(p: Path) -> str:
    """Why an entry that does not exist as a file or folder cannot be read."""
    if p.is_symlink():
        try:
            os.stat(p)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "symbolic link loop"
        return f"broken symbolic link (to {os.readlink(p)})"
    return "file not found"


def kind_of(path: str | os.PathLike) -> str:
    """`slice`, `nifti`, `dicom` (one file) or `dicom-series` (a folder, searched recursively
    for DICOM files); else a DataError."""
    p = Path(path)
    check_name(p)
    suffix = suffix_of(p)
    if p.is_dir():
        if suffix in SLICE_SUFFIXES or suffix in NIFTI_SUFFIXES:
            raise DataError(p, f"is a folder, not a {suffix} file")
        return "dicom-series"
    if not p.exists():
        raise DataError(p, why_missing(p))
    if suffix in SLICE_SUFFIXES:
        return "slice"
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in DICOM_SUFFIXES or has_dicom_magic(p):
        return "dicom"
    raise DataError(
        p,
        "not a supported image file (PNG, JPEG, TIFF, .npy, NIfTI .nii/.nii.gz, DICOM)",
    )


def is_image_candidate(path: Path) -> bool:
    """Whether a folder entry should be read as an image (hidden files are ignored)."""
    return not path.name.startswith(".") and path.name not in IGNORED_NAMES


# --------------------------------------------------------------------------- slices


#: Largest image read, in pixels (a CT slice is 512 × 512): a header claiming more is refused
#: before anything is decoded (a decompression bomb: a few bytes that expand to gigabytes).
MAX_PIXELS = 8192 * 8192


def _read_pil(path: Path) -> Image.Image:
    too_big = f"image larger than the limit of {MAX_PIXELS:,} pixels (8192 × 8192)"
    try:
        with warnings.catch_warnings():  # PIL's own bomb warning: our limit is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        if img.width * img.height > MAX_PIXELS:
            raise DataError(path, f"{img.width} × {img.height} {too_big}")
        img.load()  # decodes now: truncated or corrupt files raise here
        return img
    except Image.DecompressionBombError:
        raise DataError(path, too_big) from None
    except UnidentifiedImageError:
        raise DataError(path, "not a readable image (corrupt or unknown format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"corrupt or truncated image ({e})") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(path, f"corrupt or unreadable .npy file ({e})") from None
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(path, f"expected a 2-D slice, got an array of shape {arr.shape}")
    return arr


def to_unit_range(arr: np.ndarray, window: Window, path: Path | str = "image") -> np.ndarray:
    """Scale stored pixel values to [0, 1] float32.

    uint8 is divided by 255, uint16 by 65535, booleans become 0/1, floats already inside
    [0, 1] are kept; anything else (signed integers, other floats) is taken as Hounsfield units
    and windowed.
    """
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise DataError(path, "image contains NaN or infinite values")
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        return arr
    return window(arr)


def _pil_to_grey_array(img: Image.Image, path: Path) -> np.ndarray:
    if img.mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.array(img)
        if img.mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 255:
            arr = arr.astype(np.uint8)
        return arr
    if img.mode == "1":
        return np.array(img).astype(np.uint8) * 255
    rgb = np.array(img.convert("RGB"))
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return rgb[..., 0]
    return np.array(img.convert("L"))


def read_slice(path: str | os.PathLike, window: Window = Window()) -> np.ndarray:
    """A 2-D slice file -> [H, W] float32 in [0, 1]."""
    p = Path(path)
    if suffix_of(p) == ".npy":
        arr = _read_npy(p)
    else:
        arr = _pil_to_grey_array(_read_pil(p), p)
    return to_unit_range(arr, window, p)


# --------------------------------------------------------------------------- volumes


def _volume_unit(arr: np.ndarray, kind: str, window: Window, path) -> np.ndarray:
    """Values of a volume slice -> [0, 1]: DICOM Hounsfield units through `window`; NIfTI
    values by `to_unit_range` (uint8 by 1/255, floats already in [0, 1] kept, Hounsfield units
    windowed)."""
    if kind == "nifti":
        return to_unit_range(arr, window, path)
    return window(arr)


def volume_slice(volume: volumes.Volume, k: int, window: Window = Window()) -> np.ndarray:
    """Canonical slice k of a `volumes.Volume` -> [H, W] float32 in [0, 1], as `read_image`."""
    return _volume_unit(volume.slice(k), volume.kind, window, volume.path)


def dicom_series_files(folder: str | os.PathLike, series: str | None = None) -> tuple[str, ...]:
    """The files of the DICOM series that `folder` is read as, sorted by slice position.

    The folder is searched recursively and its files grouped by SeriesInstanceUID; `series`
    picks one, the default is the largest axial CT series (`volumes.choose_series`). Cached
    until a folder in the tree changes.
    """
    p = Path(folder)
    return volumes.choose_series(volumes.find_series(p), p, series).files


# --------------------------------------------------------------------------- public


def slice_count(path: str | os.PathLike) -> int | None:
    """Number of axial slices of a volume, or None for a 2-D slice file."""
    p = Path(path)
    kind = kind_of(p)
    if kind == "slice":
        return None
    return volumes.volume_shape(p)[0]  # headers only


def read_image(
    path: str | os.PathLike, slice_index: int | None = None, window: Window = Window()
) -> np.ndarray:
    """One slice (a slice file, or slice `slice_index` of a volume) -> [H, W] float32 in [0, 1]."""
    p = Path(path)
    kind = kind_of(p)
    if kind == "slice":
        return read_slice(p, window)
    k = 0 if slice_index is None else int(slice_index)
    return _volume_unit(volumes.read_slice(p, k), kind, window, p)


def read_mask(path: str | os.PathLike, slice_index: int | None = None) -> np.ndarray:
    """The stored integer values of a mask slice [H, W] int64.

    Indexed-palette PNGs are read by index, greyscale and 0/255 masks by value, NIfTI label
    volumes slice by slice in the canonical orientation of `read_image` (so a label volume that
    `predict` wrote lines up with the slices of its image).
    """
    p = Path(path)
    kind = kind_of(p)
    if kind == "slice":
        if suffix_of(p) == ".npy":
            arr = _read_npy(p)
        else:
            img = _read_pil(p)
            if img.mode == "P":
                arr = np.array(img)  # palette index plane, not colours
            elif img.mode in ("RGB", "RGBA"):
                rgb = np.array(img.convert("RGB"))
                if not (
                    np.array_equal(rgb[..., 0], rgb[..., 1])
                    and np.array_equal(rgb[..., 1], rgb[..., 2])
                ):
                    raise DataError(
                        p, "colour mask without a palette: store class indices (indexed PNG)"
                    )
                arr = rgb[..., 0]
            else:
                arr = _pil_to_grey_array(img, p)
    elif kind == "nifti":
        arr = volumes.read_slice(p, 0 if slice_index is None else int(slice_index))
    else:
        raise DataError(p, "masks must be PNG/TIFF/.npy slices or NIfTI label volumes")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError(p, "mask holds non-integer values")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    return arr.astype(np.int64)


def read_lung(path: str | os.PathLike, slice_index: int | None = None) -> np.ndarray:
    """A lung mask slice -> [H, W] bool (any non-zero value is lung)."""
    return read_mask(path, slice_index) != 0


def check_size(shape: tuple[int, ...], path: str | os.PathLike) -> None:
    """Raise if a slice is smaller than the model's smallest input (32 px)."""
    if min(shape[:2]) < MIN_SIDE:
        raise DataError(
            path, f"image is {shape[0]}x{shape[1]} px, smaller than {MIN_SIDE} px on a side"
        )


def write_png(path: str | os.PathLike, arr: np.ndarray, palette: list[int] | None = None):
    """Write a uint8 [H, W] array as PNG (indexed, PIL mode "P", when a palette is given)."""
    img = Image.fromarray(np.ascontiguousarray(arr, np.uint8))
    if palette is not None:
        img.putpalette(palette)  # an "L" image becomes "P" with the same index plane
    img.save(path)
