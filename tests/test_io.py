"""Readers for slices, NIfTI and DICOM volumes, masks, and their one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stitchnet_tf.data import io
from stitchnet_tf.data.classes import MaskValueMap
from stitchnet_tf.errors import DataError

H, W = 40, 48
LEVEL, WIDTH = -600.0, 1500.0


def windowed(hu, level=LEVEL, width=WIDTH):
    """The documented lung-window formula, written out independently of the library."""
    return np.clip((np.asarray(hu, np.float64) - (level - width / 2)) / width, 0, 1)


def hu_slice(seed=0):
    """int16 HU values well beyond both ends of the lung window (-1350 .. 150)."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-2000, 1200, (H, W)).astype(np.int16)
    hu[0, :4] = [-1350, 150, -600, -1000]  # window edges and centre
    return hu


def grey8(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (H, W), dtype=np.uint8)


def assert_one_line(excinfo, path):
    """A DataError whose message is one line naming `path`."""
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert excinfo.value.path == str(path)
    return msg


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "suffix", "stem"),
    [
        ("a/ct.png", ".png", "ct"),
        ("v.nii.gz", ".nii.gz", "v"),
        ("V.NII.GZ", ".nii.gz", "V"),
        ("x.nii", ".nii", "x"),
        ("scan.1.dcm", ".dcm", "scan.1"),
        ("noext", "", "noext"),
    ],
)
def test_suffix_and_stem(name, suffix, stem):
    assert io.suffix_of(name) == suffix
    assert io.stem_of(name) == stem


# --------------------------------------------------------------------------- slices


def _check_unit(out, shape=(H, W)):
    assert out.dtype == np.float32
    assert out.shape == shape
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff"])
def test_8bit_slice_files_are_scaled_by_1_over_255(tmp_path, suffix):
    a = grey8()
    path = tmp_path / f"s{suffix}"
    Image.fromarray(a).save(path)
    assert io.kind_of(path) == "slice"
    assert io.slice_count(path) is None
    out = io.read_image(path)
    _check_unit(out)
    np.testing.assert_allclose(out, a / 255.0, atol=1e-7)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg"])
def test_jpeg_is_read_approximately(tmp_path, suffix):
    yy, xx = np.mgrid[0:H, 0:W]
    a = (20 + 2 * xx + 2 * yy).astype(np.uint8)  # 20 .. 192  # smooth: small JPEG error
    path = tmp_path / f"s{suffix}"
    Image.fromarray(a).save(path, quality=95)
    out = io.read_image(path)
    _check_unit(out)
    assert np.abs(out - a / 255.0).max() < 0.03
    assert out[-1, -1] > out[0, 0] + 0.5  # the gradient survives


def test_uint16_png_is_scaled_by_1_over_65535(tmp_path):
    a = np.random.default_rng(1).integers(0, 65536, (H, W)).astype(np.uint16)
    a[0, 0], a[0, 1] = 0, 65535
    path = tmp_path / "s16.png"
    Image.fromarray(a).save(path)
    out = io.read_image(path)
    _check_unit(out)
    np.testing.assert_allclose(out, a / 65535.0, atol=1e-6)
    assert out[0, 1] == 1.0


def test_rgb_png_with_equal_channels_is_its_grey_plane(tmp_path):
    a = grey8(2)
    path = tmp_path / "rgb.png"
    Image.fromarray(np.stack([a, a, a], axis=-1)).save(path)
    assert Image.open(path).mode == "RGB"
    out = io.read_image(path)
    _check_unit(out)
    np.testing.assert_allclose(out, a / 255.0, atol=1e-7)


