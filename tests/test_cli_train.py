"""train / evaluate / predict / styles / sample end to end on tiny synthetic data.

Training runs use `--eager` (the same train_step, no minute-long graph trace) and 32 px slices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import error_line, run
from PIL import Image

from stitchnet_tf.data.synthetic import write_demo_dataset

#: Each test here trains or loads models through the CLI (a minute or more): the full suite
#: runs them, the fast tier (`-m "not slow"`) leaves them to tests/test_battery.py and
#: tests/test_cli.py.
pytestmark = pytest.mark.slow

TINY = [
    "--size",
    "32",
    "--batch-size",
    "4",
    "--width",
    "0.25",
    "--backbone-alpha",
    "0.35",
    "--eager",
    "--quiet",
    "--recalibration-steps",
    "1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "data"
    write_demo_dataset(
        root, labelled_patients=5, unlabelled_patients=1, slices_per_patient=3, size=64, seed=2
    )
    return root


@pytest.fixture(scope="module")
def stitchnet_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "stitchnet"
    r = run(
        "train",
        "-l",
        data / "labelled",
        "-u",
        data / "unlabelled",
        "-o",
        out,
        "--epochs",
        2,
        "--steps-per-epoch",
        2,
        "--unlabelled-per-batch",
        2,
        *TINY,
    )
    assert "trained 2 epochs" in r.output
    # no GPU here: the cpu preset fills what the command left out, and says so
    assert "preset cpu (no GPU was found): 32 px, 2 x 2 steps of 4" in r.output
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "cpu" and config["model_options"]["backbone_alpha"] == 0.35
    return out


def test_train_writes_a_complete_run_folder(stitchnet_run):
    for name in (
        "config.json",
        "split.json",
        "best.keras",
        "last.keras",
        "state.json",
        "log.csv",
        "curves.png",
        "versions.json",
    ):
        assert (stitchnet_run / name).is_file(), name
    assert any((stitchnet_run / "tensorboard").rglob("*tfevents*"))
    config = json.loads((stitchnet_run / "config.json").read_text())
    assert config["model"] == "stitchnet" and config["size"] == 32 and config["unlabelled"]
    state = json.loads((stitchnet_run / "state.json").read_text())
    assert state["epochs_done"] == 2 and state["best_epoch"] in (1, 2)
    log = (stitchnet_run / "log.csv").read_text().splitlines()
    assert len(log) == 3 and "val_mean_lesion_dice" in log[0] and "val_dice_ggo" in log[0]
    # the decision rule was chosen on val with the best epoch, and saved with it
    import csv

    import keras

    rows = list(csv.DictReader((stitchnet_run / "log.csv").open()))
    best = rows[state["best_epoch"] - 1]
    scores = {r: float(best[f"val_mean_lesion_dice_{r}"]) for r in ("prior", "posterior")}
    chosen = ("prior", "posterior")[int(float(best["val_decision"]))]
    model = keras.saving.load_model(stitchnet_run / "best.keras", safe_mode=True)
    assert model.decision == chosen and config["choose_decision"] is True
    # chosen with the lesion offset: the pair scores at least what either rule does at b = 0
    assert model.lesion_offset == float(best["val_lesion_offset"])
    assert float(best["val_mean_lesion_dice"]) >= max(scores.values())
    if model.lesion_offset == 0.0:
        assert scores[chosen] == max(scores.values())
    split = json.loads((stitchnet_run / "split.json").read_text())
    assert split["by"] == "patient" and split["val"]
    # train keeps Grappler from reordering traced sums, so a seeded run repeats (DESIGN §2.2)
    import tensorflow as tf

    assert tf.config.optimizer.get_experimental_options()["arithmetic_optimization"] is False
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.eager import context

    serialized = context.context().function_call_options.config_proto_serialized
    rewrite = config_pb2.ConfigProto.FromString(serialized).graph_options.rewrite_options
    if not tf.config.list_physical_devices("GPU"):  # with a GPU train leaves it on
        assert rewrite.memory_optimization == rewriter_config_pb2.RewriterConfig.NO_MEM_OPT


def test_a_finished_run_is_neither_overwritten_nor_resumed_with_another_config(stitchnet_run, data):
    """The same command on a finished run, and a changed one, are refused; nothing changes."""
    same = [
        "train", "-l", data / "labelled", "-u", data / "unlabelled", "-o", stitchnet_run,
        "--epochs", 2, "--steps-per-epoch", 2, "--unlabelled-per-batch", 2, *TINY,
    ]  # fmt: skip
    before = {p.name: p.stat().st_mtime_ns for p in stitchnet_run.iterdir()}
    assert "holds a finished run" in error_line(run(*same, expect=2))
    changed = [*same[: -len(TINY)], "--learning-rate", "0.01", *TINY]
    assert "another configuration" in error_line(run(*changed, expect=2))
    assert {p.name: p.stat().st_mtime_ns for p in stitchnet_run.iterdir()} == before


def test_evaluate_writes_table1_reports(stitchnet_run, data, tmp_path):
    out = tmp_path / "eval"
    r = run("evaluate", "-m", stitchnet_run, "-d", data / "labelled", "-o", out)
    assert "using the run's split" in r.output and "| Overall |" in r.output
    for name in (
        "metrics.md",
        "metrics.csv",
        "metrics.json",
        "metrics_per_image.csv",
        "evaluation.json",
    ):
        assert (out / name).is_file(), name
    info = json.loads((out / "evaluation.json").read_text())
    assert info["scheme"] == "multiclass" and info["geometry"] == "original slices"
    split = json.loads((stitchnet_run / "split.json").read_text())
    assert info["slices"] == len(split["test"])
    rows = (out / "metrics_per_image.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * info["slices"]  # one row per image and class


def test_predict_slices_nifti_and_dicom(stitchnet_run, data, tmp_path, write_ct_dicom):
    out = tmp_path / "pred"
    r = run("predict", "-m", stitchnet_run, "-i", data / "unlabelled", "-o", out, "--uncertainty")
    assert "segmented 3 slices" in r.output
    image = data / "unlabelled" / "images" / "U00_00.png"
    labels = Image.open(out / "U00_00_labels.png")
    assert labels.mode == "P" and labels.size == Image.open(image).size
    assert set(np.unique(np.asarray(labels))) <= {0, 1, 2, 3}
    assert (out / "U00_00_overlay.png").is_file() and (out / "U00_00_uncertainty.png").is_file()
    burden = (out / "burden.csv").read_text().splitlines()
    assert burden[0].startswith("input,level,slice,lung_px,ggo_px,con_px") and len(burden) == 4
    # a NIfTI volume comes back as a label volume with the input's shape and affine
    volume = np.stack(
        [np.asarray(Image.open(p)) for p in sorted((data / "unlabelled" / "images").iterdir())], -1
    )
    hu = (volume.astype(np.float32) / 255 * 1500 - 1350).astype(np.int16).transpose(1, 0, 2)
    affine = np.diag([0.7, 0.7, 5.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "vol.nii.gz")
    r = run("predict", "-m", stitchnet_run, "-i", tmp_path / "vol.nii.gz", "-o", tmp_path / "v")
    assert "(1 volumes)" in r.output
    labelled = nib.load(tmp_path / "v" / "vol_labels.nii.gz")
    assert labelled.shape == hu.shape and np.allclose(labelled.affine, affine)
    assert len(list((tmp_path / "v" / "vol_overlays").iterdir())) == 3
    assert "volume" in (tmp_path / "v" / "burden.csv").read_text()
    # a DICOM series folder (with a threshold rule: no model to load and trace again; the
    # shipped Keras model reads one in test_wheel.py)
    from stitchnet_tf.models.threshold import ThresholdRule

    series = tmp_path / "series"
    series.mkdir()
    for k in range(2):
        write_ct_dicom(series / f"{k}.dcm", hu[:, :, k].T.copy(), z=float(k), number=k)
    rule = ThresholdRule(0.3, 0.6, size=32).save(tmp_path / "rule.json")
    r = run("predict", "-m", rule, "-i", series, "-o", tmp_path / "d")
    assert "segmented 2 slices (1 volumes)" in r.output
    assert nib.load(tmp_path / "d" / "series_labels.nii.gz").shape == (64, 64, 2)


def test_styles_and_sample(stitchnet_run, data, tmp_path):
    run("styles", "-m", stitchnet_run, "-i", data / "unlabelled" / "images", "-o", tmp_path / "st")
    assert len(list((tmp_path / "st").glob("*_styles.png"))) == 3
    run("sample", "-m", stitchnet_run, "--n", 2, "-o", tmp_path / "samples")
    assert (tmp_path / "samples" / "samples.png").is_file()
    assert Image.open(tmp_path / "samples" / "sample_1_labels.png").size == (32, 32)


def test_unet_baseline_trains_and_evaluates(data, tmp_path):
    out = tmp_path / "unet"
    r = run(
        "train",
        "-l",
        data / "labelled",
        "-u",
        data / "unlabelled",
        "--model",
        "unet",
        "-o",
        out,
        "--epochs",
        1,
        "--steps-per-epoch",
        3,
        "--ema",
        0.5,
        *TINY,
    )
    assert "supervised: the unlabelled data is not used" in r.output
    assert "(EMA weights)" in r.output
    # best.keras holds the weights' moving average, last.keras the raw weights and the average
    import keras

    best = keras.saving.load_model(out / "best.keras", safe_mode=True)
    last = keras.saving.load_model(out / "last.keras", safe_mode=True)
    assert type(last.optimizer).__name__ == "FusedAdamW" and last.optimizer.use_ema
    averaged = last.optimizer._model_variables_moving_average
    for b, avg in zip(best.trainable_variables, averaged, strict=True):
        np.testing.assert_allclose(b.numpy(), avg.numpy(), rtol=1e-6, atol=1e-7)
    pairs = zip(best.trainable_variables, last.trainable_variables, strict=True)
    assert any(not np.allclose(b.numpy(), raw.numpy()) for b, raw in pairs)
    run("evaluate", "-m", out, "-d", data / "labelled", "-o", tmp_path / "eval")
    assert "UNet" in (tmp_path / "eval" / "metrics.md").read_text()
    # styles need a generative model
    r = run("styles", "-m", out, "-i", data / "labelled" / "images", "-o", tmp_path / "s", expect=2)
    assert "a StitchNet .keras model is needed" in error_line(r)


def test_bad_inputs(stitchnet_run, data, tmp_path):
    assert "model not found" in error_line(
        run(
            "evaluate",
            "-m",
            tmp_path / "nope.keras",
            "-d",
            data / "labelled",
            "-o",
            tmp_path / "e",
            expect=2,
        )
    )
    assert "not a run folder" in error_line(
        run("predict", "-m", data, "-i", data / "unlabelled", "-o", tmp_path / "p", expect=2)
    )
    assert "multiple of 32" in error_line(
        run("train", "-l", data / "labelled", "-o", tmp_path / "r", "--size", 100, expect=2)
    )
    assert "no masks found" in error_line(
        run("train", "-l", data / "unlabelled", "-o", tmp_path / "r2", *TINY, expect=2)
    )
    (tmp_path / "empty").mkdir()
    assert "no images found" in error_line(
        run(
            "evaluate", "-m", stitchnet_run, "-d", tmp_path / "empty", "-o", tmp_path / "e2",
            expect=2,
        )
    )  # fmt: skip
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "small.png")
    assert "smaller than 32 px" in error_line(
        run(
            "predict",
            "-m",
            stitchnet_run,
            "-i",
            tmp_path / "small.png",
            "-o",
            tmp_path / "p2",
            expect=2,
        )
    )
    assert not (tmp_path / "p2").exists()


def test_a_killed_run_resumes_with_its_weights_and_optimizer_state(data, tmp_path):
    """kill -9 right after epoch 2's checkpoint (a test hook, no race): the rerun resumes from
    last.keras, optimizer state included, and trains epochs 3 and 4 only."""
    from stitchnet_tf.inference import load_model
    from stitchnet_tf.training import KILL_AFTER_EPOCH_ENV

    out = tmp_path / "resumed"
    args = [
        "train", "-l", str(data / "labelled"), "-o", str(out), "--model", "unet",
        "--epochs", "4", "--steps-per-epoch", "2", *TINY,
    ]  # fmt: skip
    script = "import sys\nfrom stitchnet_tf_cli.main import cli\ncli(sys.argv[1:])\n"
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3", KILL_AFTER_EPOCH_ENV: "2"}
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    killed = json.loads((out / "state.json").read_text())
    assert killed["epochs_done"] == 2 and killed["train_seconds"] > 0  # counted per epoch
    saved = load_model(out / "last.keras").model
    assert int(saved.optimizer.iterations) == 4
    r = run(*args)
    assert f"resuming {out} after epoch 2" in r.output
    resumed = json.loads((out / "state.json").read_text())
    assert resumed["epochs_done"] == 4 and resumed["train_seconds"] > killed["train_seconds"]
    rows = (out / "log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(4))  # each epoch logged once
    final = load_model(out / "last.keras").model
    # 4 restored + 4 new steps (a fresh start would count 4): the optimizer state was restored,
    # and with it the learning-rate schedule's position
    assert int(final.optimizer.iterations) == 8


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(data, tmp_path):
    """A learning rate of 1e30 blows the weights up in the first step: epoch 1's loss (computed
    before the update) is finite and saved, epoch 2's is not, and the run stops there."""
    out = tmp_path / "nan"
    r = run(
        "train", "-l", data / "labelled", "--model", "unet", "-o", out, "--epochs", 4,
        "--steps-per-epoch", 1, "--learning-rate", 1e30, "--clipnorm", 0, "--clipvalue", 0,
        *TINY, expect=2,
    )  # fmt: skip
    line = error_line(r)
    assert "became NaN in epoch 2" in line and "kept last.keras from epoch 1" in line, line
    state = json.loads((out / "state.json").read_text())
    assert state["epochs_done"] == 1 and state["nan_epoch"] == 2
    assert (out / "last.keras").is_file()


