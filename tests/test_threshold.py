"""The two-threshold rule: its segment contract, its fit, its JSON file and `load_model`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import error_line, run
from slice_folders import LUNG, noisy, piecewise, write_folder

from stitchnet_tf.data.classes import BACKGROUND, CON, GGO, HEALTHY
from stitchnet_tf.data.datasets import discover
from stitchnet_tf.errors import DataError
from stitchnet_tf.evaluation import SliceScorer
from stitchnet_tf.inference import load_model
from stitchnet_tf.models.threshold import ThresholdRule, threshold_grid
from stitchnet_tf.threshold_fit import fit_threshold_rule, grid_objective


def test_segment_on_a_hand_made_array():
    rule = ThresholdRule(0.3, 0.6)
    x = np.array([[0.0, 0.1, 0.3], [0.45, 0.6, 0.95]], np.float32)[None, ..., None]
    lung = np.array([[1, 1, 1], [1, 1, 0]], np.float32)[None, ..., None]
    out = rule.segment(x, lung)
    # x == low is GGO, x == high is CON; outside the lung field background whatever x is
    expected = [[HEALTHY, HEALTHY, GGO], [GGO, CON, BACKGROUND]]
    assert out["labels"].tolist() == [expected]
    assert out["probabilities"].shape == (1, 2, 3, 4)
    np.testing.assert_array_equal(out["probabilities"].argmax(-1), out["labels"])
    np.testing.assert_array_equal(out["probabilities"].sum(-1), 1.0)
    assert out["entropy"].shape == (1, 2, 3) and not out["entropy"].any()
    # without a lung field, x > 0 is the field; tensors are accepted
    import tensorflow as tf

    out = rule.segment(tf.constant(x))
    assert out["labels"].tolist() == [[[BACKGROUND, HEALTHY, GGO], [GGO, CON, CON]]]
    # the rule has no latent to sample and no decision rule: asking for them is an error
    for kwargs in ({"samples": 3}, {"decision": "prior"}):
        with pytest.raises(DataError, match="apply to StitchNet only, not to ThresholdRule"):
            rule.segment(x, **kwargs)


def test_bad_cut_offs_and_shapes_are_refused():
    for low, high in ((0.6, 0.3), (-0.1, 0.5), (0.2, 1.5), (float("nan"), 0.5)):
        with pytest.raises(ValueError):
            ThresholdRule(low, high)
    with pytest.raises(ValueError):
        ThresholdRule(0.3, 0.6).segment(np.zeros((4, 4)))
    with pytest.raises(ValueError):
        threshold_grid(0.3)


def test_fit_finds_the_cut_offs_between_the_grey_levels(tmp_path):
    data = write_folder(tmp_path / "d", *piecewise(), lungs=[LUNG] * 3)
    rule = fit_threshold_rule(discover(data), 64)
    # healthy x = 0.2, GGO 0.502, CON 0.8: any low in (0.2, 0.502], high in (0.502, 0.8]
    assert 0.2 < rule.low <= 0.5 < rule.high <= 0.8
    assert rule.size == 64 and rule.fit_info["train_slices"] == 3
    assert rule.fit_info["train_mean_lesion_dice"] == 1.0
    assert rule.fit_info["lung_field"] == "supplied lung masks"


def test_grid_objective_is_the_scorers_mean_lesion_dice(tmp_path):
    """At the identity geometry the fast grid objective equals the exact per-image score."""
    data = write_folder(tmp_path / "d", *noisy(), lungs=[LUNG] * 3)
    scorer = SliceScorer(discover(data), 64)
    grid = threshold_grid(0.05)
    objective = grid_objective(scorer, grid)
    assert objective.shape == (21, 21) and np.isnan(objective[5, 2])
    for lo, hi in ((0, 0), (4, 10), (7, 12), (9, 9), (10, 20), (20, 20)):
        exact = scorer.score(ThresholdRule(grid[lo], grid[hi]))["mean_lesion_dice"]
        assert objective[lo, hi] == pytest.approx(exact, abs=1e-12), (lo, hi)
    rule = fit_threshold_rule(discover(data), 64, step=0.05, refine=5)
    assert rule.fit_info["train_mean_lesion_dice"] == pytest.approx(np.nanmax(objective))


def test_json_round_trip_and_load_model(tmp_path):
    rule = ThresholdRule(0.27, 0.5, 128, {"train_slices": 30})
    path = rule.save(tmp_path / "rule.json")
    d = json.loads(path.read_text())
    assert d["kind"] == "threshold_rule" and (d["low"], d["high"], d["size"]) == (0.27, 0.5, 128)
    back = ThresholdRule.load(path)
    assert (back.low, back.high, back.size, back.fit_info) == (0.27, 0.5, 128, {"train_slices": 30})
    assert rule.save(tmp_path).name == "threshold_rule.json"  # a folder gets the default name
    loaded = load_model(path)
    assert isinstance(loaded.model, ThresholdRule) and loaded.size == 128
    assert loaded.model.low == 0.27 and loaded.path == path
    (tmp_path / "other.json").write_text('{"kind": "something"}')
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "bad.json").write_text('{"kind": "threshold_rule", "low": 0.9, "high": 0.1}')
    for name, message in (
        ("other.json", "not a threshold-rule file"),
        ("broken.json", "cannot read threshold rule"),
        ("bad.json", "bad threshold rule"),
    ):
        with pytest.raises(DataError, match=message):
            load_model(tmp_path / name)


def test_cli_evaluates_a_rule_file(tmp_path):
    data = write_folder(tmp_path / "d", *piecewise(), lungs=[LUNG] * 3)
    rule = ThresholdRule(0.3, 0.6, 64).save(tmp_path / "rule.json")
    out = tmp_path / "eval"
    r = run("evaluate", "-m", rule, "-d", data, "-o", out)
    assert "| Overall |" in r.output and "scored 3 slices" in r.output
    info = json.loads((out / "evaluation.json").read_text())
    assert info["model_class"] == "ThresholdRule" and info["size"] == 64
    assert info["summary"]["mean_lesion_dice"] == 1.0
    mask_as_model = tmp_path / "d" / "masks" / "s00.png"
    r = run("evaluate", "-m", mask_as_model, "-d", data, "-o", tmp_path / "eval2", expect=2)
    assert "not a model" in error_line(r)
