"""benchmarks/calibration_headroom.py: the three scores of a run and the paired gains."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import calibration_headroom as headroom  # noqa: E402

from stitchnet_tf.models.base import LESION_OFFSETS  # noqa: E402


def _scores(val: dict, test: dict) -> dict:
    """rule -> {"val", "test"}: 0.3 everywhere but the given (rule, offset) cells."""

    def row(cells, rule):
        return [cells.get((rule, b), 0.3) for b in LESION_OFFSETS]

    return {r: {"val": row(val, r), "test": row(test, r)} for r in ("prior", "posterior")}


def test_prior_val_chosen_and_hindsight_read_the_right_cells():
    scores = _scores(
        val={("posterior", 1.0): 0.6},
        test={("prior", 0.0): 0.35, ("posterior", 1.0): 0.4, ("prior", -2.0): 0.7},
    )
    assert headroom.summary(scores) == {"prior": 0.35, "val_chosen": 0.4, "hindsight": 0.7}


def test_report_pairs_runs_by_fold_and_seed_and_skips_the_unpaired(tmp_path):
    image = _scores(val={}, test={("prior", 0.0): 0.40, ("prior", 1.0): 0.50})
    semi = _scores(val={}, test={("prior", 0.0): 0.45, ("posterior", 0.5): 0.52})
    table = {
        "medseg short+std+n10": {
            "machine": {"cpu": "test"},
            "date": "2026-12-06",
            "runs": {
                "stitchnet-image-f0-s0": image,
                "stitchnet-semi-f0-s0": semi,
                "stitchnet-image-f1-s0": image,  # no partner: not in the mean
            },
        }
    }
    (tmp_path / "calibration_headroom.json").write_text(json.dumps(table))
    headroom.report(tmp_path)
    md = (tmp_path / "calibration_headroom.md").read_text()
    assert "| f0-s0 | 0.400 / 0.400 / 0.500 | 0.450 / 0.450 / 0.520 |" in md
    assert "+0.050 / +0.050 / +0.020" in md
    assert "f1-s0" not in md
    assert "+0.050 (1 run) / +0.050 (1 run) / +0.020 (1 run)" in md


def test_mean_se_is_the_standard_error_of_the_mean():
    assert headroom.mean_se([0.1, 0.3]) == f"+0.200 ({0.1:.3f}, 2)"
    with pytest.raises(ValueError):
        headroom.mean_se([])