def test_npy_uint8(tmp_path):
    a = grey8(3)
    np.save(tmp_path / "s.npy", a)
    out = io.read_image(tmp_path / "s.npy")
    _check_unit(out)
    np.testing.assert_allclose(out, a / 255.0, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_npy_float_in_unit_range_is_kept(tmp_path, dtype):
    a = np.random.default_rng(4).random((H, W)).astype(dtype)
    a[0, 0], a[0, 1] = 0.0, 1.0
    np.save(tmp_path / "f.npy", a)
    out = io.read_image(tmp_path / "f.npy")
    _check_unit(out)
    np.testing.assert_allclose(out, a, atol=1e-7)


def test_npy_with_a_channel_axis_is_a_slice(tmp_path):
    a = grey8(5)
    np.save(tmp_path / "c.npy", a[..., None])
    np.testing.assert_allclose(io.read_image(tmp_path / "c.npy"), a / 255.0, atol=1e-7)


@pytest.mark.parametrize(
    ("window", "level", "width"),
    [(io.Window(), LEVEL, WIDTH), (io.Window(40.0, 400.0), 40.0, 400.0)],
)
def test_npy_int16_hu_is_windowed(tmp_path, window, level, width):
    hu = hu_slice()
    np.save(tmp_path / "hu.npy", hu)
    out = io.read_image(tmp_path / "hu.npy", window=window)
    _check_unit(out)
    np.testing.assert_allclose(out, windowed(hu, level, width), atol=1e-6)
    # both clip ends are reached and the values in between are not quantised to 8 bits
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.abs(out * 255 - np.round(out * 255)).max() > 0.1


def test_default_window_is_the_lung_window():
    assert (io.Window().level, io.Window().width) == (LEVEL, WIDTH)
    np.testing.assert_allclose(
        io.Window()(np.array([-1350.0, -600.0, 150.0, -975.0])), [0.0, 0.5, 1.0, 0.25]
    )


def test_npy_float_hu_outside_unit_range_is_windowed(tmp_path):
    hu = hu_slice(6).astype(np.float32) + 0.25
    np.save(tmp_path / "hu.npy", hu)
    np.testing.assert_allclose(io.read_image(tmp_path / "hu.npy"), windowed(hu), atol=1e-6)


# --------------------------------------------------------------------------- NIfTI


def _nifti(path, data, slope_inter=None):
    import nibabel as nib

    img = nib.Nifti1Image(data, np.eye(4))
    img.set_data_dtype(data.dtype)
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    nib.save(img, str(path))
    return path


def view(data, k):
    """Slice k as `io` reads it. These volumes have an identity (RAS) affine: the canonical
    radiological view (rows anterior -> posterior, columns patient right -> left; see
    `volumes`) flips both stored axes of data[:, :, k] and transposes it."""
    return data[::-1, ::-1, k].T


def hu_volume(seed=0, n=5):
    return np.random.default_rng(seed).integers(-1800, 900, (W, H, n)).astype(np.int16)


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_nifti_hu_volume_slices(tmp_path, name):
    data = hu_volume()
    path = _nifti(tmp_path / name, data)
    assert io.kind_of(path) == "nifti"
    assert io.slice_count(path) == 5
    for k in range(5):
        out = io.read_image(path, k)
        _check_unit(out)  # (i, j) = (48, 40) stored -> 40 rows x 48 columns
        np.testing.assert_allclose(out, windowed(view(data, k)), atol=1e-6)
    np.testing.assert_allclose(io.read_image(path), windowed(view(data, 0)), atol=1e-6)
    np.testing.assert_allclose(
        io.read_image(path, 2, window=io.Window(40, 400)),
        windowed(view(data, 2), 40, 400),
        atol=1e-6,
    )


@pytest.mark.parametrize("name", ["m.nii", "m.nii.gz"])
def test_nifti_label_volume_read_as_masks(tmp_path, name):
    labels = np.random.default_rng(1).integers(0, 3, (W, H, 4)).astype(np.uint8)
    path = _nifti(tmp_path / name, labels)
    assert io.slice_count(path) == 4
    for k in range(4):
        m = io.read_mask(path, k)
        assert m.dtype == np.int64
        np.testing.assert_array_equal(m, view(labels, k))
    np.testing.assert_array_equal(io.read_lung(path, 3), view(labels, 3) != 0)


def test_nifti_scl_slope_and_inter_are_applied(tmp_path):
    raw = np.random.default_rng(2).integers(0, 1400, (W, H, 3)).astype(np.int16)
    path = _nifti(tmp_path / "scaled.nii.gz", raw, slope_inter=(2.0, -1024.0))
    import nibabel as nib

    assert nib.load(str(path)).dataobj.slope == 2.0  # the header really carries the scaling
    hu = raw.astype(np.float64) * 2.0 - 1024.0
    for k in range(3):
        np.testing.assert_allclose(io.read_image(path, k), windowed(view(hu, k)), atol=1e-6)


def test_nifti_uint8_is_scaled_by_1_over_255(tmp_path):
    data = np.random.default_rng(3).integers(0, 256, (W, H, 2)).astype(np.uint8)
    path = _nifti(tmp_path / "u8.nii", data)
    out = io.read_image(path, 1)
    _check_unit(out)
    np.testing.assert_allclose(out, view(data, 1) / 255.0, atol=1e-7)


@pytest.mark.parametrize("k", [5, -1, 99])
def test_nifti_slice_out_of_range(tmp_path, k):
    path = _nifti(tmp_path / "v.nii.gz", hu_volume())
    with pytest.raises(DataError) as ei:
        io.read_image(path, k)
    msg = assert_one_line(ei, path)
    assert "out of range" in msg and "5 slices" in msg
    with pytest.raises(DataError):
        io.read_mask(path, k)


def test_nifti_4d_with_one_frame(tmp_path):
    data = hu_volume(4, n=3)
    p4 = _nifti(tmp_path / "four.nii", data[..., None])
    assert io.slice_count(p4) == 3
    np.testing.assert_allclose(io.read_image(p4, 2), windowed(view(data, 2)), atol=1e-6)
    labels = (data > 0).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(
        io.read_mask(_nifti(tmp_path / "m4.nii", labels), 1), view(labels[..., 0], 1)
    )


def test_nifti_2d_is_one_slice(tmp_path):
    data = hu_volume(4, n=3)
    p2 = _nifti(tmp_path / "two.nii", data[:, :, 1])
    assert io.slice_count(p2) == 1
    np.testing.assert_allclose(io.read_image(p2, 0), windowed(view(data, 1)), atol=1e-6)


@pytest.mark.parametrize("name", ["bad.nii", "bad.nii.gz"])
def test_corrupt_and_truncated_nifti(tmp_path, name):
    junk = tmp_path / f"junk_{name}"
    junk.write_bytes(np.random.default_rng(5).bytes(600))
    with pytest.raises(DataError) as ei:
        io.read_image(junk)
    assert "NIfTI" in assert_one_line(ei, junk)

    path = _nifti(tmp_path / name, hu_volume(6))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as ei:
        io.read_image(path, 4)  # the last slice lies in the missing half
    assert "NIfTI" in assert_one_line(ei, path)


# --------------------------------------------------------------------------- DICOM


def test_dicom_file_is_rescaled_then_windowed(tmp_path, write_ct_dicom):
    stored = np.random.default_rng(7).integers(-500, 1500, (H, W)).astype(np.int16)
    path = write_ct_dicom(tmp_path / "one.dcm", stored, slope=2.0, intercept=-1024.0)
    assert io.kind_of(path) == "dicom"
    assert io.slice_count(path) == 1
    out = io.read_image(path)
    _check_unit(out)
    np.testing.assert_allclose(out, windowed(stored * 2.0 - 1024.0), atol=1e-6)
    np.testing.assert_allclose(
        io.read_image(path, 0, window=io.Window(40, 400)),
        windowed(stored * 2.0 - 1024.0, 40, 400),
        atol=1e-6,
    )
    with pytest.raises(DataError) as ei:
        io.read_image(path, 1)
    assert "out of range" in assert_one_line(ei, path)


def test_dicom_series_sorts_by_position_not_name_or_number(tmp_path, write_ct_dicom):
    folder = tmp_path / "series"
    folder.mkdir()
    # (file name, z, instance number, HU value): names and numbers disagree with z
    slices = [("a.dcm", 30.0, 1, -300), ("b.dcm", -5.0, 3, -1200), ("c", 10.0, 2, -600)]
    slices.append(("d.dcm", 2.5, 4, -900))
    for name, z, number, value in slices:
        stored = np.full((H, W), value, np.int16)
        write_ct_dicom(folder / name, stored, z=z, series="1.2.826.0.1.5", number=number)
    assert io.kind_of(folder) == "dicom-series"
    assert io.slice_count(folder) == 4
    by_z = [v for _, _, _, v in sorted(slices, key=lambda s: s[1])]  # -1200, -900, -600, -300
    for k, value in enumerate(by_z):
        out = io.read_image(folder, k)
        _check_unit(out)
        np.testing.assert_allclose(out, np.full((H, W), windowed(value)), atol=1e-6)
    assert [p.rsplit("/", 1)[-1] for p in io.dicom_series_files(str(folder))] == [
        "b.dcm",
        "d.dcm",
        "c",
        "a.dcm",
    ]
    with pytest.raises(DataError) as ei:
        io.read_image(folder, 4)
    assert "4 slices" in assert_one_line(ei, folder)


def test_dicom_folder_with_two_series_reads_the_larger_or_the_one_asked_for(
    tmp_path, write_ct_dicom
):
    # was: a folder of two series was an error; now the largest axial CT series is read and
    # `series=` picks another (volumes.choose_series); an unknown UID lists the series there are
    folder = tmp_path / "mixed"
    folder.mkdir()
    s1, s2 = "1.2.826.0.1.111", "1.2.826.0.1.222"
    for i in range(3):
        write_ct_dicom(folder / f"x{i}.dcm", np.full((H, W), -800), z=i, series=s1, number=i)
    for i in range(2):
        write_ct_dicom(folder / f"y{i}.dcm", np.full((H, W), -300), z=i, series=s2, number=i)
    assert io.slice_count(folder) == 3
    np.testing.assert_allclose(io.read_image(folder, 2), windowed(np.full((H, W), -800)))
    names = [p.rsplit("/", 1)[-1] for p in io.dicom_series_files(folder, series=s2)]
    assert names == ["y0.dcm", "y1.dcm"]
    with pytest.raises(DataError) as ei:
        io.dicom_series_files(folder, series="1.2.3.999")
    msg = assert_one_line(ei, folder)
    assert s1 in msg and s2 in msg and "1.2.3.999" in msg


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as ei:
        io.slice_count(tmp_path / "empty")
    assert "empty" in assert_one_line(ei, tmp_path / "empty")


def test_dcm_suffix_that_is_not_dicom(tmp_path):
    path = tmp_path / "fake.dcm"
    path.write_bytes(np.random.default_rng(8).bytes(400))
    assert io.kind_of(path) == "dicom"  # by suffix; reading tells the truth
    for call in (io.read_image, io.slice_count):
        with pytest.raises(DataError) as ei:
            call(path)
        assert "DICOM" in assert_one_line(ei, path)


def test_dicom_without_suffix_is_recognised_by_magic(tmp_path, write_ct_dicom):
    stored = hu_slice(9)
    path = write_ct_dicom(tmp_path / "IM000123", stored)
    assert path.read_bytes()[128:132] == b"DICM"
    assert io.kind_of(path) == "dicom"
    assert io.slice_count(path) == 1
    np.testing.assert_allclose(io.read_image(path), windowed(stored), atol=1e-6)


def test_dicom_is_not_a_mask(tmp_path, write_ct_dicom):
    path = write_ct_dicom(tmp_path / "m.dcm", np.zeros((H, W)))
    with pytest.raises(DataError) as ei:
        io.read_mask(path)
    assert "masks must be" in assert_one_line(ei, path)


# --------------------------------------------------------------------------- masks


def _index_mask():
    m = np.zeros((H, W), np.uint8)
    m[5:15, 4:20] = 1
    m[20:35, 24:44] = 2
    return m


def test_indexed_palette_png_is_read_by_index_not_luminance(tmp_path):
    m = _index_mask()
    path = tmp_path / "mask.png"
    img = Image.frombytes("P", (W, H), m.tobytes())
    img.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 253))  # 1 dark red, 2 green
    img.save(path)
    reopened = Image.open(path)
    assert reopened.mode == "P"
    lum = np.unique(np.array(reopened.convert("L")))
    assert set(lum.tolist()) != {0, 1, 2}  # a colour-to-grey reader would get luminance
    out = io.read_mask(path)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, m)
    allowed = MaskValueMap.parse(None).to_allowed(out, str(path))
    assert set(np.unique(allowed).tolist()) == {3, 4, 8}


