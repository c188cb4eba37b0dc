"""Train / val / test splits by patient, and label subsets for label-efficiency studies.

A split file (JSON) lists sample ids per part; `train` and `evaluate` reuse it. Splitting is by
patient (scikit-learn `GroupShuffleSplit`), so no patient's slices fall in two parts; by slice
only when no patient ids exist, with a warning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupShuffleSplit

from stitchnet_tf.data.datasets import Dataset, Sample
from stitchnet_tf.errors import DataError
from stitchnet_tf.fileio import atomic_write_text, check_apart
from stitchnet_tf.options import PARTS


def check_split_output(
    path: str | os.PathLike, data: str | os.PathLike, overwrite: bool = False
) -> None:
    """Before `split` writes `path`: it must not be or lie inside the dataset folder `data`,
    and an existing file is replaced only with `overwrite` and only when it is a split file."""
    path = Path(path)
    check_apart(path, {"--data": data})
    if path.is_dir():
        raise DataError(path, "output is a folder (give a .json file)")
    if not path.exists():
        return
    if not overwrite:
        raise DataError(path, "file exists (use --overwrite)")
    try:
        Split.load(path)
    except DataError:
        raise DataError(
            path, "--overwrite replaces only a split file, and this is not one"
        ) from None


@dataclass
class Split:
    """Sample ids per part.

    `unlabelled` lists train ids whose labels were withheld (`--max-labelled` /
    `--label-fraction`): they stay in `train` but are used as unlabelled images.
    """

    train: list[str]
    val: list[str]
    test: list[str]
    by: str = "patient"
    seed: int = 0
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    unlabelled: list[str] = field(default_factory=list)
    patients: dict[str, list[str]] = field(default_factory=dict)
    #: the file it was loaded from (named in errors), None when made in memory
    source: Path | None = field(default=None, compare=False, repr=False)

    def part(self, name: str) -> list[str]:
        if name not in PARTS:
            raise ValueError(f"unknown split part {name!r}; use one of {PARTS}")
        return getattr(self, name)

    def to_json(self) -> str:
        return json.dumps(
            {
                "by": self.by,
                "seed": self.seed,
                "fractions": list(self.fractions),
                "counts": {p: len(self.part(p)) for p in PARTS}
                | {"unlabelled": len(self.unlabelled)},
                "patients": self.patients,
                "train": self.train,
                "val": self.val,
                "test": self.test,
                "unlabelled": self.unlabelled,
            },
            indent=1,
        )

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Split:
        try:
            d = json.loads(Path(path).read_text())
            return cls(
                train=list(d["train"]),
                val=list(d["val"]),
                test=list(d["test"]),
                by=d.get("by", "patient"),
                seed=int(d.get("seed", 0)),
                fractions=tuple(d.get("fractions", (0.6, 0.2, 0.2))),
                unlabelled=list(d.get("unlabelled", [])),
                patients={k: list(v) for k, v in d.get("patients", {}).items()},
                source=Path(path),
            )
        except FileNotFoundError:
            raise DataError(path, "split file not found") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(path, f"not a valid split file ({type(e).__name__}: {e})") from None

    def check(self, dataset: Dataset) -> None:
        """The split must fit `dataset` and keep its parts apart: every listed id is in it (the
        split was made for it), no slice is in two parts, and, when the dataset has patient
        ids, no patient's slices are in two parts (neighbouring slices would leak)."""
        where = self.source or dataset.root
        ids = {s.id for s in dataset.samples}
        for part in PARTS:
            missing = [i for i in self.part(part) if i not in ids]
            if missing:
                raise DataError(
                    where,
                    f"{len(missing)} '{part}' samples of the split are not in this dataset "
                    f"(e.g. {missing[0]}): was the split made for another folder?",
                )
        seen: dict[str, str] = {}
        for part in PARTS:
            for i in self.part(part):
                if seen.setdefault(i, part) != part:
                    raise DataError(where, f"slice {i} is in both '{seen[i]}' and '{part}'")
        if not dataset.has_patients:
            return
        patient_of = {s.id: s.patient for s in dataset.samples}
        owner: dict[str, str] = {}
        for part in PARTS:
            for i in self.part(part):
                patient = patient_of[i]
                if owner.setdefault(patient, part) != part:
                    raise DataError(
                        where,
                        f"patient {patient} has slices in both '{owner[patient]}' and '{part}' "
                        f"(e.g. {i}): the split leaks between parts",
                    )


