"""benchmarks/train_vs_inference.py: the per-epoch log it reads and the table it writes."""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import train_vs_inference as tvi  # noqa: E402

HEADER = "epoch,clipped,grad_head,grad_level_5,grad_norm,kl,supervised,val_kl,val_supervised,"
HEADER += "val_mean_lesion_dice\n"
#: two epochs; the second has no val score (an empty cell)
LOG = HEADER + "0,0.09,2.0,3.5,5.7,0.05,1.2,0.01,0.6,0.551\n1,0.0,1.8,0.4,2.3,0.1,0.6,0.11,0.66,\n"


def test_epoch_log_keeps_ratios_gradients_clipping_and_the_val_score(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(LOG)
    rows = tvi.epoch_log(log)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["kl_ratio"] == pytest.approx(0.2)
    assert rows[0]["supervised_ratio"] == pytest.approx(0.5)
    assert rows[0]["clipped"] == pytest.approx(0.09) and rows[0]["grad_level_5"] == 3.5
    assert rows[0]["val_mean_lesion_dice"] == pytest.approx(0.551)
    assert "val_mean_lesion_dice" not in rows[1]  # an empty cell is left out, not read as 0


def test_report_names_the_largest_block_and_the_dataset_classes(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(LOG)
    row = {"checkpoint": "best", "part": "test", "rule": "prior", "mode": "inference"}
    result = {
        "run": "/runs/x",
        "machine": {"platform": "p", "cpus": 2},
        "intensity": "standardise",
        "best_epoch": 1,
        "epochs": 2,
        "scores": [row | {"dice_lesion": 0.45, "mean_lesion_dice": 0.45}],
        "log": tvi.epoch_log(log),
    }
    lines = tvi.report(result, "cmd")
    assert "| best | test | prior | inference | 0.450 | 0.450 |" in lines
    assert "| 1 | 0.551 | 0.20 | 1.200 | 0.600 | 0.50 | 5.7 | level_5 3.5 | 9.0% |" in lines
    assert any(line.startswith("| 2 | – |") and "head 1.8" in line for line in lines)
