"""Lung-field preprocessing: crop / pad / resize geometry and its inverse."""

import numpy as np
import pytest

from stitchnet_tf.data.classes import ALL, BACKGROUND, GGO, HEALTHY, NO_LESION, MaskValueMap, bits
from stitchnet_tf.data.datasets import Sample
from stitchnet_tf.data.io import write_png
from stitchnet_tf.data.preprocess import (
    Geometry,
    RawSlice,
    check_model_size,
    output_name,
    prepare,
    read_sample,
)
from stitchnet_tf.errors import DataError


def _blobs(shape=(300, 220)):
    """A lung field of two ellipses and a lesion label inside the left one."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    left = ((yy - 150) / 90) ** 2 + ((xx - 70) / 40) ** 2 < 1
    right = ((yy - 140) / 80) ** 2 + ((xx - 150) / 35) ** 2 < 1
    lesion = ((yy - 170) / 20) ** 2 + ((xx - 60) / 15) ** 2 < 1
    return left | right, lesion


def test_geometry_box_pad_and_exact_round_trip_at_native_side():
    field, _ = _blobs()
    g = Geometry.from_field(field, 128, margin=0.05)
    ys, xs = np.nonzero(field)
    y0, y1, x0, x1 = g.box
    assert y0 < ys.min() and y1 > ys.max() + 1 and x0 < xs.min() and x1 > xs.max() + 1
    assert g.side == max(y1 - y0, x1 - x0) and g.pad[0] == 0 and g.pad[1] > 0
    labels = np.random.default_rng(0).integers(0, 4, field.shape).astype(np.uint8)
    native = Geometry(g.orig_shape, g.box, g.pad, g.side, g.side)
    back = native.to_original(native.to_model(labels, "nearest"), "nearest", fill=9)
    np.testing.assert_array_equal(back[y0:y1, x0:x1], labels[y0:y1, x0:x1])
    assert (back[:y0] == 9).all() and (back[:, x1:] == 9).all()


@pytest.mark.parametrize("size", [64, 128, 352])
def test_geometry_round_trip_of_shapes_at_model_size(size):
    field, lesion = _blobs()
    labels = field.astype(np.uint8) + lesion
    g = Geometry.from_field(field, size)
    model = g.to_model(labels, "nearest")
    assert model.shape == (size, size) and model.dtype == np.uint8
    back = g.to_original(model, "nearest")
    assert back.shape == labels.shape
    # only pixels within one model pixel of a shape's edge may change: a shift of the whole
    # mask by a model pixel or more would change pixels outside that band
    import cv2

    r = int(np.ceil(g.side / size)) + 1  # one model pixel in original pixels, plus rounding
    kernel = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    band = np.zeros(labels.shape, bool)
    for k in np.unique(labels):
        m = (labels == k).astype(np.uint8)
        band |= (cv2.dilate(m, kernel) > 0) & ~(cv2.erode(m, kernel) > 0)
    changed = back != labels
    assert not (changed & ~band).any(), int((changed & ~band).sum())
    shifted = np.roll(labels, r + 2, axis=1)  # the check can fail: a shifted mask does
    assert ((shifted != labels) & ~band).any()
    # probabilities map back with linear interpolation and keep their channels
    probs = np.stack([labels == k for k in range(3)], -1).astype(np.float32)
    pback = g.to_original(g.to_model(probs, "linear"), "linear")
    assert pback.shape == (*labels.shape, 3)
    assert np.abs(pback.sum(-1)[field] - 1).max() < 1e-5


def test_geometry_serialises():
    g = Geometry.from_field(_blobs()[0], 96)
    assert Geometry.from_dict(g.to_dict()) == g


def test_empty_field_uses_the_whole_slice():
    g = Geometry.from_field(np.zeros((40, 60), bool), 32)
    assert g.box == (0, 40, 0, 60) and g.side == 60 and g.pad == (10, 0)


def test_prepare_zeroes_outside_the_field_and_labels_background():
    field, lesion = _blobs()
    image = np.full(field.shape, 0.8, np.float32)
    allowed = np.where(lesion, bits(GGO), NO_LESION).astype(np.uint8)
    p = prepare(RawSlice(image, allowed, field), size=128)
    assert p.x.shape == (128, 128) and p.x.dtype == np.float32
    assert (p.x[~p.lung] == 0).all() and p.x[p.lung].min() > 0
    assert np.median(p.x[p.lung]) == pytest.approx(0.8)  # edges blend with the zeros outside
    assert set(np.unique(p.allowed[~p.lung])) == {bits(BACKGROUND)}
    assert set(np.unique(p.allowed[p.lung])) == {bits(HEALTHY), bits(GGO)}
    # unlabelled: lung classes inside, background outside
    u = prepare(RawSlice(image, np.full(field.shape, ALL, np.uint8), field), size=64)
    assert set(np.unique(u.allowed)) == {bits(BACKGROUND), 14}


def test_prepare_uses_the_segmenter_without_a_lung_mask():
    field, _ = _blobs()
    calls = []

    def segmenter(image):
        calls.append(image.shape)
        return field

    p = prepare(
        RawSlice(np.ones(field.shape, np.float32), np.full(field.shape, ALL, np.uint8), None),
        64,
        segmenter,
    )
    assert calls == [field.shape] and p.lung.any()


def test_model_size_must_be_a_multiple_of_32():
    assert check_model_size(352) == 352
    for bad in (0, 16, 100, 353):
        with pytest.raises(DataError, match="multiple of 32"):
            check_model_size(bad)


def test_read_sample_checks_sizes(tmp_path):
    write_png(tmp_path / "img.png", np.zeros((40, 50), np.uint8))
    write_png(tmp_path / "small.png", np.zeros((20, 50), np.uint8))
    write_png(tmp_path / "mask.png", np.zeros((40, 48), np.uint8))
    write_png(tmp_path / "lung.png", np.zeros((41, 50), np.uint8))
    m = MaskValueMap.parse("medseg")
    with pytest.raises(DataError, match=r"small\.png: image is 20x50 px, smaller than 32"):
        read_sample(Sample("s", str(tmp_path / "small.png")), m)
    with pytest.raises(DataError, match=r"mask\.png: mask is 40x48 but its image is 40x50"):
        read_sample(Sample("s", str(tmp_path / "img.png"), str(tmp_path / "mask.png")), m)
    with pytest.raises(DataError, match=r"lung\.png: lung mask is 41x50"):
        read_sample(Sample("s", str(tmp_path / "img.png"), None, str(tmp_path / "lung.png")), m)


def test_output_names_are_flat():
    assert output_name(Sample("images/a/b.png#3", "x")) == "a__b_0003"
    assert output_name(Sample("images/v.nii.gz#12", "x")) == "v_0012"
    assert output_name(Sample("c.jpg", "x")) == "c"


def _two_windows(seed: int = 0):
    """One synthetic slice [300, 220] (lung, lesion, tissue around) seen through two windows,
    and its lung field."""
    field, lesion = _blobs()
    rng = np.random.default_rng(seed)
    hu = np.full(field.shape, 40.0)  # soft tissue
    hu[field] = -850.0
    hu[lesion] = -450.0  # GGO
    hu += rng.normal(0, 30, hu.shape)
    from stitchnet_tf.data.intensity import window_hu

    return window_hu(hu, -600, 1500), window_hu(hu, -500, 1000), field


def test_standardise_maps_the_anchors_and_aligns_windows():
    from stitchnet_tf.data.intensity import LUNG_ANCHOR, TISSUE_ANCHOR, anchors, standardise

    a, b, field = _two_windows()
    assert abs(np.median(a[field]) - np.median(b[field])) > 0.05  # different looks
    sa, sb = standardise(a, field), standardise(b, field)
    lung, tissue = anchors(sa, field)
    assert lung == pytest.approx(LUNG_ANCHOR, abs=0.01)
    assert tissue == pytest.approx(TISSUE_ANCHOR, abs=0.01)
    # the same tissue through two windows now looks the same (a linear map of a linear map)
    np.testing.assert_allclose(sa[field], sb[field], atol=0.02)
    # no contrast or no field: unchanged
    flat = np.full(a.shape, 0.4, np.float32)
    np.testing.assert_array_equal(standardise(flat, field), flat)
    np.testing.assert_array_equal(standardise(a, np.zeros_like(field)), a)


def test_standardise_in_the_exported_graph_equals_numpy():
    import tensorflow as tf

    from stitchnet_tf.data.intensity import standardise
    from stitchnet_tf.export import _InGraphPreprocess

    for seed in (0, 1):
        a, _, field = _two_windows(seed)
        graph = _InGraphPreprocess.standardise(tf.constant(a[..., None]), tf.constant(field))
        np.testing.assert_allclose(np.asarray(graph)[..., 0], standardise(a, field), atol=1e-5)


def test_prepare_standardises_with_the_image_only_field():
    a, b, field = _two_windows()
    allowed = np.full(field.shape, ALL, np.uint8)
    pa = prepare(RawSlice(a, allowed, field), 64, intensity="standardise")
    pb = prepare(RawSlice(b, allowed, field), 64, intensity="standardise")
    raw = prepare(RawSlice(a, allowed, field), 64)
    assert np.abs(pa.x - pb.x)[pa.lung].mean() < 0.02
    assert np.abs(pa.x - raw.x)[pa.lung].mean() > 0.05
    with pytest.raises(ValueError, match="intensity"):
        prepare(RawSlice(a, allowed, field), 64, intensity="zscore")
