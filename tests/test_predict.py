"""`predict`'s lesion burden: the percentages by hand, and burden.csv equal to the label maps
that `predict` writes beside it, per slice and per volume."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from stitchnet_tf.data.classes import BACKGROUND, CON, GGO, HEALTHY
from stitchnet_tf.models.threshold import ThresholdRule
from stitchnet_tf.predict import burden_row, predict_path


def test_burden_row_by_hand():
    labels = np.full((4, 5), BACKGROUND)
    labels[0, :4] = HEALTHY  # lung: 4 healthy + 3 GGO + 1 CON = 8 pixels
    labels[1, :3] = GGO
    labels[2, 0] = CON
    assert burden_row(labels) == {
        "lung_px": 8,
        "ggo_px": 3,
        "con_px": 1,
        "ggo_pct": 37.5,
        "con_pct": 12.5,
        "lesion_pct": 50.0,
    }
    assert burden_row(np.zeros((3, 3), int))["lesion_pct"] == 0.0  # no lung: no division by 0


def _counts(labels: np.ndarray) -> tuple[int, int, int]:
    return int((labels > 0).sum()), int((labels == GGO).sum()), int((labels == CON).sum())


def test_burden_csv_matches_the_written_label_maps(tiny_data, tmp_path):
    images = sorted((tiny_data / "labelled" / "images").iterdir())[:3]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / images[0].name).write_bytes(images[0].read_bytes())
    stack = np.stack([np.asarray(Image.open(p)) for p in images[1:]], -1)
    hu = (stack.astype(np.float32) / 255 * 1500 - 1350).astype(np.int16).transpose(1, 0, 2)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), inputs / "vol.nii.gz")
    rule = ThresholdRule(0.25, 0.5, 64).save(tmp_path / "rule.json")
    predict_path(rule, inputs, tmp_path / "out")
    with open(tmp_path / "out" / "burden.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["input"], r["level"], r["slice"]) for r in rows] == [
        (images[0].name, "slice", ""),
        ("vol.nii.gz", "slice", "0"),
        ("vol.nii.gz", "slice", "1"),
        ("vol.nii.gz", "volume", ""),
    ]
    png = np.asarray(Image.open(tmp_path / "out" / f"{images[0].stem}_labels.png"))
    volume = np.asarray(nib.load(tmp_path / "out" / "vol_labels.nii.gz").dataobj)
    maps = [png, volume[..., 0], volume[..., 1], volume]
    for row, labels in zip(rows, maps, strict=True):
        lung, ggo, con = _counts(labels)
        assert (int(row["lung_px"]), int(row["ggo_px"]), int(row["con_px"])) == (lung, ggo, con)
        assert float(row["ggo_pct"]) == pytest.approx(100 * ggo / lung, abs=1e-3)
        assert float(row["lesion_pct"]) == pytest.approx(100 * (ggo + con) / lung, abs=1e-3)
    assert _counts(png)[1] > 0  # the rule does find GGO on these slices: the test means something


def test_dicom_sources_are_the_headers_read_with_the_series(tmp_path, write_ct_dicom):
    """DICOM-SEG sources come from the series scan, in slice order: no second read."""
    from stitchnet_tf.data.volumes import read_volume
    from stitchnet_tf.predict import dicom_sources

    folder = tmp_path / "series"
    folder.mkdir()
    for number, z in ((1, 10.0), (2, 0.0), (3, 5.0)):  # stored out of slice order
        write_ct_dicom(folder / f"s{number}.dcm", np.zeros((32, 32), np.int16), z=z, number=number)
    volume = read_volume(folder)
    for f in folder.iterdir():
        f.unlink()  # a re-read would fail now
    sources = dicom_sources(volume)
    assert [float(ds.ImagePositionPatient[2]) for ds in sources] == [0.0, 5.0, 10.0]
    assert [str(f) for f in volume.files] == [
        str(folder / n) for n in ("s2.dcm", "s3.dcm", "s1.dcm")
    ]
