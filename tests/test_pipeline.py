"""tf.data pipelines: shapes, laziness, mixing, caching and augmentation consistency."""

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from stitchnet_tf.data.datasets import discover
from stitchnet_tf.data.io import write_png
from stitchnet_tf.data.pipeline import (
    RECIPE_AUGMENTATION,
    PairedAugmentation,
    SliceLoader,
    augment,
    augment_intensity,
    augmentation_options,
    mixed_batches,
    slice_dataset,
    training_batches,
)
from stitchnet_tf.errors import DataError

S = 64


class FakeLoader:
    """Serves synthetic examples by index and counts reads (no files)."""

    def __init__(self, n, size=S, bad=()):
        self.n, self.size, self.bad = n, size, set(bad)
        self.reads = []
        self.lock = threading.Lock()

    def __len__(self):
        return self.n

    def __call__(self, i):
        i = int(i)
        with self.lock:
            self.reads.append(i)
        if i in self.bad:
            raise DataError(f"img{i}.png", "corrupt")
        yy, xx = np.mgrid[: self.size, : self.size]
        lung = (((yy - 30 - i % 5) / 20) ** 2 + ((xx - 25) / 12) ** 2 < 1).astype(np.float32)
        x = lung * (0.3 + 0.5 * (xx > 30)) + 0.001 * i
        allowed = np.stack([1 - lung, lung, 0 * lung, 0 * lung], -1).astype(np.float32)
        return x[..., None].astype(np.float32), allowed, lung[..., None]


def test_examples_have_static_shapes_and_dtypes():
    ds = slice_dataset(FakeLoader(5))
    spec = ds.element_spec
    assert spec["x"].shape == (S, S, 1) and spec["allowed"].shape == (S, S, 4)
    assert spec["lung"].shape == (S, S, 1)
    assert all(v.dtype == tf.float32 for v in spec.values())
    batch = next(iter(mixed_batches(ds, None, 4)))
    assert batch["x"].shape == (4, S, S, 1) and batch["allowed"].shape == (4, S, S, 4)


def test_streams_lazily_from_a_huge_index():
    loader = FakeLoader(400_000)
    ds = slice_dataset(loader, shuffle=True, seed=0, num_parallel_calls=2)
    for _ in ds.take(3):
        pass
    assert 3 <= len(loader.reads) <= 64  # read ahead a little, never the whole dataset


def test_shuffle_is_seeded_and_reshuffles():
    def order(seed):
        loader = FakeLoader(20)
        ds = slice_dataset(loader, shuffle=True, seed=seed, num_parallel_calls=1)
        for _ in "ab":
            assert len(list(ds)) == 20
        return [loader.reads[:20], loader.reads[20:]]

    a, b = order(1), order(1)
    assert a == b and sorted(a[0]) == list(range(20)) and a[0] != a[1]
    assert order(2)[0] != a[0]


def test_cache_reads_each_slice_once():
    loader = FakeLoader(6)
    ds = slice_dataset(loader, cache=True, shuffle=True)
    for _ in range(3):
        assert len(list(ds)) == 6
    assert sorted(loader.reads) == list(range(6))


def test_skip_bad_drops_failing_slices():
    loader = FakeLoader(6, bad={2, 4})
    assert len(list(slice_dataset(loader, skip_bad=True))) == 4
    with pytest.raises(tf.errors.OpError, match="img2.png: corrupt"):
        list(slice_dataset(FakeLoader(6, bad={2})))


def test_mixed_batches_hold_the_ratio():
    lab = slice_dataset(FakeLoader(7), repeat=True)
    unl = slice_dataset(FakeLoader(5), repeat=True).map(
        lambda e: e | {"allowed": tf.ones_like(e["allowed"])}
    )
    for batch in mixed_batches(lab, unl, 6, labelled_per_batch=2).take(4):
        per_example_max = tf.reduce_max(tf.reduce_sum(batch["allowed"], -1), [1, 2]).numpy()
        np.testing.assert_array_equal(per_example_max, [1, 1, 4, 4, 4, 4])
    with pytest.raises(ValueError):
        mixed_batches(lab, unl, 4, labelled_per_batch=5)