def test_a_run_written_before_the_recipe_is_not_resumed_with_it(tmp_path):
    from stitchnet_tf.errors import DataError
    from stitchnet_tf.training import TrainConfig, prepare_run

    config = TrainConfig(labelled="lab", output=str(tmp_path / "old"))
    run, state = prepare_run(config)
    (run / "state.json").write_text(json.dumps(state | {"epochs_done": 1}))
    old = json.loads((run / "config.json").read_text())
    for key in ("optimizer", "weight_decay", "ema", "augmentation", "preset"):
        del old[key]
    (run / "config.json").write_text(json.dumps(old))
    saved = TrainConfig.from_json((run / "config.json").read_text())
    assert (saved.optimizer, saved.augmentation) == ("adam", "paper")
    with pytest.raises(DataError, match="another configuration"):
        prepare_run(config)
    prepare_run(dataclasses.replace(config, optimizer="adam", augmentation="paper"))


def test_a_failed_start_is_not_a_run_and_overwrite_replaces_only_runs(tmp_path):
    from stitchnet_tf.errors import DataError
    from stitchnet_tf.training import TrainConfig, prepare_run

    config = TrainConfig(labelled=str(tmp_path / "lab"), output=str(tmp_path / "run"))
    run, _ = prepare_run(config)  # epochs_done 0: as a run that failed before its first epoch
    other = dataclasses.replace(config, learning_rate=1e-4)
    prepare_run(other)  # the corrected command is not refused
    assert TrainConfig.from_json((run / "config.json").read_text()) == other
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not a run of this tool"):
            prepare_run(dataclasses.replace(config, output=str(foreign)), overwrite)
    assert (foreign / "thesis.tex").read_text() == "x"
    for output, message in (("lab", "is the input --labelled"), (".", "contains the input")):
        bad = dataclasses.replace(config, output=str(tmp_path / output))
        with pytest.raises(DataError, match=message):
            prepare_run(bad, overwrite=True)


