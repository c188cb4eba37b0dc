"""benchmarks/repeatability.py: how it compares two runs' weights and what it reports."""

import sys
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import repeatability  # noqa: E402


def test_differences_count_every_differing_array_and_the_largest_gap():
    a = [np.zeros(3, "float32"), np.ones((2, 2), "float32"), np.full(1, 5.0, "float32")]
    b = [np.zeros(3, "float32"), np.ones((2, 2), "float32"), np.full(1, 5.0, "float32")]
    assert repeatability.differences(a, b) == {"weights": 3, "differ": 0, "max_abs": 0.0}
    b[1] = b[1].copy()
    b[1][0, 1] = np.nextafter(np.float32(1), np.float32(2))  # one ulp is a difference
    b[2] = np.full(1, 4.5, "float32")
    d = repeatability.differences(a, b)
    assert d["differ"] == 2 and d["max_abs"] == 0.5


def test_report_states_the_setting_and_every_result():
    result = {
        "args": {"seed": 0, "steps": 3, "batch": 8, "size": 128, "tf_default": False},
        "runs": {"stitchnet": {"weights": 1026, "differ": 0, "max_abs": 0.0}},
        "step": {"repeats": 5, "distinct": 1},
        "pipeline": {"run": "runs/x", "model": "stitchnet", "steps": 100, "first_differing": 94},
        "commit": "abc1234",
        "date": "2026-12-06",
        "seconds": 10.0,
        "machine": {"cores": 2},
    }
    text = repeatability.report(result)
    assert "| stitchnet | 1026 | 0 | 0 |" in text and "off (as in train)" in text
    assert "5 times: 1 distinct" in text and "first differ after step 94" in text
    result["pipeline"]["first_differing"] = None
    assert "identical after every step" in repeatability.report(result)