def _group_split(groups: np.ndarray, test_fraction: float, seed: int, tries: int = 64):
    """(kept, held-out) positions, holding out about `test_fraction` of the groups.

    Of `tries` group shuffles (scikit-learn `GroupShuffleSplit`) the one whose held-out share of
    *slices* is nearest `test_fraction` wins, since patients have different slice counts.
    """
    splitter = GroupShuffleSplit(n_splits=tries, test_size=test_fraction, random_state=seed)
    candidates = splitter.split(np.zeros(len(groups)), groups=groups)
    return min(candidates, key=lambda kh: abs(len(kh[1]) / len(groups) - test_fraction))


def split_dataset(
    dataset: Dataset,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    warn=None,
) -> Split:
    """Split `dataset` train / val / test by patient (by slice when there are no patient ids).

    Args:
        fractions: of patients (or slices) for train, val, test; they must sum to 1.
        seed: makes the split reproducible.
        warn: called with a one-line message when falling back to a split by slice.
    """
    train_f, val_f, test_f = (float(f) for f in fractions)
    if min(fractions) < 0 or abs(train_f + val_f + test_f - 1.0) > 1e-6 or train_f <= 0:
        raise DataError(None, f"split fractions must be >= 0, sum to 1, train > 0: {fractions}")
    samples: list[Sample] = dataset.samples
    ids = np.array([s.id for s in samples])
    if dataset.has_patients:
        by = "patient"
        groups = np.array([s.patient for s in samples])
    else:
        by = "slice"
        groups = np.arange(len(samples)).astype(str)
        if warn:
            warn(
                f"{dataset.root}: no patient ids, splitting by slice: neighbouring slices of one "
                "patient may leak between parts (give patients.csv or --patient-pattern)"
            )
    n_groups = len(set(groups))
    needed = 1 + (val_f > 0) + (test_f > 0)
    if n_groups < needed:
        raise DataError(dataset.root, f"{n_groups} {by}(s) cannot be split into {needed} parts")
    index = np.arange(len(samples))
    parts: dict[str, np.ndarray] = {}
    rest = index
    if test_f > 0:
        keep, held = _group_split(groups[rest], test_f, seed)
        parts["test"], rest = rest[held], rest[keep]
    else:
        parts["test"] = index[:0]
    if val_f > 0:
        keep, held = _group_split(groups[rest], val_f / (train_f + val_f), seed + 1)
        parts["val"], rest = rest[held], rest[keep]
    else:
        parts["val"] = index[:0]
    parts["train"] = rest
    patients = {p: sorted(set(groups[parts[p]].tolist())) for p in PARTS} if by == "patient" else {}
    return Split(
        train=ids[np.sort(parts["train"])].tolist(),
        val=ids[np.sort(parts["val"])].tolist(),
        test=ids[np.sort(parts["test"])].tolist(),
        by=by,
        seed=seed,
        fractions=(train_f, val_f, test_f),
        patients=patients,
    )


