"""Volume geometry (`data/volumes.py`): one canonical axial orientation for NIfTI stored in any
axis order and for DICOM series, label volumes written back in the input's own geometry, DICOM
trees and series choice, and whole-volume reads."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from helpers import write_ct_dicom
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from stitchnet_tf.data import io, volumes
from stitchnet_tf.data.synthetic import synth_patient
from stitchnet_tf.errors import DataError
from stitchnet_tf.models.threshold import ThresholdRule
from stitchnet_tf.predict import predict_path

K, N = 12, 48  # slices, rows = columns
SPACING = (2.5, 0.8, 0.7)  # (slice, row, column) mm
ORIGIN = np.array([-31.5, 12.25, -140.0])  # RAS mm of voxel (0, 0, 0) of the RAS array


@pytest.fixture(scope="module")
def anatomy() -> np.ndarray:
    """Canonical HU [K, N, N] int16: k inferior -> superior, rows anterior -> posterior,
    columns patient right -> left (synth_patient draws slices apex to base in that view), with
    an asymmetric marker (a dense block front right) so that any flip shows."""
    slices = synth_patient(7, K, N)
    hu = np.stack([s.hu for s in reversed(slices)])
    hu[:, 2:6, 4:14] = 400
    return np.rint(hu).astype(np.int16)


def ras_affine() -> np.ndarray:
    affine = np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])
    affine[:3, 3] = ORIGIN
    return affine


def stored(anatomy: np.ndarray, axcodes: tuple[str, str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The anatomy stored with voxel axes `axcodes`, and the matching affine."""
    ras = anatomy.transpose(2, 1, 0)[::-1, ::-1, :]  # (L, P, S) -> (R, A, S)
    t = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(axcodes))
    return np.ascontiguousarray(apply_orientation(ras, t)), ras_affine() @ inv_ornt_aff(
        t, ras.shape
    )


def save_nifti(path, data, affine, qform_code=1, sform_code=2):
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=qform_code)
    img.header.set_sform(affine, code=sform_code)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"synthetic CT"
    nib.save(img, str(path))
    return path


ORIENTATIONS = {
    "axial": ("R", "A", "S"),
    "axial-lps": ("L", "P", "S"),
    "coronal": ("L", "I", "A"),
    "sagittal": ("P", "S", "R"),
}


def test_nifti_in_any_axis_order_gives_the_same_canonical_slices(anatomy, tmp_path):
    for name, codes in ORIENTATIONS.items():
        data, affine = stored(anatomy, codes)
        path = save_nifti(tmp_path / f"{name}.nii.gz", data, affine)
        assert nib.aff2axcodes(nib.load(path).affine) == codes
        v = volumes.read_volume(path)
        assert v.kind == "nifti" and v.source_shape == data.shape
        np.testing.assert_array_equal(v.data, anatomy.astype(np.float32), err_msg=name)
        assert v.data.dtype == np.float32 and not v.data.flags.writeable
        np.testing.assert_allclose(v.spacing, SPACING, rtol=1e-6)
        np.testing.assert_allclose(v.affine, affine)
        # canonical voxel (c, r, k) is at RAS: right-to-left columns, front-to-back rows
        c = v.canonical_affine
        assert c[0, 0] < 0 and c[1, 1] < 0 and c[2, 2] > 0
        np.testing.assert_allclose(v.to_source(v.data), data)
        assert io.slice_count(path) == K
        assert volumes.volume_shape(path) == (K, N, N)
        np.testing.assert_allclose(volumes.volume_spacing(path), SPACING, rtol=1e-6)
        np.testing.assert_allclose(io.read_image(path, 5), io.Window()(anatomy[5]), atol=1e-6)
        # an uncompressed file is read one slice at a time from disk: the same slices
        flat = save_nifti(tmp_path / f"{name}.nii", data, affine)
        for k in (0, 5, K - 1):
            np.testing.assert_array_equal(volumes.read_slice(flat, k), anatomy[k], err_msg=name)
        np.testing.assert_array_equal(io.read_mask(flat, 3), anatomy[3])
        with pytest.raises(DataError, match="out of range"):
            volumes.read_slice(flat, K)


