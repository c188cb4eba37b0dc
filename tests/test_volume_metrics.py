"""Per-volume 3-D metrics: Dice and HD95 against analytic answers and a brute-force reference,
the empty-set conventions, the per-case table, and the voxel spacing of volume files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stitchnet_tf.data.classes import ALL, CON, GGO, LESION, NO_LESION, bits
from stitchnet_tf.volume_metrics import (
    Block,
    VolumeTable,
    dice_3d,
    hd95,
    summary_markdown,
    surface,
    surface_distances,
    volume_classes,
)


def cubes(side: int, shift: tuple[int, int, int], shape=(14, 14, 14)):
    """Two cubes of `side` voxels, the second moved by `shift` (slice, row, column) voxels."""
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[3 : 3 + side, 3 : 3 + side, 3 : 3 + side] = True
    z, y, x = (3 + s for s in shift)
    b[z : z + side, y : y + side, x : x + side] = True
    return a, b


@pytest.mark.parametrize(
    "shift, spacing, expected",
    [
        ((2, 0, 0), (0.4, 1.0, 1.2), 0.8),  # 2 slices of 0.4 mm
        ((0, 0, 2), (3.0, 1.25, 0.5), 1.0),  # 2 columns of 0.5 mm
        ((0, 1, 0), (3.0, 1.25, 0.5), 1.25),  # 1 row of 1.25 mm
        ((0, 0, 2), None, 2.0),  # no spacing: voxels
    ],
)
def test_hd95_of_shifted_cubes_is_the_shift_in_mm(shift, spacing, expected):
    """Two 6-voxel cubes, one moved by k voxels along one axis of spacing d, with k·d no larger
    than the other spacings: the nearest surface is straight along that axis, the largest
    directed distance is k·d, and the voxels at k·d (both end faces that stick out or sink in,
    36 + 16 of the 152 surface voxels) are more than 5 %, so the 95th percentile is k·d."""
    a, b = cubes(6, shift)
    assert hd95(a, b, spacing) == pytest.approx(expected)
    assert hd95(b, a, spacing) == pytest.approx(expected)
    forward, backward = surface_distances(a, b, spacing)
    assert forward.size == backward.size == 152 and forward.max() == pytest.approx(expected)
    k = max(shift)
    assert dice_3d(a, b) == pytest.approx((6 - k) / 6)  # overlap 6·6·(6-k) of 2·216


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask or outside the array."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def brute_hd95(pred, true, spacing):
    """All pairwise distances between the two surfaces' voxel centres, in mm."""
    p = np.argwhere(brute_surface(pred)) * np.asarray(spacing)
    t = np.argwhere(brute_surface(true)) * np.asarray(spacing)
    d = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    forward, backward = d.min(1), d.min(0)
    return max(np.percentile(forward, 95), np.percentile(backward, 95)), forward, backward


@pytest.mark.parametrize("seed", range(4))
def test_hd95_and_dice_match_a_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    shape, spacing = (7, 9, 8), (2.5, 0.7, 0.9)
    smooth = rng.random(shape)
    pred = smooth > 0.6
    true = (smooth + 0.4 * rng.random(shape)) > 0.85
    true[3, 2:6, 2:5] = True  # a block, so the masks differ in shape
    expected, forward, backward = brute_hd95(pred, true, spacing)
    np.testing.assert_array_equal(surface(pred), brute_surface(pred))
    got_forward, got_backward = surface_distances(pred, true, spacing)
    np.testing.assert_allclose(np.sort(got_forward), np.sort(forward), rtol=1e-12)
    np.testing.assert_allclose(np.sort(got_backward), np.sort(backward), rtol=1e-12)
    assert hd95(pred, true, spacing) == pytest.approx(expected, rel=1e-12)
    both = {tuple(i) for i in np.argwhere(pred)} & {tuple(i) for i in np.argwhere(true)}
    assert dice_3d(pred, true) == pytest.approx(2 * len(both) / (pred.sum() + true.sum()))