def withhold_labels(
    split: Split,
    dataset: Dataset,
    max_labelled: int | None = None,
    label_fraction: float | None = None,
    seed: int = 0,
) -> Split:
    """Keep labels on a seed-controlled subset of the labelled train slices only.

    The others are listed in `split.unlabelled`: still training images, used unlabelled. Give
    `max_labelled` (a count) or `label_fraction` (of the labelled train slices), not both.
    """
    if max_labelled is not None and label_fraction is not None:
        raise DataError(None, "give --max-labelled or --label-fraction, not both")
    train = set(split.train)
    labelled = [s.id for s in dataset.samples if s.labelled and s.id in train]
    if max_labelled is None and label_fraction is None:
        keep = len(labelled)
    elif max_labelled is not None:
        if max_labelled < 0:
            raise DataError(None, f"--max-labelled must be >= 0, got {max_labelled}")
        keep = min(int(max_labelled), len(labelled))
    else:
        if not 0.0 <= label_fraction <= 1.0:
            raise DataError(None, f"--label-fraction must be in [0, 1], got {label_fraction}")
        keep = int(round(label_fraction * len(labelled)))
    order = np.random.default_rng(seed).permutation(len(labelled))
    withheld = sorted(labelled[i] for i in order[keep:])
    return replace(split, unlabelled=withheld)


def withhold_patients(split: Split, dataset: Dataset, n_patients: int, seed: int = 0) -> Split:
    """Keep labels on `n_patients` seed-chosen train patients only (label efficiency by
    patient, as a hospital labels whole scans): the other train patients' slices are listed in
    `split.unlabelled`, still training images, used unlabelled."""
    train = set(split.train)
    patient_of = {s.id: s.patient for s in dataset.samples if s.labelled and s.id in train}
    if not patient_of or not all(patient_of.values()):
        raise DataError(split.source, "labelled patients need patient ids for every train slice")
    patients = sorted(set(patient_of.values()))
    if not 1 <= n_patients <= len(patients):
        raise DataError(
            split.source,
            f"labelled patients must be 1 to the {len(patients)} train patients, got {n_patients}",
        )
    order = np.random.default_rng(seed).permutation(len(patients))
    keep = {patients[i] for i in order[:n_patients]}
    withheld = sorted(i for i, p in patient_of.items() if p not in keep)
    return replace(split, unlabelled=withheld)


def kfold_splits(dataset: Dataset, k: int = 5, seed: int = 0) -> list[Split]:
    """k cross-validation splits by patient (by slice without patient ids).

    The patients (or slices) are shuffled with `seed` and dealt, largest first, to the fold
    holding the fewest slices, so the folds are about equal in slices. Split i tests on fold i,
    validates on fold i + 1 (mod k) and trains on the other k − 2 folds: every slice is tested
    exactly once over the k splits.
    """
    if k < 3:
        raise DataError(None, f"k-fold cross-validation needs k >= 3 (test, val, train), got {k}")
    samples: list[Sample] = dataset.samples
    by = "patient" if dataset.has_patients else "slice"
    groups: dict[str, list[str]] = {}
    for s in samples:
        groups.setdefault(s.patient if by == "patient" else s.id, []).append(s.id)
    if len(groups) < k:
        raise DataError(dataset.root, f"{len(groups)} {by}(s) cannot make {k} folds")
    names = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    ranked = sorted((names[i] for i in order), key=lambda g: -len(groups[g]))  # stable
    folds: list[list[str]] = [[] for _ in range(k)]
    sizes = [0] * k
    for g in ranked:
        i = int(np.argmin(sizes))
        folds[i].append(g)
        sizes[i] += len(groups[g])

    def ids(fold_indices) -> list[str]:
        return sorted(i for f in fold_indices for g in folds[f] for i in groups[g])

    out = []
    for i in range(k):
        val = (i + 1) % k
        train = [f for f in range(k) if f not in (i, val)]
        patients = {}
        if by == "patient":
            patients = {
                "train": sorted(g for f in train for g in folds[f]),
                "val": sorted(folds[val]),
                "test": sorted(folds[i]),
            }
        out.append(
            Split(
                train=ids(train),
                val=ids([val]),
                test=ids([i]),
                by=by,
                seed=seed,
                fractions=((k - 2) / k, 1 / k, 1 / k),
                patients=patients,
            )
        )
    return out
