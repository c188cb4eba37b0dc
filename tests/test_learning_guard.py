"""Learning guard: the default recipe must learn on real slices (`pytest --learning`).

A short run of the cpu preset's U-Net on the MedSeg train slices of cross-validation fold 0
(skipped without `../shared/data`). It catches a recipe that stops learning, without timing
anything: the training-slice lesion Dice of the last epoch must rise well above the first's.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEDSEG = ROOT.parent / "shared" / "data" / "medseg-covid" / "labelled"
FOLD = ROOT / "benchmarks" / "splits" / "medseg_cv5_fold0.json"

pytestmark = [
    pytest.mark.learning,
    pytest.mark.realdata,
    pytest.mark.skipif(not MEDSEG.is_dir(), reason=f"real data not present: {MEDSEG}"),
]


def test_cpu_preset_unet_learns_on_medseg(tmp_path):
    from stitchnet_tf.training import TrainConfig, preset_options, train

    budget, options = preset_options("cpu", "unet")
    config = TrainConfig(
        labelled=str(MEDSEG),
        output=str(tmp_path / "unet"),
        model="unet",
        size=budget["size"],
        epochs=4,
        steps_per_epoch=40,
        batch_size=budget["batch_size"],
        split=str(FOLD),
        model_options=options,
        preset="cpu",
    )
    train(config, verbose=0, log=lambda m: None)
    rows = list(csv.DictReader((tmp_path / "unet" / "log.csv").open()))
    first, last = float(rows[0]["dice_lesion"]), float(rows[-1]["dice_lesion"])
    print(f"training lesion Dice: epoch 1 {first:.3f}, epoch {len(rows)} {last:.3f}")
    assert last > first + 0.15 and last > 0.4
    assert float(rows[-1]["val_mean_lesion_dice"]) > 0.2  # and it carries over to val slices
