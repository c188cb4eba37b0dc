"""`stitchnet_tf.options` is the one owner of choices and defaults: the models, `TrainConfig` and
the CLI all read them from there, and the model registry names real constructor arguments."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest

from stitchnet_tf import options
from stitchnet_tf.errors import DataError


def _constructor(model: str):
    from stitchnet_tf.models.baselines import SegNet, UNet
    from stitchnet_tf.models.stitchnet import StitchNet

    return {"stitchnet": StitchNet, "unet": UNet, "segnet": SegNet}[model]


@pytest.mark.parametrize("model", options.MODELS)
def test_registry_names_real_constructor_arguments(model):
    parameters = inspect.signature(_constructor(model).__init__).parameters
    assert set(options.MODEL_REGISTRY[model].values()) <= set(parameters)


def test_stitchnet_defaults_are_the_constructors():
    parameters = inspect.signature(_constructor("stitchnet").__init__).parameters
    for name, value in options.STITCHNET_DEFAULTS.items():
        assert parameters[name].default == value, name


def test_train_config_defaults_are_the_shared_ones():
    from stitchnet_tf.training import TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name, value in options.TRAIN_DEFAULTS.items():
        assert fields[name] == value, name
    assert fields["size"] == options.PAPER_SIZE == options.PRESETS["paper"]["size"]


def test_model_options_maps_and_drops():
    values = dict(supervised="focal", backbone_alpha=0.5, free_bits=1.0, width=None)
    assert options.model_options("unet", values) == {"loss": "focal", "alpha": 0.5}
    assert options.model_options("segnet", values) == {"loss": "focal"}
    assert options.model_options("stitchnet", values) == {
        "supervised": "focal",
        "backbone_alpha": 0.5,
        "free_bits": 1.0,
    }
    with pytest.raises(DataError, match="unknown model 'vit'"):
        options.model_options("vit", {})


def test_model_size_rule():
    assert options.check_model_size(64) == 64
    for bad in (0, 16, 48, 100):
        with pytest.raises(DataError, match="not a positive multiple of 32"):
            options.check_model_size(bad)


def test_the_cli_starts_without_tensorflow():
    """The CLI builds its options from `options` alone: `--help` imports no TensorFlow."""
    code = (
        "import sys; from stitchnet_tf_cli.main import cli; "
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