def test_surface_counts_the_array_border_and_crop_changes_nothing():
    full = np.ones((3, 4, 5), bool)
    inside = np.zeros_like(full)
    inside[1, 1:3, 1:4] = True
    np.testing.assert_array_equal(surface(full), full & ~inside)
    # a mask far from the origin: cropped to its box, the distances are unchanged
    a, b = cubes(4, (1, 0, 2), shape=(30, 40, 50))
    big = np.zeros((60, 60, 60), bool)
    assert hd95(a, b, (1.0, 2.0, 0.5)) == pytest.approx(brute_hd95(a, b, (1.0, 2.0, 0.5))[0])
    big[20:34, 30:44, 40:54] = a[3:17, 3:17, 3:17]
    other = np.zeros_like(big)
    other[20:34, 30:44, 40:54] = b[3:17, 3:17, 3:17]
    assert hd95(big, other, (1.0, 2.0, 0.5)) == pytest.approx(hd95(a, b, (1.0, 2.0, 0.5)))


def test_empty_set_conventions():
    empty, some = np.zeros((3, 4, 4), bool), np.zeros((3, 4, 4), bool)
    some[1, 1:3, 1:3] = True
    assert dice_3d(empty, empty) == 1.0 and hd95(empty, empty, (2.0, 1.0, 1.0)) == 0.0
    assert dice_3d(some, empty) == 0.0 and dice_3d(empty, some) == 0.0
    assert math.isnan(hd95(some, empty)) and math.isnan(hd95(empty, some, (2.0, 1.0, 1.0)))
    assert dice_3d(some, some) == 1.0 and hd95(some, some) == 0.0
    with pytest.raises(ValueError, match="surface distances need two non-empty"):
        surface_distances(some, empty)


def test_invalid_inputs():
    a = np.zeros((2, 3, 3), bool)
    with pytest.raises(ValueError, match="does not match"):
        hd95(a, np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError, match="3 positive numbers"):
        hd95(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="3 positive numbers"):
        hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="truth bits"):
        Block(np.zeros((1, 2, 2), int), np.zeros((1, 2, 2), int))
    with pytest.raises(ValueError, match="unknown classes"):
        VolumeTable(("ggo", "background"))
    with pytest.raises(ValueError, match="absent policy"):
        VolumeTable(absent="never")


def test_volume_classes_follow_the_scheme_and_the_mask_values():
    medseg = [NO_LESION, bits(GGO), bits(CON), LESION]
    assert volume_classes("multiclass", medseg) == ("ggo", "con", "lesion")
    assert volume_classes("lesion", [NO_LESION, LESION]) == ("lesion",)
    assert volume_classes("multiclass", [1, 2, 4, 8]) == ("ggo", "con", "lesion", "lung")
    assert volume_classes("multiclass", range(1, 16))[-1] == "lung"


def _case(truth_classes, pred_classes, shape=(2, 4, 4)):
    """A block from [D, H, W] class-id maps (truth as exact single-class sets)."""
    truth = np.left_shift(1, np.asarray(truth_classes)).astype(np.uint8)
    return Block(np.asarray(pred_classes), truth)