def test_presets():
    from stitchnet_tf.errors import DataError
    from stitchnet_tf.training import PRESETS, preset_options, resolve_preset

    assert resolve_preset() == ("cpu", "no GPU was found")  # this test machine has no GPU
    assert resolve_preset("paper") == ("paper", "asked for")
    with pytest.raises(DataError, match="unknown preset"):
        resolve_preset("laptop")
    budget, options = preset_options("cpu", "unet")
    assert budget == {"size": 128, "epochs": 12, "steps_per_epoch": 100, "batch_size": 8}
    assert options == {"alpha": 0.5}
    assert preset_options("cpu", "stitchnet")[1] == {"backbone_alpha": 0.5}
    assert preset_options("paper", "segnet") == (
        {k: v for k, v in PRESETS["paper"].items() if k not in ("width", "backbone_alpha")},
        {"width": 1.0},
    )


def test_intensity_standardise_travels_with_the_model(data, tmp_path):
    """`--intensity standardise` is kept by the model: evaluate and predict preprocess the same
    way; a preprocessed folder written without it is refused, with a one-line error."""
    import keras

    from stitchnet_tf.inference import Predictor, load_model

    out = tmp_path / "std"
    run(
        "train", "-l", data / "labelled", "--model", "unet", "-o", out, "--epochs", 1,
        "--steps-per-epoch", 2, "--intensity", "standardise", *TINY,
    )  # fmt: skip
    model = keras.saving.load_model(out / "best.keras", safe_mode=True)
    assert model.intensity == "standardise"
    assert Predictor(load_model(out).model, 32).intensity == "standardise"
    run("evaluate", "-m", out, "-d", data / "labelled", "-o", tmp_path / "eval")
    assert (
        json.loads((tmp_path / "eval" / "evaluation.json").read_text())["intensity"]
        == "standardise"
    )
    prep = tmp_path / "prep"
    run("preprocess", "-i", data / "labelled", "-o", prep, "--size", 32)
    assert json.loads((prep / "dataset.json").read_text())["intensity"] == "none"
    r = run(
        "train", "-l", prep, "--model", "unet", "-o", tmp_path / "bad", "--epochs", 1,
        "--steps-per-epoch", 1, "--intensity", "standardise", *TINY, expect=2,
    )  # fmt: skip
    line = error_line(r)
    assert str(prep) in line and "preprocess again with --intensity standardise" in line, line