def test_write_png_with_palette_round_trips(tmp_path):
    m = _index_mask()
    io.write_png(tmp_path / "w.png", m, palette=[0, 0, 0, 128, 0, 0, 0, 128, 0])
    assert Image.open(tmp_path / "w.png").mode == "P"
    np.testing.assert_array_equal(io.read_mask(tmp_path / "w.png"), m)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".npy"])
def test_greyscale_0_255_mask(tmp_path, suffix):
    m = (_index_mask() > 0).astype(np.uint8) * 255
    path = tmp_path / f"bin{suffix}"
    np.save(path, m) if suffix == ".npy" else Image.fromarray(m).save(path)
    out = io.read_mask(path)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, m)
    np.testing.assert_array_equal(io.read_lung(path), m > 0)


def test_bool_and_integer_float_masks(tmp_path):
    m = _index_mask()
    np.save(tmp_path / "b.npy", m > 0)
    np.testing.assert_array_equal(io.read_mask(tmp_path / "b.npy"), (m > 0) * 255)
    np.save(tmp_path / "f.npy", m.astype(np.float32))
    np.testing.assert_array_equal(io.read_mask(tmp_path / "f.npy"), m)


def test_rgb_mask_with_equal_channels_is_grey(tmp_path):
    m = (_index_mask() > 0).astype(np.uint8) * 255
    Image.fromarray(np.stack([m, m, m], -1)).save(tmp_path / "g.png")
    np.testing.assert_array_equal(io.read_mask(tmp_path / "g.png"), m)


