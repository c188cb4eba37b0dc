"""Export: SavedModel (TF Serving layout, three signatures) and TFLite variants agree with Keras;
exports are atomic; `export`, `predict` and `evaluate` accept exports from the CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import error_line, run

from stitchnet_tf import export
from stitchnet_tf.data.datasets import discover
from stitchnet_tf.data.pipeline import SliceLoader
from stitchnet_tf.data.preprocess import read_sample
from stitchnet_tf.data.synthetic import write_demo_dataset
from stitchnet_tf.errors import DataError
from stitchnet_tf.models.optimizers import FusedAdam

SIZE = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export") / "data"
    write_demo_dataset(
        root, labelled_patients=3, unlabelled_patients=1, slices_per_patient=2, size=96, seed=3
    )
    return root


MEDSEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medseg-covid"


@pytest.fixture(scope="module")
def slices(data):
    """Preprocessed x and lung field [N, S, S, 1]: real MedSeg slices where ../shared/data is
    present, else the synthetic labelled slices."""
    real = (MEDSEG / "labelled").is_dir()
    dataset = discover(MEDSEG / "labelled" if real else data / "labelled")
    print(f"parity slices: {'MedSeg (real)' if real else 'synthetic'}")
    loader = SliceLoader(dataset, dataset.samples[:8], SIZE)
    prepared = [loader(i) for i in range(len(loader))]
    x = np.stack([p[0] for p in prepared]).reshape(-1, SIZE, SIZE, 1).astype(np.float32)
    lung = np.stack([p[2] for p in prepared]).reshape(-1, SIZE, SIZE, 1).astype(np.float32)
    return x, lung


def _train_briefly(model, steps: int) -> None:
    """Parity is checked on trained models: an untrained one's top two classes differ by about
    1e-4, so any rounding flips its labels and the check says little."""
    import keras
    import tensorflow as tf
    from helpers import lesion_batch

    keras.utils.set_random_seed(0)
    x, allowed = lesion_batch(SIZE, 4)
    model.compile(optimizer=FusedAdam(3e-3))
    batches = tf.data.Dataset.from_tensors({"x": x, "allowed": allowed}).repeat()
    model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0)


def top_two_gap(probabilities) -> float:
    """Median gap between the two most probable classes over the lung pixels."""
    p = np.sort(np.asarray(probabilities), -1)
    gap = p[..., -1] - p[..., -2]
    return float(np.median(gap[p[..., -1] < 1.0]))


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """A tiny U-Net built under mixed_bfloat16 (as `--mixed-precision` trains on CPU), exported
    with all three signatures."""
    import keras

    from stitchnet_tf.models.baselines import UNet

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = UNet(width=0.25, alpha=0.35, seed=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    _train_briefly(model, steps=40)
    root = tmp_path_factory.mktemp("sm") / "unet"
    return model, export.export_savedmodel(model, root, SIZE)


@pytest.fixture(scope="module")
def stitchnet(tmp_path_factory):
    from stitchnet_tf.models.stitchnet import StitchNet

    # untrained (a train step's trace costs a minute here): its parity is checked on the
    # probabilities themselves (max |dp|), which near-tied classes do not excuse
    model = StitchNet(width=0.25, backbone_alpha=0.35, seed=0)
    root = tmp_path_factory.mktemp("sm") / "stitchnet"
    return model, export.export_savedmodel(model, root, SIZE, lung_model=False)


def agreement(a, b) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean())


@pytest.mark.slow
def test_savedmodel_layout_and_parity_with_keras(unet, stitchnet, slices):
    x, lung = slices
    for model, version in (unet, stitchnet):
        assert version.name == "1" and (version / "saved_model.pb").is_file()
        loaded = export.load_exported(version.parent)  # the base folder: newest version
        assert loaded.path == version and loaded.size == SIZE
        assert loaded.intensity == loaded.metadata["intensity"] == "none"
        reference = export.float32_model(model).segment(x, lung)
        if model is unet[0]:  # trained: its labels are decided, so label agreement means something
            assert top_two_gap(reference["probabilities"]) > 1e-2
        out = loaded.segment(x, lung)
        diff = np.abs(out["probabilities"] - np.asarray(reference["probabilities"])).max()
        print(f"{type(model).__name__}: SavedModel vs Keras max |dp| = {diff:.2e}")
        assert diff < 1e-5
        assert agreement(out["labels"], reference["labels"]) > 0.999
        # serving_default takes the lung field as x > 0
        default = loaded.loaded.signatures["serving_default"](image=x)
        assert np.allclose(default["probabilities"], loaded.segment(x)["probabilities"])
    # the mixed-precision model itself agrees up to bfloat16 rounding
    model, version = unet
    bf16 = model.segment(x, lung)["labels"]
    assert agreement(export.load_exported(version).segment(x, lung)["labels"], bf16) > 0.98


def test_saved_model_cli_lists_the_signatures(unet):
    _, version = unet
    shown = subprocess.run(
        ["saved_model_cli", "show", "--dir", str(version), "--all"],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    for name in ("serving_default", "serving_lung", "serving_bytes", "image_bytes"):
        assert f"'{name}'" in shown or f"[{name}]" in shown, name
    for output in ("probabilities", "labels", "entropy", "labels_original"):
        assert f"['{output}']" in shown, output
    assert "(-1, 64, 64, 1)" in shown


def test_bytes_signature_preprocesses_in_the_graph_like_predictor(unet, data):
    """The in-graph preprocessing finds nearly the same lung field, crop and x as `prepare`
    (it skips the removal of small components), and labels come back in the slice geometry as
    the Predictor's do: probabilities mapped back before the argmax, lung classes in the field."""
    import tensorflow as tf

    from stitchnet_tf.data.lung_unet import default_segmenter
    from stitchnet_tf.data.preprocess import Geometry, prepare
    from stitchnet_tf.inference import labels_to_original

    _, version = unet
    dataset = discover(data / "labelled")
    served = export.load_exported(version).loaded.signatures["serving_bytes"]
    in_graph = export._InGraphPreprocess(export._lung_net(None), SIZE, 0.05)
    for sample in dataset.samples[:3]:
        raw = read_sample(sample, dataset.mask_map)
        raw = raw.__class__(raw.image, raw.allowed, None)  # find the lung field, as a server must
        png = cv2.imencode(".png", np.round(raw.image * 255).astype(np.uint8))[1].tobytes()
        image = tf.io.decode_image(png, channels=1, dtype=tf.float32, expand_animations=False)
        x, lung, box, in_field = (np.asarray(t) for t in in_graph(image))
        expected = prepare(raw, SIZE, default_segmenter())
        a, b = lung[..., 0] > 0.5, expected.lung.reshape(SIZE, SIZE) > 0
        iou = (a & b).sum() / (a | b).sum()
        dx = np.abs(x[..., 0] - expected.x.reshape(SIZE, SIZE)).mean()
        print(f"{Path(sample.image).name}: lung IoU {iou:.3f}, mean |dx| {dx:.4f}, box {box}")
        assert iou > 0.9 and dx < 0.03
        assert np.abs(box - expected.geometry.box).max() <= 3
        out = served(image_bytes=[png, png])
        assert out["labels_original"].shape == (2, *raw.image.shape)
        assert out["probabilities"].shape == (2, SIZE, SIZE, 4)
        field = expected.geometry.to_original(b.astype(np.uint8), "nearest") > 0
        assert agreement(out["labels_original"][0] > 0, field) > 0.95
        # the Predictor's mapping back (probabilities, then the argmax) on the served
        # probabilities, with the graph's own box and field (a box a pixel off would shift an
        # untrained model's near-tied lung classes)
        h, w = box[1] - box[0], box[3] - box[2]
        side = max(h, w)
        geometry = Geometry(
            raw.image.shape, tuple(box), ((side - h) // 2, (side - w) // 2), side, SIZE
        )
        labels = labels_to_original(np.asarray(out["probabilities"][0]), geometry, in_field)
        assert agreement(out["labels_original"][0], labels) > 0.999


@pytest.mark.slow
def test_tflite_variants_agree_with_keras(unet, slices, tmp_path):
    x, lung = slices
    model, version = unet
    reference = export.float32_model(model).segment(x, lung)["labels"]
    sizes = {}
    # int8 on this untrained model (class gaps of ~1e-4) agreed on 79.5% of pixels when the
    # floor was set; a trained U-Net agrees on 99.8% (benchmarks/results/speed.md)
    for quantize, needed in (
        ("none", 0.995), ("float16", 0.995), ("dynamic", 0.995), ("int8", 0.7)
    ):  # fmt: skip
        path = export.export_tflite(
            None,
            tmp_path / f"unet-{quantize}.tflite",
            SIZE,
            quantize=quantize,
            representative=lambda: iter(x),
            saved_model=version,
        )
        loaded = export.load_exported(path)
        assert type(loaded.interpreter).__module__.startswith("ai_edge_litert")
        described = json.loads(export.tflite_metadata(path).read_text())
        assert described["quantize"] == quantize and described["size"] == SIZE
        assert loaded.intensity == "none"
        out = loaded.segment(x, lung)
        same = agreement(out["labels"], reference)
        sizes[quantize] = path.stat().st_size
        print(f"TFLite {quantize}: {sizes[quantize] / 1e6:.2f} MB, argmax agreement {same:.4f}")
        assert same >= needed
        assert set(np.unique(out["labels"])) <= {0, 1, 2, 3}
        assert np.allclose(out["probabilities"].sum(-1), 1.0, atol=1e-2)
    assert sizes["float16"] < 0.6 * sizes["none"] and sizes["dynamic"] < 0.4 * sizes["none"]


@pytest.mark.slow
def test_stitchnet_tflite_matches_keras(stitchnet, slices, tmp_path):
    x, lung = slices
    model, version = stitchnet
    path = export.export_tflite(None, tmp_path / "s.tflite", SIZE, saved_model=version)
    out = export.load_exported(path).segment(x, lung)
    reference = model.segment(x, lung)
    diff = np.abs(out["probabilities"] - np.asarray(reference["probabilities"])).max()
    print(f"StitchNet TFLite float32 vs Keras max |dp| = {diff:.2e}")
    assert diff < 1e-4 and agreement(out["labels"], reference["labels"]) > 0.995


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_an_interrupted_export_leaves_the_previous_version_intact(unet, monkeypatch, tmp_path):

    model, version = unet
    root = version.parent
    before = _digest(version)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_metadata", fail)  # the SavedModel is written, then this fails
    with pytest.raises(RuntimeError):
        export.export_savedmodel(model, root, SIZE, version=1, overwrite=True, lung_model=False)
    assert _digest(version) == before
    assert sorted(p.name for p in root.iterdir()) == ["1"]  # no temporary folders left
    monkeypatch.undo()
    with pytest.raises(DataError, match="version already exists"):
        export.export_savedmodel(model, root, SIZE, version=1)

    tflite = export.export_tflite(None, tmp_path / "m.tflite", SIZE, saved_model=version)
    data = tflite.read_bytes()

    def write_half(self, data):  # the disk fills up halfway through writing the model
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_half)
    with pytest.raises(OSError):
        export.export_tflite(None, tflite, SIZE, saved_model=version, overwrite=True)
    assert tflite.read_bytes() == data
    assert sorted(tmp_path.iterdir()) == [tflite, export.tflite_metadata(tflite)]


