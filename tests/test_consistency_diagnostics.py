"""benchmarks/strong_view.py and benchmarks/pseudo_labels.py: the pixel counts by hand."""

import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import pseudo_labels  # noqa: E402
import strong_view  # noqa: E402

from stitchnet_tf.data.classes import ALL, CON, GGO, HEALTHY, bits  # noqa: E402


def test_a_view_that_crosses_a_cut_off_counts_by_the_original_class():
    # lung pixels 0.1 (healthy), 0.4 (GGO), 0.6 (CON) under cut-offs 0.27 / 0.54; the fourth
    # pixel is outside the lung field
    x = np.array([0.1, 0.4, 0.6, 0.9], "float32").reshape(1, 1, 4, 1)
    lung = np.array([1, 1, 1, 0], "float32").reshape(1, 1, 4, 1)
    brighter = x * 1.4  # 0.14 healthy, 0.56 CON (moved), 0.84 CON
    same = x.copy()
    got = strong_view.changed(x, lung, [brighter, same], 0.27, 0.54)
    assert got["all"] == pytest.approx(1 / 6)
    assert got == pytest.approx({"all": 1 / 6, "healthy": 0.0, "GGO": 0.5, "CON": 0.0})


def test_pseudo_label_counts_by_hand():
    # 4 lung pixels: true healthy, GGO, CON and unknown; one pixel outside the field
    allowed = np.array([[bits(HEALTHY), bits(GGO), bits(CON), ALL, bits(0)]], np.uint8)
    lung = np.array([[True, True, True, True, False]])
    p = np.zeros((1, 5, 4), "float32")
    p[0, 0] = [0, 0.97, 0.02, 0.01]  # healthy, confident, right
    p[0, 1] = [0, 0.96, 0.04, 0.0]  # GGO called healthy, confident
    p[0, 2] = [0, 0.1, 0.3, 0.6]  # CON, not confident
    p[0, 3] = [0, 0.0, 0.99, 0.01]  # unknown, confident GGO: counted confident, not scored
    p[0, 4] = [1, 0, 0, 0]
    c = pseudo_labels.counts(p, allowed, lung, 0.95)
    assert c["lung"] == 4 and c["confident"] == 3
    assert c["known_confident"] == 2 and c["correct"] == 1
    assert c["by_label"] == [[1, 2], [0, 0], [0, 0]]
    assert c["lesion_as_healthy"] == [[1, 1], [0, 1]]
    s = pseudo_labels.shares(c)
    assert s["accuracy"] == 0.5 and s["ggo_called_healthy"] == 1.0 and s["precision_GGO"] is None
    # per-class thresholds (a class-balanced run): CON at 0.5 makes the CON pixel confident
    c = pseudo_labels.counts(p, allowed, lung, np.array([0.95, 0.95, 0.5]))
    assert c["confident"] == 4 and c["by_label"] == [[1, 2], [0, 0], [1, 1]]