def test_true_colour_rgb_mask_is_an_error(tmp_path):
    m = _index_mask()
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[m == 1] = (128, 0, 0)
    rgb[m == 2] = (0, 128, 0)
    path = tmp_path / "colour.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(DataError) as ei:
        io.read_mask(path)
    assert "palette" in assert_one_line(ei, path)


@pytest.mark.parametrize("bad", [0.5, np.nan])
def test_float_npy_mask_with_non_integers_is_an_error(tmp_path, bad):
    m = _index_mask().astype(np.float32)
    m[3, 3] = bad
    path = tmp_path / "m.npy"
    np.save(path, m)
    with pytest.raises(DataError) as ei:
        io.read_mask(path)
    assert "non-integer" in assert_one_line(ei, path)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call", [io.kind_of, io.read_image, io.read_mask, io.slice_count])
def test_missing_file(tmp_path, call):
    path = tmp_path / "nope.png"
    with pytest.raises(DataError) as ei:
        call(path)
    assert "not found" in assert_one_line(ei, path)


@pytest.mark.parametrize("call", [io.read_image, io.read_mask])
def test_corrupt_png(tmp_path, call):
    path = tmp_path / "corrupt.png"
    path.write_bytes(np.random.default_rng(10).bytes(700))
    with pytest.raises(DataError) as ei:
        call(path)
    assert "corrupt" in assert_one_line(ei, path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("call", [io.read_image, io.read_mask])
def test_truncated_png_and_jpeg(tmp_path, suffix, call):
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(grey8(11)).save(path)  # noise: the pixel data fills most of the file
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as ei:
        call(path)
    msg = assert_one_line(ei, path)
    assert "truncated" in msg


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image\nsecond line\n")
    for call in (io.kind_of, io.read_image, io.read_mask, io.slice_count):
        with pytest.raises(DataError) as ei:
            call(path)
        assert "not a supported image file" in assert_one_line(ei, path)


def test_check_size(tmp_path):
    path = tmp_path / "small.png"
    with pytest.raises(DataError) as ei:
        io.check_size((20, 40), path)
    assert "20x40" in assert_one_line(ei, path)
    with pytest.raises(DataError):
        io.check_size((40, 31), path)
    io.check_size((32, 32), path)  # the smallest allowed
    io.check_size((H, W, 1), path)


@pytest.mark.parametrize("shape", [(5, H, W), (H,), (2, 3, H, W)])
def test_npy_that_is_not_a_slice(tmp_path, shape):
    path = tmp_path / "vol.npy"
    np.save(path, np.zeros(shape, np.uint8))
    for call in (io.read_image, io.read_mask):
        with pytest.raises(DataError) as ei:
            call(path)
        assert "2-D" in assert_one_line(ei, path)


def test_corrupt_and_non_finite_npy(tmp_path):
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(DataError) as ei:
        io.read_image(junk)
    assert ".npy" in assert_one_line(ei, junk)
    path = tmp_path / "nan.npy"
    a = hu_slice().astype(np.float32)
    a[1, 1] = np.inf
    np.save(path, a)
    with pytest.raises(DataError) as ei:
        io.read_image(path)
    assert "NaN or infinite" in assert_one_line(ei, path)


def test_dicom_series_cache_sees_new_files(tmp_path, write_ct_dicom):
    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(3):
        write_ct_dicom(folder / f"{k}.dcm", np.full((40, 40), k, np.int16), z=float(k), number=k)
    assert io.slice_count(folder) == 3
    import os
    import time

    time.sleep(0.01)
    write_ct_dicom(folder / "3.dcm", np.full((40, 40), 3, np.int16), z=3.0, number=3)
    os.utime(folder, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert io.slice_count(folder) == 4
