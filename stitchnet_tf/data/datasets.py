"""Finding the samples of a dataset folder: images, masks, lung masks and patient ids.

Layouts:
- labelled: `images/` and `masks/` with matching file stems, optional `lungs/`;
- unlabelled: `images/`, or images at the folder's root;
- either, with a CSV manifest (`manifest.csv`, columns image, mask, lung, patient, and
  optionally slice) whose paths are relative to the manifest's folder.
Patient ids come from the manifest, a `patients.csv` (file, patient), a filename pattern, or
(for volumes) the volume itself. A folder written by `preprocess` carries a `dataset.json`
saying its slices are already lung-cropped at a given size, with allowed-set bit masks.
Volumes (NIfTI, DICOM) expand to one sample per axial slice.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from stitchnet_tf.data import io
from stitchnet_tf.data.classes import MaskValueMap
from stitchnet_tf.errors import DataError

MANIFEST = "manifest.csv"
PATIENTS = "patients.csv"
DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class Sample:
    """One axial slice: where its image, mask and lung mask are, and whose it is.

    `slice` is the index inside a volume file (None for a 2-D slice file). `id` is unique
    within its dataset (the image path relative to the dataset root, `#k` for a volume slice);
    split files list samples by it.
    """

    id: str
    image: str
    mask: str | None = None
    lung: str | None = None
    patient: str | None = None
    slice: int | None = None

    @property
    def labelled(self) -> bool:
        return self.mask is not None

    def unlabel(self) -> Sample:
        """The same slice with its lesion mask dropped (lung mask kept)."""
        return replace(self, mask=None)


@dataclass
class Dataset:
    """A dataset folder's samples and how to read them.

    `prepared_size` is the side of the already lung-cropped slices of a folder written by
    `preprocess` (their masks are allowed-set bits and their lung masks the lung field), or
    None for raw data.
    """

    root: Path
    samples: list[Sample]
    mask_map: MaskValueMap
    prepared_size: int | None = None
    info: dict = field(default_factory=dict)
    skipped: int = 0  # files passed over by `discover(skip_bad=True)`

    @property
    def labelled(self) -> bool:
        return any(s.labelled for s in self.samples)

    @property
    def has_patients(self) -> bool:
        return bool(self.samples) and all(s.patient for s in self.samples)

    def subset(self, ids: list[str] | set[str]) -> Dataset:
        """The samples whose id is in `ids`, in this dataset's order."""
        wanted = set(ids)
        return replace(self, samples=[s for s in self.samples if s.id in wanted])

    def __len__(self) -> int:
        return len(self.samples)


SIDE_FILES = (".csv", ".json", ".md", ".txt")


def _list_images(folder: Path, side_files: bool = False, exclude=()) -> list[Path]:
    """Image files (and DICOM series sub-folders) of a folder, sorted; others are an error.

    With `side_files`, CSV/JSON/Markdown/text files are passed over (images at a dataset root);
    entries named in `exclude` are passed over too.
    """
    out = []
    for entry in sorted(folder.iterdir()):
        if not io.is_image_candidate(entry) or entry.name in exclude:
            continue
        if side_files and entry.is_file() and entry.suffix.lower() in SIDE_FILES:
            continue
        io.kind_of(entry)  # raises for a non-image file; a folder is a DICOM series
        out.append(entry)
    return out


def _expand(
    root: Path, image: Path, mask: Path | None, lung: Path | None, patient: str | None
) -> list[Sample]:
    """One sample per slice of `image` (one for a 2-D slice file)."""
    rel = image.relative_to(root).as_posix() if image.is_relative_to(root) else str(image)
    n = io.slice_count(image)
    if n is None:
        return [Sample(rel, str(image), _s(mask), _s(lung), patient)]
    if patient is None:
        patient = io.stem_of(image)  # a volume is one patient unless told otherwise
    for other in (mask, lung):
        if other is not None:
            m = io.slice_count(other)
            if m != n:
                raise DataError(other, f"has {m} slices but its image {image.name} has {n}")
    return [Sample(f"{rel}#{k}", str(image), _s(mask), _s(lung), patient, k) for k in range(n)]