def test_lps_stored_nifti_reads_as_the_transposed_array(anatomy, tmp_path):
    """A NIfTI stored like a DICOM pixel array (i to the left, j to the back) is data[:, :, k].T,
    the reading of earlier versions for every NIfTI."""
    data, affine = stored(anatomy, ("L", "P", "S"))
    path = save_nifti(tmp_path / "lps.nii", data, affine)
    for k in (0, 7):
        np.testing.assert_allclose(io.read_image(path, k), io.Window()(data[:, :, k].T), atol=1e-6)


@pytest.fixture(scope="module")
def rule(tmp_path_factory):
    """The threshold rule of tests/test_predict.py: deterministic, no training."""
    return ThresholdRule(0.25, 0.5, 64).save(tmp_path_factory.mktemp("rule") / "rule.json")


def test_predict_gives_the_same_labels_for_every_storage_order(anatomy, rule, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    stores = {}
    for name, codes in ORIENTATIONS.items():
        data, affine = stored(anatomy, codes)
        stores[name] = (save_nifti(inputs / f"{name}.nii.gz", data, affine), data, affine)
    predict_path(rule, inputs, tmp_path / "out")
    canonical = {}
    for name, (path, data, affine) in stores.items():
        out = tmp_path / "out" / f"{name}_labels.nii.gz"
        img = nib.load(out)
        assert img.shape == data.shape and img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        hdr, src = img.header, nib.load(path).header
        for field in ("qform_code", "sform_code", "xyzt_units"):
            assert hdr[field] == src[field], field
        assert hdr.get_intent()[0] == "label" and b"stitchnet-tf" in hdr["descrip"].tobytes()
        canonical[name] = volumes.read_volume(out).data
        for k in (0, 6):  # a label volume read back as masks lines up with its image's slices
            np.testing.assert_array_equal(io.read_mask(out, k), canonical[name][k])
    first = canonical["axial"]
    assert (first > 0).sum() > 100 and (first >= 2).sum() > 0  # lung and lesion found
    for name, labels in canonical.items():
        np.testing.assert_array_equal(labels, first, err_msg=name)
    with open(tmp_path / "out" / "burden.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["level"] == "volume"]
    assert len({r["lung_px"] for r in rows}) == 1 and int(rows[0]["lung_px"]) == (first > 0).sum()


# --------------------------------------------------------------------------- DICOM


def write_dicom(
    path,
    hu,
    *,
    position,
    orientation=(1, 0, 0, 0, 1, 0),
    series="1.2.826.0.1.3680043.7.1",
    modality="CT",
    description="",
    number=1,
    slope=1.0,
    intercept=-1024.0,
):
    """A CT-like single-frame DICOM file of `hu` (stored as (hu - intercept) / slope)."""
    return write_ct_dicom(
        path,
        hu=hu,
        slope=slope,
        intercept=intercept,
        position=position,
        orientation=orientation,
        pixel_spacing=(SPACING[1], SPACING[2]),  # row spacing, column spacing
        thickness=SPACING[0],
        series=series,
        study="1.2.826.0.1.3680043.7.100",
        frame_of_reference="1.2.826.0.1.3680043.7.300",
        number=number,
        modality=modality,
        description=description,
        patient_id="P1",
    )


#: LPS origin of the series: the first slice's top left pixel
LPS_ORIGIN = np.array([-160.25, -95.5, -312.75])


def write_series(folder, anatomy, orientation=(1, 0, 0, 0, 1, 0), **kw) -> list:
    """The anatomy's slices as an axial DICOM series in `folder` (slice k at LPS_ORIGIN + k
    slice spacings up), file names in no position order. Returns (file, pixel array HU,
    ImagePositionPatient) of each instance in order of position along the slice normal."""
    folder.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    order = np.random.default_rng(0).permutation(K)
    out = []
    for k in range(K):
        pixels = anatomy[k]
        if orientation[0] < 0:  # columns run to the patient's right: mirror the pixel array
            pixels = pixels[:, ::-1]
        position = LPS_ORIGIN + [0.0, 0.0, k * SPACING[0]]
        name = folder / f"IM{order[k]:04d}"  # no suffix: found by the DICM magic
        write_dicom(name, pixels, position=position, orientation=orientation, number=K - k, **kw)
        out.append((name, pixels, position))
    return sorted(out, key=lambda t: float(np.dot(normal, t[2])))


def dicom_affine_by_hand(orientation, origin=LPS_ORIGIN) -> np.ndarray:
    """RAS affine of (column, row, slice) voxels, from the DICOM equation written out; `origin`
    is the position of the first slice along the normal."""
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * SPACING[2]  # one column further: along the row direction
    lps[:3, 1] = col_dir * SPACING[1]  # one row further: along the column direction
    lps[:3, 2] = np.cross(row_dir, col_dir) * SPACING[0]
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (-1, 0, 0, 0, 1, 0)])
def test_dicom_series_affine_and_canonical_slices(anatomy, tmp_path, orientation):
    files = write_series(tmp_path / "series", anatomy, orientation)
    v = volumes.read_volume(tmp_path / "series")
    assert v.kind == "dicom-series" and v.source_shape == (N, N, K)
    expected = dicom_affine_by_hand(orientation, origin=files[0][2])
    np.testing.assert_allclose(v.affine, expected, atol=1e-3)
    np.testing.assert_array_equal(v.data, anatomy.astype(np.float32))  # rescale applied
    np.testing.assert_allclose(v.spacing, SPACING, rtol=1e-5)
    assert [f.name for f, *_ in files] == [p.rsplit("/", 1)[-1] for p in v.series.files]
    # the source voxel order is (column, row, slice) of the instances sorted by position
    source, per_file = v.to_source(v.data), v.to_stored_slices(v.data)
    assert per_file.shape == (K, N, N) and v.files == v.series.files
    for k, (_, pixels, _) in enumerate(files):
        np.testing.assert_array_equal(source[:, :, k].T, pixels)
        np.testing.assert_array_equal(per_file[k], pixels)  # what a DICOM-SEG needs
    assert io.slice_count(tmp_path / "series") == K
    for k in range(K):  # read one file per slice (training's random access): the same slices
        np.testing.assert_array_equal(volumes.read_slice(tmp_path / "series", k), v.data[k])