def _example():
    x, allowed, lung = FakeLoader(1)(0)
    return {"x": tf.constant(x), "allowed": tf.constant(allowed), "lung": tf.constant(lung)}


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_moves_image_and_masks_together(seed):
    ex = _example()
    out = augment(ex, tf.constant([seed, 7]), crop_probability=1.0)
    lung = out["lung"].numpy()[..., 0] > 0.5
    image_lung = out["x"].numpy()[..., 0] > 0.15
    # only pixels on the lung's edge may differ (bilinear image vs nearest mask)
    kernel = np.ones((3, 3), np.uint8)
    edge = cv2.dilate(lung.astype(np.uint8), kernel) != cv2.erode(lung.astype(np.uint8), kernel)
    assert not (lung != image_lung)[~edge].any() and lung.sum() > 200
    allowed = out["allowed"].numpy()
    np.testing.assert_array_equal(allowed.sum(-1), 1)  # still exact one-class sets
    np.testing.assert_array_equal(allowed[..., 1] > 0.5, lung)  # and the same geometry
    # without the crop, flips and rotations are exact permutations
    exact = augment(ex, tf.constant([seed, 7]), crop_probability=0.0)
    np.testing.assert_array_equal(exact["x"].numpy() > 0.15, exact["lung"].numpy() > 0.5)


def test_augmentation_is_seeded_and_varies():
    ex = _example()
    a = augment(ex, tf.constant([1, 2]))["x"].numpy()
    np.testing.assert_array_equal(a, augment(ex, tf.constant([1, 2]))["x"].numpy())
    outs = {augment(ex, tf.constant([s, 2]))["x"].numpy().tobytes() for s in range(12)}
    assert len(outs) > 4


def _lesion_example():
    ex = _example()
    allowed = ex["allowed"].numpy().copy()
    allowed[24:30, 20:26] = [0, 0, 0, 1]  # a small consolidation inside the lung
    return ex | {"allowed": tf.constant(allowed)}


@pytest.mark.parametrize("seed", range(8))
def test_recipe_augmentation_keeps_geometry_and_sets(seed):
    ex = _lesion_example()
    out = augment(ex, tf.constant([seed, 5]), **(RECIPE_AUGMENTATION | {"intensity": False}))
    allowed, lung = out["allowed"].numpy(), out["lung"].numpy()[..., 0] > 0.5
    np.testing.assert_array_equal(allowed.sum(-1), 1)  # border pixels became background
    np.testing.assert_array_equal(allowed[..., 0] < 0.5, lung)  # masks moved together
    kernel = np.ones((3, 3), np.uint8)
    edge = cv2.dilate(lung.astype(np.uint8), kernel) != cv2.erode(lung.astype(np.uint8), kernel)
    assert not (lung != (out["x"].numpy()[..., 0] > 0.15))[~edge].any()


def test_lesion_focus_zooms_onto_lesions():
    ex = _lesion_example()
    lesion = float(ex["allowed"].numpy()[..., 3].sum())
    options = dict(crop_probability=0.0, flips=False, rotations=False)
    focused = [
        augment(ex, tf.constant([s, 1]), lesion_focus=1.0, **options)["allowed"].numpy()
        for s in range(10)
    ]
    assert all(f[..., 3].sum() >= lesion for f in focused)  # zoomed in, the lesion kept
    assert np.mean([f[..., 3].sum() for f in focused]) > 1.1 * lesion
    # a slice with no lesion pixel is left alone
    plain = augment(_example(), tf.constant([0, 1]), lesion_focus=1.0, **options)
    np.testing.assert_array_equal(plain["x"].numpy(), _example()["x"].numpy())


def test_intensity_augmentation_stays_in_the_lung_field():
    ex = _example()
    changed = 0
    for s in range(20):
        x = augment_intensity(ex["x"], ex["lung"], tf.constant([s, 9])).numpy()
        assert x.min() >= 0 and x.max() <= 1
        assert not x[ex["lung"].numpy() < 0.5].any()
        changed += not np.allclose(x, ex["x"].numpy())
    assert 5 <= changed <= 19  # each transform has its own probability


def test_augmentation_names():
    assert augmentation_options("none") is None and augmentation_options(False) is None
    assert augmentation_options(True) == RECIPE_AUGMENTATION
    assert augmentation_options("paper")["crop_probability"] == 0.5
    with pytest.raises(DataError, match="unknown augmentation"):
        augmentation_options("heavy")


