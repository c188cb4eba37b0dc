"""`stitchnet-tf demo`, the README's main job, end to end at a tiny size (its own file, so
that the test runner's workers can run it beside the other slow files)."""

from __future__ import annotations

import pytest
from helpers import run


@pytest.mark.slow
def test_demo_runs_end_to_end_at_a_tiny_size(tmp_path):
    """The README's main job, shrunk to one step per model: every part it promises is written."""
    import json

    out = tmp_path / "demo"
    run("demo", "-o", out, "--size", 32, "--epochs", 1, "--steps-per-epoch", 1)
    report = json.loads((out / "demo.json").read_text())
    assert set(report) == {"stitchnet", "unet"}
    assert (out / "REPORT.md").is_file() and (out / "samples" / "samples.png").is_file()
    assert list((out / "styles").glob("*_styles.png"))
    for name in ("stitchnet", "unet"):
        assert (out / "runs" / name / "best.keras").is_file()
        assert (out / "eval" / name / "metrics.md").is_file()
