"""Tests of the synthetic chest-CT generator and the demo dataset writer."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from stitchnet_tf.data.synthetic import (
    MEDSEG_PALETTE,
    SyntheticSlice,
    synth_patient,
    write_demo_dataset,
)
from stitchnet_tf.errors import DataError

SIZE = 64
SEEDS = range(8)


@pytest.fixture(scope="module")
def patients() -> list[list[SyntheticSlice]]:
    return [synth_patient(seed, 5, SIZE) for seed in SEEDS]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _write_small(output: Path, **kwargs) -> Path:
    args = {"labelled_patients": 2, "unlabelled_patients": 1, "slices_per_patient": 3}
    return write_demo_dataset(output, size=SIZE, **{**args, **kwargs})


def test_slice_types_and_shapes():
    slices = synth_patient(3, 4, SIZE, patient="X")
    assert [s.index for s in slices] == [0, 1, 2, 3]
    for s in slices:
        assert s.patient == "X"
        assert s.hu.shape == s.lesion.shape == s.lung.shape == (SIZE, SIZE)
        assert s.hu.dtype == np.float32 and s.lesion.dtype == np.uint8 and s.lung.dtype == bool
        assert set(np.unique(s.lesion)) <= {0, 1, 2}
        assert -1100 < s.hu.min() and s.hu.max() < 3100
    assert synth_patient(3, 1, SIZE)[0].patient == "S3"


def test_deterministic_by_seed():
    a, b, c = synth_patient(11, 3, SIZE), synth_patient(11, 3, SIZE), synth_patient(12, 3, SIZE)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.hu, y.hu)
        assert np.array_equal(x.lesion, y.lesion) and np.array_equal(x.lung, y.lung)
    assert not np.array_equal(a[0].hu, c[0].hu)
    assert not np.array_equal(a[0].lung, c[0].lung)


@pytest.mark.parametrize("size", [31, 0, 64.0])
def test_bad_size(size, tmp_path):
    with pytest.raises(ValueError):
        synth_patient(0, 1, size)
    with pytest.raises(ValueError):
        write_demo_dataset(tmp_path / "out", size=size)
    assert not (tmp_path / "out").exists()


def test_lesions_only_inside_lungs(patients):
    for s in (s for p in patients for s in p):
        assert not np.any((s.lesion > 0) & ~s.lung)
    assert any(s.lesion.any() for p in patients for s in p)


def test_lung_mask_excludes_outside_air_and_mediastinum(patients):
    for s in (s for p in patients for s in p):
        assert s.lung.any()
        # air connected to the image border is outside the body: never lung
        air = ndimage.uniform_filter(s.hu, 3) < -900
        labels, _ = ndimage.label(air)
        border = np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        outside = np.isin(labels, border[border > 0])
        assert outside.sum() > 0.2 * s.hu.size
        assert not np.any(outside & s.lung)
        # two lungs, left and right of the midline (the mediastinum between them)
        assert s.lung[:, : SIZE // 2].any() and s.lung[:, SIZE // 2 :].any()
        assert not s.lung[:, SIZE // 2 - 1 : SIZE // 2 + 1].any()


def test_classes_separable_by_intensity(patients):
    hu = np.stack([s.hu for p in patients for s in p])
    lesion = np.stack([s.lesion for p in patients for s in p])
    lung = np.stack([s.lung for p in patients for s in p])
    healthy, ggo, con = hu[lung & (lesion == 0)], hu[lesion == 1], hu[lesion == 2]
    assert ggo.size > 50 and con.size > 20
    assert -950 < healthy.mean() < ggo.mean() < con.mean() < 100
    assert ggo.mean() - healthy.mean() > 100 and con.mean() - ggo.mean() > 200


def test_slices_of_a_patient_are_alike(patients):
    def iou(a, b):
        return (a & b).sum() / max((a | b).sum(), 1)

    within = [iou(p[i].lung, p[i + 1].lung) for p in patients for i in range(len(p) - 1)]
    across = [iou(a[2].lung, b[2].lung) for a in patients for b in patients if a is not b]
    assert np.mean(within) > np.mean(across)


def test_write_layout(tmp_path):
    calls: list[int] = []
    out = _write_small(tmp_path / "demo", progress=calls.append)
    assert out == tmp_path / "demo"
    assert sum(calls) == 9
    names = [f"P0{i}_0{k}.png" for i in range(2) for k in range(3)]
    lab = out / "labelled"
    for sub in ("images", "masks", "lungs"):
        assert sorted(p.name for p in (lab / sub).iterdir()) == names
    with open(lab / "patients.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "patient"]
    assert rows[1:] == [[n, n[:3]] for n in names]
    for name in names:
        image = Image.open(lab / "images" / name)
        assert image.mode == "L" and image.size == (SIZE, SIZE)
        mask = Image.open(lab / "masks" / name)
        assert mask.mode == "P" and mask.size == (SIZE, SIZE)
        assert tuple(mask.getpalette()[:9]) == MEDSEG_PALETTE
        assert set(np.unique(np.array(mask))) <= {0, 1, 2}
        lungs = Image.open(lab / "lungs" / name)
        assert lungs.mode == "L" and set(np.unique(np.array(lungs))) == {0, 255}
        assert not np.any((np.array(mask) > 0) & (np.array(lungs) == 0))
    unl = out / "unlabelled"
    assert sorted(p.name for p in unl.iterdir()) == ["images", "patients.csv"]
    u_names = [f"U00_0{k}.png" for k in range(3)]
    assert sorted(p.name for p in (unl / "images").iterdir()) == u_names
    assert (unl / "patients.csv").read_text().splitlines() == [
        "file,patient",
        *(f"{n},U00" for n in u_names),
    ]
    readme = (out / "README.md").read_text().splitlines()
    assert len(readme) == 2 and "ynthetic" in readme[0] and "seed=0" in readme[1]


def test_written_images_match_generator(tmp_path):
    from stitchnet_tf.data.intensity import to_uint8, window_hu
    from stitchnet_tf.data.synthetic import _patient_seed

    out = _write_small(tmp_path / "demo", unlabelled_patients=0)
    assert not (out / "unlabelled").exists()
    s = synth_patient(_patient_seed(0, 0, 1), 3, SIZE)[2]
    image = np.array(Image.open(out / "labelled/images/P01_02.png"))
    assert np.array_equal(image, to_uint8(window_hu(s.hu, -600, 1500)))
    assert np.array_equal(np.array(Image.open(out / "labelled/masks/P01_02.png")), s.lesion)
    assert np.array_equal(np.array(Image.open(out / "labelled/lungs/P01_02.png")) > 0, s.lung)


def test_write_deterministic_and_seeded(tmp_path):
    a = _files(_write_small(tmp_path / "a", seed=3))
    b = _files(_write_small(tmp_path / "b", seed=3))
    c = _files(_write_small(tmp_path / "c", seed=4))
    assert a == b
    assert a.keys() == c.keys()
    pngs = [k for k in a if k.endswith(".png")]
    assert any(a[k] != c[k] for k in pngs)
    # labelled and unlabelled patients are different patients
    p0 = np.array(Image.open(tmp_path / "a/labelled/images/P00_00.png"))
    u0 = np.array(Image.open(tmp_path / "a/unlabelled/images/U00_00.png"))
    assert not np.array_equal(p0, u0)


def test_refuses_non_empty_output(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError):
        _write_small(out)
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    with pytest.raises(DataError, match="no synthetic.json"):  # not a folder demo-data wrote
        _write_small(out, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
    fresh = tmp_path / "fresh"
    _write_small(fresh)
    (fresh / "stale.txt").write_text("from before")
    _write_small(fresh, overwrite=True)  # its own earlier output is replaced
    assert not (fresh / "stale.txt").exists() and (fresh / "synthetic.json").exists()


def test_failure_midway_leaves_nothing(tmp_path):
    calls = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 4:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        _write_small(tmp_path / "demo", progress=progress)
    assert len(calls) == 4
    assert list(tmp_path.iterdir()) == []
