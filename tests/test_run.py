"""`Run` owns a run folder: its file names, config.json and state.json parsing, checkpoints."""

from __future__ import annotations

import json

import pytest

from stitchnet_tf.errors import DataError
from stitchnet_tf.run import Run, TrainConfig


def test_config_and_state_round_trip(tmp_path):
    run = Run(tmp_path / "r")
    assert not run.is_run() and run.config() is None and run.state() is None
    assert run.size() is None and run.checkpoint() is None
    run.folder.mkdir()
    config = TrainConfig(labelled="lab", output=str(run.folder), size=96, model="unet")
    run.write_config(config)
    assert not run.is_run()  # a run needs its state too
    run.write_state({"epochs_done": 2})
    assert run.is_run() and run.state() == {"epochs_done": 2}
    assert run.config() == config and run.size() == 96
    assert run.config().labelled_spec().path.name == "lab"


def test_checkpoint_prefers_best(tmp_path):
    run = Run(tmp_path)
    run.last.write_bytes(b"")
    assert run.checkpoint() == run.last
    run.best.write_bytes(b"")
    assert run.checkpoint() == run.best


def test_bad_files_are_named(tmp_path):
    run = Run(tmp_path)
    (tmp_path / "state.json").write_text("[]")
    with pytest.raises(DataError, match=r"state\.json: not a valid state\.json"):
        run.state()
    (tmp_path / "config.json").write_text('{"labelled": "x", "output": "y", "colour": 1}')
    assert run.config().labelled == "x"  # fields it does not know are ignored
    (tmp_path / "config.json").write_text('{"output": "y"}')
    with pytest.raises(DataError, match=r"config\.json: not a valid config\.json"):
        run.config()
    assert run.size() is None


def test_old_runs_keep_the_recipe_they_were_trained_with(tmp_path):
    run = Run(tmp_path)
    (tmp_path / "config.json").write_text('{"labelled": "x", "output": "y"}')
    assert run.config().optimizer == "adam" and run.config().augmentation == "paper"


def test_finished_needs_every_epoch_and_best(tmp_path):
    """A run counts as finished (what the benchmarks' diagnostics read) once every epoch of its
    config is done and best.keras exists; an unreadable state file is not finished."""
    run = tmp_path / "unet-cons-f0-s0"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 3}))
    (run / "best.keras").write_bytes(b"")
    assert not Run(run).finished()  # no state yet
    (run / "state.json").write_text(json.dumps({"epochs_done": 2}))
    assert not Run(run).finished()
    (run / "state.json").write_text(json.dumps({"epochs_done": 3}))
    assert Run(run).finished()
    (run / "state.json").write_text("{not json")
    assert not Run(run).finished()