def _s(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _read_patients_csv(path: Path) -> dict[str, str]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"unreadable CSV ({e})") from None
    if not rows or not {"file", "patient"} <= set(rows[0]):
        raise DataError(path, "expected a CSV with columns file,patient")
    return {r["file"].strip(): r["patient"].strip() for r in rows if r.get("file")}


def _patient_lookup(root: Path, pattern: str | None):
    table = _read_patients_csv(root / PATIENTS) if (root / PATIENTS).is_file() else None
    regex = re.compile(pattern) if pattern else None

    def lookup(image: Path) -> str | None:
        if table is not None:
            rel = image.relative_to(root).as_posix() if image.is_relative_to(root) else ""
            for key in (image.name, io.stem_of(image), rel):
                if key in table:
                    return table[key]
            raise DataError(image, f"no patient for this file in {root / PATIENTS}")
        if regex is not None:
            m = regex.search(image.name)
            if not m:
                raise DataError(image, f"file name does not match --patient-pattern {pattern!r}")
            return (
                m.group("patient")
                if "patient" in regex.groupindex
                else m.group(1 if regex.groups else 0)
            )
        return None

    return lookup


def _from_manifest(root: Path, manifest: Path, patient_pattern: str | None) -> list[Sample]:
    try:
        with open(manifest, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(manifest, f"unreadable manifest ({e})") from None
    if not rows:
        raise DataError(manifest, "manifest has no rows")
    if "image" not in rows[0]:
        raise DataError(
            manifest, "manifest needs an 'image' column (and optional mask, lung, patient)"
        )
    lookup = _patient_lookup(root, patient_pattern)
    samples: list[Sample] = []

    def path_of(value: str | None) -> Path | None:
        if not value or not value.strip():
            return None
        p = Path(value.strip())
        p = p if p.is_absolute() else root / p
        if not p.exists():
            raise DataError(manifest, f"listed file not found: {value.strip()}")
        return p

    for row in rows:
        image, mask, lung = (
            path_of(row.get("image")),
            path_of(row.get("mask")),
            path_of(row.get("lung")),
        )
        if image is None:
            raise DataError(manifest, "a row has an empty 'image'")
        patient = (row.get("patient") or "").strip() or lookup(image)
        k = (row.get("slice") or "").strip()
        if k:
            rel = image.relative_to(root).as_posix() if image.is_relative_to(root) else str(image)
            samples.append(
                Sample(f"{rel}#{int(k)}", str(image), _s(mask), _s(lung), patient, int(k))
            )
        else:
            samples.extend(_expand(root, image, mask, lung, patient))
    return samples


def _index_by_stem(folder: Path | None) -> dict[str, Path]:
    """Files of `folder` by stem; two files with one stem are an error."""
    index: dict[str, Path] = {}
    if folder is None:
        return index
    for p in _list_images(folder):
        stem = io.stem_of(p)
        if stem in index:
            raise DataError(
                folder, f"two files share the name {stem}: {index[stem].name}, {p.name}"
            )
        index[stem] = p
    return index


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset folder is and how to read it, handed over whole (CLI -> evaluation,
    training, int8 export) instead of as separate arguments.

    Args:
        path: the dataset folder.
        mask_values: what stored mask values mean (see `discover`); None: the folder's
            dataset.json, else medseg.
        patient_pattern: a regex on file names whose first group is the patient id.
        masks_subdir, lungs_subdir: the sub-folders of lesion masks and lung masks (None: no
            lung masks are read).
    """

    path: Path
    mask_values: str | None = None
    patient_pattern: str | None = None
    masks_subdir: str = "masks"
    lungs_subdir: str | None = "lungs"

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, data: str | os.PathLike | DatasetSpec) -> DatasetSpec:
        """`data` as a spec: a spec as it is, a path with the default reading."""
        return data if isinstance(data, DatasetSpec) else cls(Path(data))

    def discover(self, *, require_labels: bool = False, skip_bad: bool = False, warn=None):
        """The folder's `Dataset` (see `discover`)."""
        return discover(
            self.path,
            mask_values=self.mask_values,
            patient_pattern=self.patient_pattern,
            masks_subdir=self.masks_subdir,
            lungs_subdir=self.lungs_subdir,
            require_labels=require_labels,
            skip_bad=skip_bad,
            warn=warn,
        )


def discover(
    root: str | os.PathLike,
    *,
    mask_values: str | MaskValueMap | None = None,
    patient_pattern: str | None = None,
    require_labels: bool = False,
    masks_subdir: str = "masks",
    lungs_subdir: str | None = "lungs",
    skip_bad: bool = False,
    warn=None,
) -> Dataset:
    """Find the samples of a dataset folder (see the module docstring for layouts).

    Args:
        root: the dataset folder.
        mask_values: a `MaskValueMap`, a preset name, or a spec like `0:none,1:ggo,2:con`.
        patient_pattern: a regex on file names whose first group (or group `patient`) is the
            patient id, used when there is no manifest column or `patients.csv`.
        require_labels: error if the folder has no masks.
        masks_subdir, lungs_subdir: the sub-folder names of lesion masks and lung masks
            (e.g. `infection` for the zenodo20 layout); `lungs_subdir=None` reads no lung
            masks, so that the lung field comes from the image alone. A manifest names its own
            files, so these apply to folder layouts only.
        skip_bad: with `warn`, skip images without masks or unreadable volumes instead of
            stopping at the first one.
        warn: called with a one-line message for each skipped file.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(root, "dataset folder not found")
    if not root.is_dir():
        raise DataError(root, "not a folder")
    info: dict = {}
    if (root / DATASET_JSON).is_file():
        try:
            info = json.loads((root / DATASET_JSON).read_text())
        except (OSError, ValueError) as e:
            raise DataError(root / DATASET_JSON, f"unreadable ({e})") from None
    if isinstance(mask_values, MaskValueMap):
        mask_map = mask_values
    else:
        mask_map = MaskValueMap.parse(mask_values or info.get("mask_values"))
    prepared = info.get("prepared_size")

    skipped = 0
    if (root / MANIFEST).is_file():
        samples = _from_manifest(root, root / MANIFEST, patient_pattern)
    else:
        images_dir = root / "images" if (root / "images").is_dir() else root
        masks_dir = root / masks_subdir if (root / masks_subdir).is_dir() else None
        lungs_dir = root / lungs_subdir if lungs_subdir and (root / lungs_subdir).is_dir() else None
        images = _list_images(
            images_dir, side_files=images_dir == root, exclude=(masks_subdir, lungs_subdir)
        )
        if not images:
            raise DataError(images_dir, "no images found (empty folder)")
        lookup = _patient_lookup(root, patient_pattern)
        masks, lungs = _index_by_stem(masks_dir), _index_by_stem(lungs_dir)
        samples = []
        for image in images:
            try:
                mask = masks.get(io.stem_of(image))
                if masks_dir is not None and mask is None:
                    io.slice_count(image)  # an unreadable image is the first thing to report
                    raise DataError(image, f"no mask with the same name in {masks_dir}")
                lung = lungs.get(io.stem_of(image))
                samples.extend(_expand(root, image, mask, lung, lookup(image)))
            except DataError as e:
                if not (skip_bad and warn):
                    raise
                warn(f"skipped {e}")
                skipped += 1
        if masks_dir is not None:
            stems = {io.stem_of(p) for p in images}
            orphans = [p.name for stem, p in masks.items() if stem not in stems]
            if orphans and warn:
                warn(f"{masks_dir}: {len(orphans)} masks have no image (e.g. {orphans[0]})")
    if not samples:
        raise DataError(root, "no usable samples")
    dataset = Dataset(root, samples, mask_map, int(prepared) if prepared else None, info, skipped)
    if require_labels and not dataset.labelled:
        raise DataError(
            root, "no masks found: a labelled folder needs masks/ (or a manifest 'mask' column)"
        )
    return dataset