def test_paired_augmentation_layer_batch_and_config():
    ex = _example()
    batch = {k: tf.stack([v, v]) for k, v in ex.items()}
    layer = PairedAugmentation(seed=3, crop_probability=0.0)
    out = layer(batch, training=True)
    assert out["x"].shape == (2, S, S, 1)
    np.testing.assert_array_equal(out["x"].numpy() > 0.15, out["lung"].numpy() > 0.5)
    same = layer(batch, training=False)
    assert all(np.array_equal(same[k], batch[k]) for k in batch)
    clone = PairedAugmentation.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_slice_loader_on_files(tmp_path: Path):
    for sub in ("images", "masks", "lungs"):
        (tmp_path / sub).mkdir()
    yy, xx = np.mgrid[:80, :70]
    lung = ((yy - 40) / 30) ** 2 + ((xx - 35) / 25) ** 2 < 1
    lesion = ((yy - 40) / 8) ** 2 + ((xx - 35) / 8) ** 2 < 1
    for i in range(3):
        write_png(tmp_path / "images" / f"s{i}.png", (lung * 90 + lesion * 100).astype(np.uint8))
        write_png(tmp_path / "masks" / f"s{i}.png", lesion.astype(np.uint8), [0] * 3 + [128, 0, 0])
        write_png(tmp_path / "lungs" / f"s{i}.png", lung.astype(np.uint8) * 255)
    dataset = discover(tmp_path)
    loader = SliceLoader(dataset, dataset.samples, 32)
    x, allowed, field = loader(1)
    assert x.shape == (32, 32, 1) and allowed.shape == (32, 32, 4) and field.shape == (32, 32, 1)
    assert allowed[..., 2].sum() > 0 and allowed[..., 3].sum() == 0  # GGO only
    np.testing.assert_array_equal(allowed.sum(-1), 1)
    assert len(list(slice_dataset(loader, augmentation=True))) == 3
    with pytest.raises(DataError, match="multiple of 32"):
        SliceLoader(dataset, dataset.samples, 40)


def test_training_batches_follow_the_split_and_withheld_labels(tmp_path: Path):
    from stitchnet_tf.data.splits import split_dataset, withhold_labels
    from stitchnet_tf.data.synthetic import write_demo_dataset

    write_demo_dataset(
        tmp_path / "d",
        labelled_patients=5,
        unlabelled_patients=1,
        slices_per_patient=2,
        size=64,
        seed=0,
    )
    lab, unl = discover(tmp_path / "d" / "labelled"), discover(tmp_path / "d" / "unlabelled")
    split = withhold_labels(split_dataset(lab, seed=0), lab, max_labelled=2, seed=0)
    batches = training_batches(
        lab,
        unl,
        32,
        1,
        train_ids=split.train,
        withheld_ids=split.unlabelled,
        unlabelled_per_batch=3,
    )
    for batch in batches.take(5):
        sets = tf.reduce_max(tf.reduce_sum(batch["allowed"], -1), [1, 2]).numpy()
        np.testing.assert_array_equal(sets, [1, 3, 3, 3])  # 1 exact, 3 unlabelled (lung: 3 sets)
    # unlabelled slices are added to the labelled ones, not swapped in (default: as many)
    added = next(iter(training_batches(lab, unl, 32, 2, train_ids=split.train)))
    sets = tf.reduce_max(tf.reduce_sum(added["allowed"], -1), [1, 2]).numpy()
    np.testing.assert_array_equal(sets, [1, 1, 3, 3])
    only_labelled = training_batches(lab, None, 32, 2, train_ids=split.train)
    assert next(iter(only_labelled))["x"].shape == (2, 32, 32, 1)
    with pytest.raises(DataError, match="no labelled training slices"):
        training_batches(lab, unl, 32, 2, train_ids=split.train, withheld_ids=split.train)
    # a supervised run (`train --max-labelled 2 --model unet`) leaves the withheld slices out:
    # it sees the 2 labelled slices only, never the withheld ones with their labels
    supervised = training_batches(
        lab,
        None,
        32,
        1,
        train_ids=split.train,
        withheld_ids=split.unlabelled,
        use_withheld=False,
        augmentation=False,
    )
    seen = {batch["x"].numpy().tobytes() for batch in supervised.take(40)}
    assert len(split.train) > 2 and len(seen) == 2
    # and `train` asks for exactly that (it once handed a supervised run the withheld slices
    # as labelled ones, so "--max-labelled N" U-Nets trained on every train slice)
    from stitchnet_tf.training import TrainConfig, pipelines

    config = TrainConfig(
        labelled=str(tmp_path / "d" / "labelled"),
        output=str(tmp_path / "run"),
        model="unet",
        size=32,
        batch_size=1,
        augment=False,
        max_labelled=2,
    )
    batches = pipelines(config, lab, None, split, 0, 1)[0]
    assert len({batch["x"].numpy().tobytes() for batch in batches.take(40)}) == 2