def test_dicom_tree_with_two_series_and_predict_overlays_the_source(anatomy, rule, tmp_path):
    inputs = tmp_path / "in"
    tree = inputs / "patient"
    files = write_series(tree / "study" / "series_ct", anatomy)
    small = tree / "study" / "series_small"  # a second, smaller axial CT series
    small.mkdir(parents=True)
    for k in range(3):
        write_dicom(small / f"s{k}.dcm", anatomy[k], position=LPS_ORIGIN + [0, 0, 40 * k],
                    series="1.2.826.0.1.3680043.7.2", description="small", number=k)  # fmt: skip
    (tree / "DICOMDIR").write_bytes(b"\0" * 200)  # ignored by name
    (tree / "study" / "notes.txt").write_text("not DICOM")  # ignored: no magic, no suffix
    # every instance's HU as a 2-D slice: predict segments it on its own for comparison
    for k, (_, pixels, _) in enumerate(files):
        np.save(inputs / f"instance_{k:02d}.npy", pixels.astype(np.float32))
    lines = []
    predict_path(rule, inputs, tmp_path / "out", log=lines.append)
    assert len(lines) == 1 and "2 DICOM series found" in lines[0]
    assert "1.2.826.0.1.3680043.7.1" in lines[0] and "'small' (3 slices, CT)" in lines[0]
    img = nib.load(tmp_path / "out" / "patient_labels.nii.gz")
    np.testing.assert_allclose(img.affine, dicom_affine_by_hand((1, 0, 0, 0, 1, 0)), atol=1e-3)
    assert img.shape == (N, N, K) and img.header["sform_code"] == 1
    labels = np.asarray(img.dataobj)
    from PIL import Image

    found = 0
    for k in range(K):
        alone = np.asarray(Image.open(tmp_path / "out" / f"instance_{k:02d}_labels.png"))
        np.testing.assert_array_equal(labels[:, :, k].T, alone, err_msg=f"instance {k}")
        found += int((alone > 0).sum())
    assert found > 100  # the slices do have lung: the comparison means something
    # the DICOM-SEG overlays the series: instance by instance, the NIfTI's labels
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(tmp_path / "out" / "patient_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.826.0.1.3680043.7.1"
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f, *_ in files]
    by_instance = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(by_instance, np.transpose(labels, (2, 1, 0)))
    stats = json.loads((tmp_path / "out" / "statistics.json").read_text())
    entry = next(e for e in stats["entries"] if e["input"].endswith("patient"))
    voxel_ml = float(np.prod(SPACING)) / 1000
    assert entry["spacing_known"] and entry["voxel_volume_ml"] == pytest.approx(voxel_ml)
    assert entry["lung_ml"] == pytest.approx((labels > 0).sum() * voxel_ml, rel=1e-6)
    assert entry["provenance"]["model"]["class"] == "ThresholdRule"
    sidecar = json.loads((tmp_path / "out" / "patient_labels.json").read_text())
    assert [d["value"] for d in sidecar["labels"]] == [0, 1, 2, 3]