@pytest.mark.slow
def test_cli_mixed_precision_train_export_predict_evaluate(data, tmp_path):
    runs = tmp_path / "runs" / "unet"
    run(
        "train", "-l", data / "labelled", "--model", "unet", "-o", runs, "--epochs", 1,
        "--steps-per-epoch", 2, "--size", SIZE, "--batch-size", 4, "--width", 0.25,
        "--backbone-alpha", 0.35, "--mixed-precision", "--eager", "--quiet",
    )  # fmt: skip
    with open(runs / "log.csv", newline="") as f:
        assert all(np.isfinite(float(r["loss"])) for r in csv.DictReader(f))
    assert "bfloat16" in (runs / "state.json").read_text()

    base = tmp_path / "serving" / "unet"
    r = run("export", "-m", runs, "--format", "savedmodel", "-o", base, "--no-bytes")
    assert f"-> {base / '1'}" in r.output
    f16 = tmp_path / "unet-f16.tflite"
    run("export", "-m", runs, "--format", "tflite", "--quantize", "float16", "-o", f16)
    int8 = tmp_path / "unet-int8.tflite"
    r = run("export", "-m", runs, "--format", "tflite", "--quantize", "int8", "-o", int8,
            "--count", 4)  # fmt: skip
    assert int8.is_file() and "(int8)" in r.output

    images = data / "labelled" / "images"
    labels = {}
    for name, model in (("keras", runs), ("savedmodel", base), ("tflite", f16)):
        run("predict", "-m", model, "-i", images, "-o", tmp_path / f"pred-{name}")
        labels[name] = [
            cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            for p in sorted((tmp_path / f"pred-{name}").glob("*_labels.png"))
        ]
    assert len(labels["keras"]) == len(list(images.iterdir()))
    for name in ("savedmodel", "tflite"):
        same = np.mean(
            [agreement(a, b) for a, b in zip(labels[name], labels["keras"], strict=True)]
        )
        assert same > 0.995, name
    run("evaluate", "-m", int8, "-d", data / "labelled", "-o", tmp_path / "eval")
    assert "Overall" in (tmp_path / "eval" / "metrics.md").read_text()

    # bad input: one line, nothing overwritten
    r = run("export", "-m", tmp_path / "missing", expect=2)
    assert "model not found" in error_line(r)
    r = run("export", "-m", runs, "--quantize", "int8", "-o", base, expect=2)
    assert "--format tflite only" in error_line(r)
    r = run("export", "-m", runs, "-o", base, "--version", 1, "--no-bytes", expect=2)
    assert "version already exists" in error_line(r)
    r = run("export", "-m", runs, "--format", "tflite", "-o", f16, expect=2)
    assert "file exists" in error_line(r)
    r = run("predict", "-m", base, "--size", 96, "-i", images, "-o", tmp_path / "p2", expect=2)
    assert "takes 64 px slices" in error_line(r)
    (tmp_path / "junk.tflite").write_bytes(b"not a model")
    r = run(
        "predict", "-m", tmp_path / "junk.tflite", "-i", images, "-o", tmp_path / "p3", expect=2
    )
    assert "cannot load TFLite model" in error_line(r)


