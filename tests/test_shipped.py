"""Shipped models: names resolve to installed folders, a missing one is an error (the wheel
carrying them: tests/test_wheel.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from stitchnet_tf import shipped
from stitchnet_tf.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_model_is_in_the_repository() -> None:
    for name, model in shipped.SHIPPED.items():
        path = ROOT / "saved_models" / model.folder / model.file
        assert path.is_file(), f"{name}: {path} missing"
        assert (ROOT / "saved_models" / model.card).is_file(), f"{name}: no model card"
        installed = shipped.shipped_path(name)  # the installed copy (this checkout, or a clone)
        assert installed.name == path.name and installed.stat().st_size == path.stat().st_size


def test_names_resolve_and_paths_pass_through(tmp_path: Path) -> None:
    lesion = shipped.resolve("medseg-stitchnet")
    assert (
        lesion.is_dir() and (lesion / "best.keras").is_file() and (lesion / "config.json").is_file()
    )
    assert shipped.resolve("lung-unet").name == "lung_unet.keras"
    assert shipped.resolve(tmp_path / "runs" / "x") == tmp_path / "runs" / "x"
    # a folder that happens to carry a shipped name is the user's, not ours
    (tmp_path / "medseg-stitchnet").mkdir()
    here = Path.cwd()
    try:
        import os

        os.chdir(tmp_path)
        assert shipped.resolve("medseg-stitchnet") == Path("medseg-stitchnet")
    finally:
        os.chdir(here)


def test_missing_shipped_model_is_an_error_not_a_fallback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(shipped, "models_root", lambda: tmp_path)
    with pytest.raises(DataError, match="medseg-stitchnet.*not installed"):
        shipped.resolve("medseg-stitchnet")
    with pytest.raises(DataError, match="no shipped model of that name"):
        shipped.shipped_path("nope")
    rows = {r["name"]: r for r in shipped.list_models()}
    assert rows["medseg-stitchnet"]["installed"] is False and rows["lung-unet"]["size_mb"] is None


def test_model_class_by_name() -> None:
    """A name reaches the model file (loading it end to end: tests/test_wheel.py)."""
    from stitchnet_tf.inference import model_class

    assert model_class("medseg-stitchnet") == "StitchNet"


def test_cli_list_models() -> None:
    from stitchnet_tf_cli.main import cli

    result = CliRunner().invoke(cli, ["list-models"])
    assert result.exit_code == 0, result.output
    for name in shipped.SHIPPED:
        assert name in result.output
    assert "NOT INSTALLED" not in result.output
