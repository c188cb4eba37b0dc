"""Evaluation scores what users get: label-free lung field, per-image Table 1; `SliceScorer`
gives `evaluate`'s numbers and picks the training epoch."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from slice_folders import LUNG, N, noisy, piecewise, write_folder

from stitchnet_tf.data.classes import BACKGROUND, HEALTHY
from stitchnet_tf.data.datasets import discover
from stitchnet_tf.evaluation import SliceScorer, evaluate
from stitchnet_tf.models.threshold import ThresholdRule


def test_evaluate_takes_the_lung_field_from_the_segmenter_not_the_label(tmp_path):
    """A lesion outside the segmenter's lung field is predicted background: a miss."""
    images, lesions = piecewise(1)
    lesions[0][0:2, 30:40] = 1  # GGO drawn outside the lung field
    images[0][0:2, 30:40] = 128
    data = write_folder(tmp_path / "d", images, lesions)  # no lungs/: the segmenter decides
    rule = ThresholdRule(0.3, 0.6, 64).save(tmp_path / "rule.json")
    result = evaluate(rule, data, tmp_path / "eval", segmenter=lambda image: LUNG, log=print)
    assert result["lung_field"] == "lung segmenter"
    with open(tmp_path / "eval" / "metrics_per_image.csv") as f:
        ggo = next(r for r in csv.DictReader(f) if r["class"] == "ggo")
    inside = int((lesions[0][LUNG] == 1).sum())
    assert (int(ggo["tp"]), int(ggo["fp"]), int(ggo["fn"])) == (inside, 0, 20)
    assert float(ggo["f1"]) == pytest.approx(2 * inside / (2 * inside + 20))


def test_scorer_caches_the_label_free_slices(tmp_path):
    data = write_folder(tmp_path / "d", *noisy(), lungs=[LUNG] * 3)
    calls = []
    scorer = SliceScorer(discover(data), 64, lambda image: calls.append(1) or LUNG)
    assert len(scorer) == 3 and calls == []  # supplied lung masks: no segmenter call
    cached = [s for chunk in scorer.batches() for s in chunk]
    assert [s.id for s in cached] == ["images/s00.png", "images/s01.png", "images/s02.png"]
    np.testing.assert_array_equal(cached[0].prepared.field, LUNG)
    assert cached[0].truth.shape == (N, N)
    first = scorer.score(ThresholdRule(0.3, 0.6))
    assert scorer.score(ThresholdRule(0.3, 0.6)) == first
    assert set(first["lesion_dice"]) == {"ggo", "con"}
    assert first["mean_lesion_dice"] == pytest.approx(np.mean(list(first["lesion_dice"].values())))


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory):
    from stitchnet_tf.models.baselines import UNet

    model = UNet(width=0.125, alpha=0.35, seed=0)
    path = tmp_path_factory.mktemp("unet") / "unet.keras"
    model.save(path)
    return model, path


def test_scorer_gives_the_numbers_evaluate_reports(tmp_path, unet_file):
    data = write_folder(tmp_path / "d", *noisy(4), lungs=[LUNG] * 4)
    model, path = unet_file
    result = evaluate(path, data, tmp_path / "eval", size=64, batch_size=3, log=print)
    scores = SliceScorer(discover(data), 64, batch_size=3).score(model)
    assert result["summary"] == scores
    rule = ThresholdRule(0.35, 0.65, 64)
    result = evaluate(rule.save(tmp_path / "rule.json"), data, tmp_path / "e2", log=print)
    assert result["summary"] == SliceScorer(discover(data), 64).score(rule)
    assert (
        json.loads((tmp_path / "e2" / "evaluation.json").read_text())["summary"]
        == (result["summary"])
    )


class Checkpoints:
    """A stand-in for a Keras model in `RunState`: evaluate() gives pooled Dice favouring
    epoch 2, segment() is good in epoch 1 and calls everything healthy in epoch 2."""

    def __init__(self):
        self.epoch, self.stop_training, self.saved = 0, False, []

    def evaluate(self, data, verbose=0, return_dict=True):
        return {"loss": 1.0, "kl": 0.1, "dice_ggo": [0.1, 0.9][self.epoch], "dice_con": 0.5}

    def segment(self, x, lung=None, samples=0, decision=None):
        if self.epoch == 0:
            return ThresholdRule(0.3, 0.6).segment(x, lung)
        labels = np.where(np.asarray(lung)[..., 0] > 0.5, HEALTHY, BACKGROUND)
        probs = np.eye(4, dtype=np.float32)[labels]
        return {"probabilities": probs, "labels": labels, "entropy": np.zeros(labels.shape)}

    def save(self, path):
        path.write_text(f"epoch {self.epoch + 1}")
        self.saved.append(path)


def test_the_best_epoch_is_chosen_by_the_per_image_scorer(tmp_path):
    from stitchnet_tf.training import _make_callbacks

    data = write_folder(tmp_path / "d", *piecewise(), lungs=[LUNG] * 3)
    run_dir = (tmp_path / "run").resolve()
    run_dir.mkdir()
    state = {"epochs_done": 0, "best_score": None, "best_epoch": None}
    callback, commit = _make_callbacks(
        run_dir, state, "ggo_con", print, None, "val", 0, chief=False,
        val_set=discover(data), size=64,
    )  # fmt: skip
    model = Checkpoints()
    callback.set_model(model)
    commit.set_model(model)
    logs = [{"loss": 0.5}, {"loss": 0.4}]
    for epoch in (0, 1):
        model.epoch = epoch
        callback.on_epoch_end(epoch, logs[epoch])
        commit.on_epoch_end(epoch, logs[epoch])
    first, second = logs
    assert first["val_mean_lesion_dice"] == 1.0 and first["val_dice_ggo_image"] == 1.0
    assert first["val_dice_con_image"] == 1.0 and first["val_kl"] == 0.1
    assert second["val_mean_lesion_dice"] == 0.0 and second["val_dice_ggo"] == 0.9
    assert (state["best_epoch"], state["best_score"], state["epochs_done"]) == (1, 1.0, 2)
    assert (run_dir / "best.keras").read_text() == "epoch 1"
    assert (run_dir / "last.keras").read_text() == "epoch 2"
    assert json.loads((run_dir / "state.json").read_text())["best_epoch"] == 1
    # a NaN loss stops training without scoring or saving
    nan_logs = {"loss": math.nan}
    callback.on_epoch_end(2, nan_logs)
    commit.on_epoch_end(2, nan_logs)
    assert model.stop_training and state["nan_epoch"] == 3 and state["epochs_done"] == 2
    assert nan_logs["val_mean_lesion_dice"] == 0.0
