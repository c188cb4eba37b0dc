"""The data layer on the real CT in ../shared/data (skipped where that folder is absent)."""

from pathlib import Path

import numpy as np
import pytest

from stitchnet_tf.data.classes import BACKGROUND, CON, GGO, HEALTHY, bits
from stitchnet_tf.data.datasets import discover
from stitchnet_tf.data.io import read_mask
from stitchnet_tf.data.pipeline import SliceLoader, slice_dataset
from stitchnet_tf.data.preprocess import preprocess_dataset
from stitchnet_tf.data.splits import split_dataset

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MEDSEG, ZENODO = DATA / "medseg-covid", DATA / "zenodo20-lungs"
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not present: {DATA}"),
]


def test_medseg_labelled_slices_become_exact_four_class_sets():
    lab = discover(MEDSEG / "labelled")
    loader = SliceLoader(lab, lab.samples[:4], 96)
    seen = np.zeros(4)
    for i in range(4):
        x, allowed, lung = loader(i)
        assert x.shape == (96, 96, 1) and 0 <= x.min() and x.max() <= 1
        np.testing.assert_array_equal(allowed.sum(-1), 1)  # lesion mask + lung field: exact
        np.testing.assert_array_equal(allowed[..., BACKGROUND], 1 - lung[..., 0])
        assert (x[lung == 0] == 0).all()
        seen += allowed.reshape(-1, 4).sum(0)
    assert seen[HEALTHY] > 0 and seen[GGO] + seen[CON] > 0


def test_zenodo_binary_infection_masks_are_partial_sets():
    ds = discover(ZENODO, masks_subdir="infection", mask_values="binary")
    lesion = next(i for i, s in enumerate(ds.samples[600:700], 600) if read_mask(s.mask).max() > 0)
    _, allowed, lung = SliceLoader(ds, ds.samples, 64)(lesion)
    sets = set(np.unique(allowed @ (2 ** np.arange(4))).astype(int))
    assert bits(GGO, CON) in sets and bits(HEALTHY) in sets and bits(BACKGROUND) in sets


def test_zenodo_split_by_patient_and_preprocess_subset(tmp_path):
    ds = discover(ZENODO, masks_subdir="infection", mask_values="binary")
    split = split_dataset(ds, seed=0)
    by_id = {s.id: s.patient for s in ds.samples}
    parts = [{by_id[i] for i in split.part(p)} for p in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(set().union(*parts)) == 14
    summary = preprocess_dataset(ds.subset(split.test[:6]), tmp_path / "prep", size=64)
    assert summary["count"] == 6 and summary["lung_masks"] == "supplied"
    prepared = discover(tmp_path / "prep")
    assert prepared.prepared_size == 64 and prepared.has_patients
    assert (
        len(list(slice_dataset(SliceLoader(prepared, prepared.samples, 64), augmentation=True)))
        == 6
    )


def test_medseg_unlabelled_streams_with_patients():
    unl = discover(MEDSEG / "unlabelled", patient_pattern=r"Data-1_(.+)_\d+\.jpg")
    assert len({s.patient for s in unl.samples}) == 20
    ds = slice_dataset(SliceLoader(unl, unl.samples, 64), shuffle=True, augmentation=True)
    for ex in ds.take(3):
        assert ex["x"].shape == (64, 64, 1) and float(ex["lung"].numpy().mean()) > 0.05