def _tree_of_four_series(root, anatomy):
    """CT axial 6 slices (A), CT coronal 9 (B), MR axial 10 (C), CT axial 4 (D)."""
    uids = {s: f"1.2.826.0.1.3680043.7.{i}" for i, s in enumerate("ABCD", 10)}
    for k in range(6):
        write_dicom(root / "a" / f"{k}.dcm", anatomy[k], position=[0, 0, 2.5 * k],
                    series=uids["A"], description="axial")  # fmt: skip
    for k in range(9):
        write_dicom(root / "b" / f"{k}.dcm", anatomy[k], position=[0, 3.0 * k, 0],
                    orientation=(1, 0, 0, 0, 0, -1), series=uids["B"])  # fmt: skip
    for k in range(10):
        write_dicom(root / "c" / f"{k}.dcm", anatomy[k], position=[0, 0, 2.5 * k],
                    series=uids["C"], modality="MR")  # fmt: skip
    for k in range(4):
        write_dicom(root / "d" / f"{k}.dcm", anatomy[k], position=[0, 0, 5.0 * k],
                    series=uids["D"], description="thick")  # fmt: skip
    return uids


def test_several_series_default_pick_and_unknown_uid(anatomy, rule, tmp_path):
    root = tmp_path / "study"
    for sub in "abcd":
        (root / sub).mkdir(parents=True)
    uids = _tree_of_four_series(root, anatomy)
    assert volumes.read_volume(root).series.uid == uids["A"]  # CT, axial, then most slices
    assert volumes.read_volume(root, series=uids["B"]).data.shape == (N, 9, N)  # coronal
    assert io.dicom_series_files(root, uids["D"])[0].endswith("d/0.dcm")
    with pytest.raises(DataError) as ei:
        volumes.read_volume(root, series="9.9.9")
    msg = str(ei.value)
    assert "\n" not in msg and str(root) in msg and "9.9.9" in msg
    assert all(uid in msg for uid in uids.values())
    result = predict_path(rule, root, tmp_path / "out", series=uids["D"])
    assert result == {
        "slices": 4,
        "volumes": 1,
        "burden": str(tmp_path / "out" / "burden.csv"),
        "statistics": str(tmp_path / "out" / "statistics.json"),
    }
    assert nib.load(tmp_path / "out" / "study_labels.nii.gz").shape == (N, N, 4)
    with pytest.raises(DataError) as ei:
        predict_path(rule, root, tmp_path / "out2", series="9.9.9")
    assert uids["A"] in str(ei.value)