def test_table_scores_per_class_and_pools_blocks():
    truth = np.ones((2, 4, 4), int)
    truth[0, 1:3, 1:3] = GGO
    truth[1, 0, 0] = CON
    pred = truth.copy()
    pred[1, 0, 0] = GGO  # CON called GGO
    t = VolumeTable(("ggo", "con", "lesion"))
    row = t.add("v", Block(pred, np.left_shift(1, truth)), slices=2)
    assert row["ggo_dice"] == pytest.approx(2 * 4 / (5 + 4)) and row["con_dice"] == 0.0
    assert math.isnan(row["con_hd95"]) and row["lesion_dice"] == 1.0 and row["lesion_hd95"] == 0
    assert (row["ggo_truth_voxels"], row["ggo_predicted_voxels"]) == (4, 5)
    assert row["hd95_unit"] == "px" and row["spacing"] == "unknown"
    # two blocks of one case: Dice of the pooled voxels, HD95 of the pooled distances
    a, b = cubes(4, (1, 0, 0), shape=(10, 10, 10))
    c, d = cubes(4, (0, 0, 2), shape=(10, 10, 10))
    spacing = (2.0, 1.0, 0.5)
    blocks = [
        Block(np.where(p, GGO, 1), np.where(q, bits(GGO), NO_LESION), spacing)
        for p, q in ((a, b), (c, d))
    ]
    row = t.add("two", blocks)
    parts = [surface_distances(p, q, spacing) for p, q in ((a, b), (c, d))]
    pooled = [np.concatenate(x) for x in zip(*parts, strict=True)]
    assert row["ggo_dice"] == pytest.approx(dice_3d(np.stack([a, c]), np.stack([b, d])))
    assert row["ggo_hd95"] == pytest.approx(max(np.percentile(x, 95) for x in pooled))
    assert row["spacing"] == "2x1x0.5" and row["hd95_unit"] == "mm" and row["slices"] == 20
    with pytest.raises(ValueError, match="already added"):
        t.add("v", blocks)


def test_ignored_voxels_take_no_part():
    """Unknown truth (ALL) and binary-lesion truth for GGO are ignored by Dice and HD95."""
    pred = np.full((1, 4, 6), 1)
    pred[0, :, :2] = GGO  # GGO predicted on the unknown columns only
    truth = np.full((1, 4, 6), NO_LESION, np.uint8)
    truth[0, :, :2] = ALL
    truth[0, :, 4:] = LESION
    row = VolumeTable(("ggo", "lesion"), absent="one").add("c", Block(pred, truth))
    assert row["ggo_dice"] == 1.0 and row["ggo_hd95"] == 0.0  # nothing scored: both empty
    assert row["lesion_dice"] == 0.0 and math.isnan(row["lesion_hd95"])
    assert row["ggo_predicted_voxels"] == 0 and row["lesion_truth_voxels"] == 8


@pytest.mark.parametrize(
    "absent, dice_empty, dice_fp, hd_empty",
    [("exclude", None, None, None), ("zero", 0.0, 0.0, 0.0), ("one", 1.0, 0.0, 0.0)],
)
def test_absent_policy_for_cases_without_the_class(absent, dice_empty, dice_fp, hd_empty):
    """Cases without CON in truth: left out (exclude), Dice 0 (zero), 1 if nothing predicted
    (one), as the per-slice table; HD95 0 when nothing predicted, NaN when something was."""
    t = VolumeTable(("ggo", "con"), absent=absent)
    truth = np.ones((1, 4, 4), int)
    truth[0, :2, :2] = GGO
    t.add("hit", _case(truth, truth))
    wrong = truth.copy()
    wrong[0, 3, 3] = CON
    row_empty = t.rows()[0]
    row_fp = t.add("fp", _case(truth, wrong))
    assert row_empty["con_dice"] == dice_empty and row_fp["con_dice"] == dice_fp
    assert row_empty["con_hd95"] == hd_empty
    if absent == "exclude":
        assert row_fp["con_hd95"] is None
    else:
        assert math.isnan(row_fp["con_hd95"])
    s = t.summary()["classes"]["con"]
    assert s["n_left_out"] == (2 if absent == "exclude" else 0)
    assert s["n_hd95_undefined"] == (0 if absent == "exclude" else 1)
    assert s["n_cases"] + s["n_left_out"] == 2
    assert t.summary()["classes"]["ggo"]["dice"] == {"mean": 1.0, "std": 0.0}