def test_the_lesion_offset_is_carried_into_the_export(unet, slices, tmp_path):
    """A val-chosen `lesion_offset` is part of the model: the SavedModel applies it, with and
    without flip TTA (averaged over flips like the `Predictor`), as the Keras model does."""
    from stitchnet_tf.inference import flip_average
    from stitchnet_tf.models.base import calibrate_lesion

    x, lung = slices
    model, _ = unet
    reference = export.float32_model(model).segment(x, lung)["probabilities"]
    model.lesion_offset = 1.5
    try:
        plain = export.export_savedmodel(model, tmp_path / "b", SIZE, lung_model=False)
        tta = export.export_savedmodel(model, tmp_path / "t", SIZE, lung_model=False, tta=True)
        keras_tta = flip_average(export.float32_model(model).segment, x, lung)["probabilities"]
    finally:
        model.lesion_offset = 0.0
    out = export.load_exported(plain).segment(x, lung)["probabilities"]
    expected = calibrate_lesion(reference, 1.5).numpy()
    assert np.abs(out - expected).max() < 1e-5
    assert np.abs(out - np.asarray(reference)).max() > 1e-3  # the offset did change them
    assert json.loads((tta / export.METADATA).read_text())["tta"] is True
    out = export.load_exported(tta).segment(x, lung)["probabilities"]
    assert np.abs(out - np.asarray(keras_tta)).max() < 1e-5
