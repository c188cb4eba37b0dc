"""Lung masks brought by the user (`predict --lungs DIR`), e.g. from lungmask or TotalSegmentator.

For an input named `<name>` (`io.stem_of`), `DIR` holds one of:
- `<name>.nii.gz` / `<name>.nii`: a lung label volume in the input's geometry (lungmask's
  output: 1 right, 2 left lung, or lobes 1-5; any non-zero voxel is lung);
- `<name>/` with TotalSegmentator's per-structure files: every `lung_*.nii.gz` is united;
- for a 2-D slice input, `<name>.png` (or another slice format): non-zero is lung.

A mask must overlay its input: the same canonical shape and affine within `AFFINE_TOL` mm (a
volume), the same size (a slice). A missing or mismatched mask is a `DataError` naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stitchnet_tf.data import io
from stitchnet_tf.data.volumes import Volume, read_volume
from stitchnet_tf.errors import DataError

#: Largest difference (mm) between the affines of an input and its lung mask.
AFFINE_TOL = 1e-2
#: Largest label value of a lung-only map (lungmask's five lobes); more is a multi-organ map.
MAX_LUNG_LABEL = 5


def _volume_files(lungs: Path, name: str) -> list[Path]:
    for suffix in (".nii.gz", ".nii"):
        if (lungs / f"{name}{suffix}").is_file():
            return [lungs / f"{name}{suffix}"]
    folder = lungs / name
    if folder.is_dir():
        parts = sorted(p for p in folder.iterdir() if p.name.startswith("lung_"))
        if parts:
            return parts
        raise DataError(folder, "no lung_*.nii.gz files (TotalSegmentator's lung structures)")
    raise DataError(lungs, f"no lung mask for {name} ({name}.nii.gz or {name}/lung_*.nii.gz)")


def volume_lungs(lungs: str | Path, name: str, volume: Volume) -> np.ndarray:
    """The user's lung mask of `volume` as [K, H, W] bool in its canonical orientation."""
    mask = np.zeros(volume.data.shape, bool)
    for path in _volume_files(Path(lungs), name):
        part = read_volume(path)
        if part.data.shape != volume.data.shape or not np.allclose(
            part.canonical_affine, volume.canonical_affine, atol=AFFINE_TOL
        ):
            raise DataError(
                path,
                f"lung mask does not overlay {volume.path}: shape {part.shape3} and affine "
                f"differ from the input's {volume.shape3} (resample it to the input's grid)",
            )
        values = np.asarray(part.data)
        if values.size and values.max() > MAX_LUNG_LABEL and len(np.unique(values)) > 2:
            raise DataError(
                path,
                f"labels up to {values.max():g}: a multi-organ map, not a lung mask (give "
                "TotalSegmentator's per-structure folder or a binary lung mask)",
            )
        mask |= values != 0
    return mask


def slice_lungs(lungs: str | Path, name: str, shape: tuple[int, int]) -> np.ndarray:
    """The user's lung mask of a 2-D slice input named `name`: [H, W] bool."""
    lungs = Path(lungs)
    found = [lungs / f"{name}{s}" for s in io.SLICE_SUFFIXES if (lungs / f"{name}{s}").is_file()]
    if not found:
        raise DataError(lungs, f"no lung mask for {name} ({name}.png or another slice format)")
    mask = io.read_lung(found[0])
    if mask.shape != tuple(shape):
        raise DataError(found[0], f"lung mask is {mask.shape}, the image is {tuple(shape)}")
    return mask


def check_folder(lungs: str | Path) -> Path:
    """`lungs` is an existing folder (else a `DataError`)."""
    lungs = Path(lungs)
    if not lungs.is_dir():
        raise DataError(
            lungs, "lung mask folder not found" if not lungs.exists() else "not a folder"
        )
    return lungs


def no_segmenter(image: np.ndarray) -> np.ndarray:
    """The segmenter of a `Predictor` that gets every lung field from the user's masks."""
    raise RuntimeError("internal error: a slice reached the lung segmenter without its mask")