def test_summary_means_over_cases_and_units():
    t = VolumeTable(("lesion",))
    values, mm = [], []
    for i, spacing in enumerate([(1.0, 1.0, 1.0), (2.0, 1.0, 1.0), None]):
        a, b = cubes(4, (i + 1, 0, 0), shape=(10, 8, 8))
        row = t.add(f"c{i}", Block(np.where(a, GGO, 1), np.where(b, LESION, 1), spacing))
        values.append(row)
        if spacing:
            mm.append(brute_hd95(a, b, spacing)[0])
    s = t.summary()
    assert s["n_cases"] == 3 and s["hd95_unit"] == "mm" and s["kinds"] == {"volume": 3}
    e = s["classes"]["lesion"]
    dice = [r["lesion_dice"] for r in values]
    assert e["dice"]["mean"] == pytest.approx(np.mean(dice))
    assert e["dice"]["std"] == pytest.approx(np.std(dice))
    assert e["hd95"]["mean"] == pytest.approx(np.mean(mm))  # the case in pixels left out
    assert e["hd95"]["std"] == pytest.approx(np.std(mm))
    assert (e["n_hd95"], e["n_hd95_in_pixels"], e["n_hd95_undefined"]) == (2, 1, 0)
    md = summary_markdown(s | {"note": "x"}, "Two volumes.", title="Per-volume")
    assert "| Lesion | " in md and "HD95 (mm)" in md and "(1 in px left out)" in md
    assert "Two volumes." in md
    csv_lines = t.to_csv().splitlines()
    assert csv_lines[0].startswith("case,kind,slices,spacing,hd95_unit,lesion_dice,lesion_hd95")
    assert len(csv_lines) == 4 and ",px," in csv_lines[3]
    empty = VolumeTable()
    assert empty.to_csv().count("\n") == 1 and empty.summary()["hd95_unit"] is None
    assert summary_markdown(empty.summary(), "No cases here.") == "No cases here.\n"


# ------------------------------------------------------------------- spacing of volume files


def test_nifti_spacing_is_slice_row_column(tmp_path):
    import nibabel as nib

    from stitchnet_tf.data.cases import voxel_spacing

    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 3), np.int16), np.diag([0.6, 0.8, 2.5, 1])), path)
    assert voxel_spacing(path) == pytest.approx((2.5, 0.8, 0.6))
    img = nib.Nifti1Image(np.zeros((5, 6, 3), np.int16), np.diag([0.6, 0.8, 2.5, 1]) / 1000)
    img.header.set_xyzt_units("meter")
    nib.save(img, tmp_path / "m.nii")
    assert voxel_spacing(tmp_path / "m.nii") == pytest.approx((2.5, 0.8, 0.6))
    png = tmp_path / "s.png"
    png.write_bytes(b"")
    assert voxel_spacing(png) is None


def test_nifti_spacing_follows_the_orientation_io_reads(tmp_path):
    """Whatever orientation `io` presents a volume's slices in, the spacing is per axis of what
    it reads: axes of distinct lengths 5, 6, 7 with voxel sizes 0.5, 0.6, 0.7, stored with i
    along S-I and k along R-L (an affine whose columns are permuted)."""
    import nibabel as nib

    from stitchnet_tf.data import io
    from stitchnet_tf.data.cases import voxel_spacing

    affine = np.array([[0, 0, 0.7, 0], [0, 0.6, 0, 0], [0.5, 0, 0, 0], [0, 0, 0, 1.0]])
    path = tmp_path / "permuted.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.int16), affine), path)
    size = {5: 0.5, 6: 0.6, 7: 0.7}
    rows, columns = io.read_image(path, 0).shape
    expected = (size[io.slice_count(path)], size[rows], size[columns])
    assert voxel_spacing(path) == pytest.approx(expected)


def test_dicom_series_spacing_from_the_header(tmp_path, write_ct_dicom):
    import pydicom

    from stitchnet_tf.data.cases import voxel_spacing

    series = tmp_path / "series"
    series.mkdir()
    for i, z in enumerate((5.0, 0.0, 2.5)):
        write_ct_dicom(series / f"{i}.dcm", np.zeros((32, 32)), z=z, number=i + 1)
    assert voxel_spacing(series) is None  # no PixelSpacing
    for f in series.iterdir():
        ds = pydicom.dcmread(f)
        ds.PixelSpacing = [0.7, 0.9]
        ds.save_as(f)
    assert voxel_spacing(series) == pytest.approx((2.5, 0.7, 0.9))
