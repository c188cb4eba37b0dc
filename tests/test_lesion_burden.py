"""benchmarks/lesion_burden.py: which score of a run counts as shipped, and the rank correlation."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import lesion_burden  # noqa: E402


def _write(folder: Path, contender: str, fold: int, score: float, **extra) -> None:
    r = {"contender": contender, "fold": fold, "seed": 0, "mean_lesion_dice": score, **extra}
    (folder / f"{contender}-f{fold}-s0.json").write_text(json.dumps(r))


def test_a_run_never_calibrated_has_no_shipped_score_but_the_rule_keeps_its_own(tmp_path):
    _write(tmp_path, "threshold", 0, 0.40)
    _write(tmp_path, "stitchnet-semi", 0, 0.45)  # scored `prior` only
    _write(tmp_path, "stitchnet-image", 0, 0.42, calibrated={"mean_lesion_dice": 0.47})
    table = lesion_burden.scores(tmp_path)
    assert table["threshold", 0, 0] == (0.40, 0.40)
    assert table["stitchnet-semi", 0, 0] == (0.45, None)
    assert table["stitchnet-image", 0, 0] == (0.42, 0.47)


def test_rank_correlation_is_spearman_and_needs_four_pairs():
    assert lesion_burden.rank_correlation([1, 2, 3], [3, 2, 1]) is None
    rho, p = lesion_burden.rank_correlation([0.1, 0.2, 0.3, 0.4, 0.5], [5, 4, 3, 1, 2])
    assert rho == pytest.approx(-0.9) and 0 < p < 0.1