# --------------------------------------------------------------------------- errors, reads


def test_missing_and_corrupt_volumes_are_one_line_errors(anatomy, rule, tmp_path):
    for path in (tmp_path / "nope.nii.gz", tmp_path / "nope-folder"):
        with pytest.raises(DataError) as ei:
            volumes.read_volume(path)
        assert str(path) in str(ei.value) and "\n" not in str(ei.value)
    data, affine = stored(anatomy, ("R", "A", "S"))
    (tmp_path / "in").mkdir()
    path = save_nifti(tmp_path / "in" / "cut.nii.gz", data, affine)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    for call in (volumes.read_volume, lambda p: io.read_image(p, 0)):
        with pytest.raises(DataError) as ei:
            call(path)
        msg = str(ei.value)
        assert msg.startswith(f"{path}: ") and "NIfTI" in msg and "\n" not in msg
    with pytest.raises(DataError) as ei:
        predict_path(rule, tmp_path / "in", tmp_path / "out")
    assert str(path) in str(ei.value) and "NIfTI" in str(ei.value)
    tree = tmp_path / "tree" / "series"
    write_series(tree, anatomy)
    bad = sorted(tree.iterdir())[3]
    bad.write_bytes(bad.read_bytes()[:-1000])  # pixel data cut short
    with pytest.raises(DataError) as ei:
        volumes.read_volume(tmp_path / "tree")
    assert str(bad) in str(ei.value) and "DICOM" in str(ei.value)


def test_slices_of_a_volume_read_it_once(anatomy, tmp_path, monkeypatch):
    data, affine = stored(anatomy, ("L", "I", "A"))
    path = save_nifti(tmp_path / "v.nii.gz", data, affine)
    calls = []
    read = volumes.read_volume
    monkeypatch.setattr(volumes, "read_volume", lambda p, s=None: calls.append(p) or read(p, s))
    volumes.clear_cache()
    slices = [io.read_image(path, k) for k in range(K)]
    masks = [io.read_mask(path, k) for k in range(2)]
    assert len(calls) == 1
    np.testing.assert_allclose(np.stack(slices), io.Window()(anatomy), atol=1e-6)
    np.testing.assert_array_equal(masks[1], anatomy[1])
    save_nifti(path, data + 1, affine)  # rewritten: read again
    import os

    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    np.testing.assert_array_equal(io.read_mask(path, 1), anatomy[1] + 1)
    assert len(calls) == 2
    slices[0][:] = 0  # the caller's copy, not the cache
    np.testing.assert_allclose(io.read_image(path, 0), io.Window()(anatomy[0] + 1), atol=1e-6)


def test_multiframe_dicom_geometry_from_functional_groups(anatomy, tmp_path):
    from pydicom.dataset import Dataset

    path = write_dicom(tmp_path / "one.dcm", anatomy[0], position=LPS_ORIGIN)
    import pydicom

    ds = pydicom.dcmread(path)
    frames = 4
    stored_values = np.rint(anatomy[:frames] + 1024).astype("<i2")
    ds.NumberOfFrames = frames
    ds.PixelData = stored_values.tobytes()
    del ds.ImagePositionPatient
    per_frame = []
    for f in range(frames):
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = list(LPS_ORIGIN + [0, 0, SPACING[0] * f])
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.save_as(path)
    v = volumes.read_volume(path)
    assert v.kind == "dicom" and v.data.shape == (frames, N, N)
    np.testing.assert_array_equal(v.data, anatomy[:frames].astype(np.float32))
    expected = dicom_affine_by_hand((1, 0, 0, 0, 1, 0))
    np.testing.assert_allclose(v.affine, expected, atol=1e-3)
    assert io.slice_count(path) == frames
