"""Evaluation scores what users get: label-free lung field, per-image Table 1; `SliceScorer`
gives `evaluate`'s numbers and picks the training epoch; per-case 3-D Dice and HD95 beside."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from slice_folders import LUNG, N, noisy, piecewise, write_folder

from stitchnet_tf.data.classes import BACKGROUND, CON, GGO, HEALTHY
from stitchnet_tf.data.datasets import discover
from stitchnet_tf.evaluation import SliceScorer, evaluate
from stitchnet_tf.models.threshold import ThresholdRule
from stitchnet_tf.volume_metrics import dice_3d, hd95, surface_distances


def test_evaluate_takes_the_lung_field_from_the_segmenter_not_the_label(tmp_path):
    """A lesion outside the segmenter's lung field is predicted background: a miss."""
    images, lesions = piecewise(1)
    lesions[0][0:2, 30:40] = 1  # GGO drawn outside the lung field
    images[0][0:2, 30:40] = 128
    data = write_folder(tmp_path / "d", images, lesions)  # no lungs/: the segmenter decides
    rule = ThresholdRule(0.3, 0.6, 64).save(tmp_path / "rule.json")
    result = evaluate(rule, data, tmp_path / "eval", segmenter=lambda image: LUNG, log=print)
    assert result["lung_field"] == "lung segmenter"
    with open(tmp_path / "eval" / "metrics_per_image.csv") as f:
        ggo = next(r for r in csv.DictReader(f) if r["class"] == "ggo")
    inside = int((lesions[0][LUNG] == 1).sum())
    assert (int(ggo["tp"]), int(ggo["fp"]), int(ggo["fn"])) == (inside, 0, 20)
    assert float(ggo["f1"]) == pytest.approx(2 * inside / (2 * inside + 20))


def test_scorer_caches_the_label_free_slices(tmp_path):
    data = write_folder(tmp_path / "d", *noisy(), lungs=[LUNG] * 3)
    calls = []
    scorer = SliceScorer(discover(data), 64, lambda image: calls.append(1) or LUNG)
    assert len(scorer) == 3 and calls == []  # supplied lung masks: no segmenter call
    cached = [s for chunk in scorer.batches() for s in chunk]
    assert [s.id for s in cached] == ["images/s00.png", "images/s01.png", "images/s02.png"]
    np.testing.assert_array_equal(cached[0].prepared.field, LUNG)
    assert cached[0].truth.shape == (N, N)
    first = scorer.score(ThresholdRule(0.3, 0.6))
    assert scorer.score(ThresholdRule(0.3, 0.6)) == first
    assert set(first["lesion_dice"]) == {"ggo", "con"}
    assert first["mean_lesion_dice"] == pytest.approx(np.mean(list(first["lesion_dice"].values())))


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory):
    from stitchnet_tf.models.baselines import UNet

    model = UNet(width=0.125, alpha=0.35, seed=0)
    path = tmp_path_factory.mktemp("unet") / "unet.keras"
    model.save(path)
    return model, path


def test_scorer_gives_the_numbers_evaluate_reports(tmp_path, unet_file):
    data = write_folder(tmp_path / "d", *noisy(4), lungs=[LUNG] * 4)
    model, path = unet_file
    result = evaluate(path, data, tmp_path / "eval", size=64, batch_size=3, log=print)
    scores = SliceScorer(discover(data), 64, batch_size=3).score(model)
    assert result["summary"] == scores
    rule = ThresholdRule(0.35, 0.65, 64)
    result = evaluate(rule.save(tmp_path / "rule.json"), data, tmp_path / "e2", log=print)
    assert result["summary"] == SliceScorer(discover(data), 64).score(rule)
    assert (
        json.loads((tmp_path / "e2" / "evaluation.json").read_text())["summary"]
        == (result["summary"])
    )
    # 2-D slices without patient ids form no volume: volumes.csv is a header alone
    assert result["volumes"]["n_cases"] == 0
    assert (tmp_path / "e2" / "volumes.csv").read_text().count("\n") == 1
    assert "No per-volume metrics" in (tmp_path / "e2" / "metrics.md").read_text()


class Checkpoints:
    """A stand-in for a Keras model in `RunState`: evaluate() gives pooled Dice favouring
    epoch 2, segment() is good in epoch 1 and calls everything healthy in epoch 2."""

    def __init__(self):
        self.epoch, self.stop_training, self.saved = 0, False, []

    def evaluate(self, data, verbose=0, return_dict=True):
        return {"loss": 1.0, "kl": 0.1, "dice_ggo": [0.1, 0.9][self.epoch], "dice_con": 0.5}

    def segment(self, x, lung=None, samples=0, decision=None):
        if self.epoch == 0:
            return ThresholdRule(0.3, 0.6).segment(x, lung)
        labels = np.where(np.asarray(lung)[..., 0] > 0.5, HEALTHY, BACKGROUND)
        probs = np.eye(4, dtype=np.float32)[labels]
        return {"probabilities": probs, "labels": labels, "entropy": np.zeros(labels.shape)}

    def save(self, path):
        path.write_text(f"epoch {self.epoch + 1}")
        self.saved.append(path)


def test_the_best_epoch_is_chosen_by_the_per_image_scorer(tmp_path):
    from stitchnet_tf.training import _make_callbacks

    data = write_folder(tmp_path / "d", *piecewise(), lungs=[LUNG] * 3)
    run_dir = (tmp_path / "run").resolve()
    run_dir.mkdir()
    state = {"epochs_done": 0, "best_score": None, "best_epoch": None}
    callback, commit = _make_callbacks(
        run_dir, state, "ggo_con", print, None, "val", 0, chief=False,
        val_set=discover(data), size=64,
    )  # fmt: skip
    model = Checkpoints()
    callback.set_model(model)
    commit.set_model(model)
    logs = [{"loss": 0.5}, {"loss": 0.4}]
    for epoch in (0, 1):
        model.epoch = epoch
        callback.on_epoch_end(epoch, logs[epoch])
        commit.on_epoch_end(epoch, logs[epoch])
    first, second = logs
    assert first["val_mean_lesion_dice"] == 1.0 and first["val_dice_ggo_image"] == 1.0
    assert first["val_dice_con_image"] == 1.0 and first["val_kl"] == 0.1
    assert second["val_mean_lesion_dice"] == 0.0 and second["val_dice_ggo"] == 0.9
    assert (state["best_epoch"], state["best_score"], state["epochs_done"]) == (1, 1.0, 2)
    assert (run_dir / "best.keras").read_text() == "epoch 1"
    assert (run_dir / "last.keras").read_text() == "epoch 2"
    assert json.loads((run_dir / "state.json").read_text())["best_epoch"] == 1
    # a NaN loss stops training without scoring or saving
    nan_logs = {"loss": math.nan}
    callback.on_epoch_end(2, nan_logs)
    commit.on_epoch_end(2, nan_logs)
    assert model.stop_training and state["nan_epoch"] == 3 and state["epochs_done"] == 2
    assert nan_logs["val_mean_lesion_dice"] == 0.0


#: NIfTI voxel size (column i, row j, slice k) in mm of the volumes below.
ZOOMS = (0.6, 0.8, 2.5)
SPACING = (2.5, 0.8, 0.6)  # what the 3-D metrics use: (slice, row, column)
#: scored class -> (predicted class ids, truth bits) of MedSeg masks
CLASSES = {"ggo": ([GGO], [4]), "con": ([CON], [8]), "lesion": ([GGO, CON], [4, 8])}


def write_volumes(root, volumes: dict) -> Path:
    """NIfTI volumes `root/{images,masks,lungs}/<name>.nii.gz` from (images, lesions) lists of
    2-D slices (slice k stored as `data[:, :, k].T`, as `io` reads it back), voxel size ZOOMS."""
    import nibabel as nib

    affine = np.diag([*ZOOMS, 1.0])
    for sub in ("images", "masks", "lungs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, (images, lesions) in volumes.items():
        for sub, slices in (
            ("images", images),
            ("masks", lesions),
            ("lungs", [LUNG] * len(images)),
        ):
            data = np.stack([np.asarray(a, np.uint8).T for a in slices], -1)
            nib.save(nib.Nifti1Image(data, affine), root / sub / f"{name}.nii.gz")
    return root


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def stacked(labels: dict, ids: list[str | None]):
    """Predicted labels and truth bits of slices stacked in order (None: a slice not scored,
    empty in both)."""
    blank = (np.zeros((N, N), np.uint8), np.full((N, N), 15, np.uint8))
    pairs = [labels[i] if i is not None else blank for i in ids]
    return np.stack([p for p, _ in pairs]), np.stack([t for _, t in pairs])


def test_evaluate_writes_per_volume_dice_and_hd95_in_mm(tmp_path):
    root = write_volumes(tmp_path / "d", {"a": noisy(3, 0), "b": noisy(4, 1)})
    rule = ThresholdRule(0.3, 0.6, 64)
    result = evaluate(
        rule.save(tmp_path / "rule.json"), root, tmp_path / "eval", segmenter=lambda image: LUNG
    )
    rows = read_rows(tmp_path / "eval" / "volumes.csv")
    assert [r["case"] for r in rows] == ["images/a.nii.gz", "images/b.nii.gz"]
    assert [r["slices"] for r in rows] == ["3", "4"] and result["slices"] == 7
    assert {(r["kind"], r["spacing"], r["hd95_unit"]) for r in rows} == {
        ("volume", "2.5x0.8x0.6", "mm")
    }
    # reference: the same per-slice labels (original geometry), stacked by hand
    labels = {}
    SliceScorer(discover(root), 64, lambda image: LUNG).table(
        rule, on_slice=lambda i, p, t: labels.__setitem__(i, (p, t))
    )
    masks = {}
    for row, (name, n) in zip(rows, (("a", 3), ("b", 4)), strict=True):
        pred, truth = stacked(labels, [f"images/{name}.nii.gz#{k}" for k in range(n)])
        for c, (pc, tc) in CLASSES.items():
            p, t = np.isin(pred, pc), np.isin(truth, tc)
            masks.setdefault(c, []).append((p, t))
            assert 0 < float(row[f"{c}_dice"]) < 1
            assert float(row[f"{c}_dice"]) == pytest.approx(dice_3d(p, t))
            assert float(row[f"{c}_hd95"]) == pytest.approx(hd95(p, t, SPACING))
            assert float(row[f"{c}_hd95"]) != pytest.approx(hd95(p, t, ZOOMS))
    volumes = result["volumes"]
    assert volumes["n_cases"] == 2 and volumes["hd95_unit"] == "mm"
    dice = [float(r["lesion_dice"]) for r in rows]
    assert volumes["classes"]["lesion"]["dice"]["mean"] == pytest.approx(np.mean(dice))
    assert volumes["classes"]["lesion"]["dice"]["std"] == pytest.approx(np.std(dice))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["volumes"] == volumes
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["volumes"] == volumes
    md = (tmp_path / "eval" / "metrics.md").read_text()
    assert md.index("| Overall |") < md.index("### Per-volume 3-D metrics")
    assert "| Lesion | " in md and "HD95 (mm)" in md and "2 volume files" in md

    # per patient: both volumes are one case; Dice of the pooled voxels, HD95 of the pooled
    # surface distances (each volume measured within itself)
    (root / "patients.csv").write_text("file,patient\na.nii.gz,P1\nb.nii.gz,P1\n")
    result = evaluate(
        tmp_path / "rule.json", root, tmp_path / "e2", segmenter=lambda image: LUNG,
        cases="patient",
    )  # fmt: skip
    (row,) = read_rows(tmp_path / "e2" / "volumes.csv")
    assert (row["case"], row["kind"], row["slices"]) == ("P1", "patient", "7")
    for c, pairs in masks.items():
        p, t = (np.concatenate(x) for x in zip(*pairs, strict=True))
        assert float(row[f"{c}_dice"]) == pytest.approx(dice_3d(p, t))
        parts = [surface_distances(p, t, SPACING) for p, t in pairs]
        forward, backward = (np.concatenate(x) for x in zip(*parts, strict=True))
        expected = max(np.percentile(forward, 95), np.percentile(backward, 95))
        assert float(row[f"{c}_hd95"]) == pytest.approx(expected)

    # a volume scored in part: its slices keep their place, the ones between are not scored
    part = tmp_path / "part"
    part.mkdir()
    lines = ["image,mask,lung,slice"]
    for k in (0, 3):
        lines.append(",".join(str(root / s / "b.nii.gz") for s in ("images", "masks", "lungs")))
        lines[-1] += f",{k}"
    (part / "manifest.csv").write_text("\n".join(lines) + "\n")
    evaluate(tmp_path / "rule.json", part, tmp_path / "e3", segmenter=lambda image: LUNG)
    (row,) = read_rows(tmp_path / "e3" / "volumes.csv")
    assert row["slices"] == "2" and row["case"] == str(root / "images" / "b.nii.gz")
    b = "images/b.nii.gz"
    pred, truth = stacked(labels, [f"{b}#0", None, None, f"{b}#3"])
    for c, (pc, tc) in CLASSES.items():
        p, t = np.isin(pred, pc), np.isin(truth, tc)
        assert float(row[f"{c}_dice"]) == pytest.approx(dice_3d(p, t))
        assert float(row[f"{c}_hd95"]) == pytest.approx(hd95(p, t, SPACING))


def test_evaluate_stacks_2d_slices_per_patient(tiny_data, tmp_path):
    rule = ThresholdRule(0.3, 0.6, 64).save(tmp_path / "rule.json")
    result = evaluate(
        rule, tiny_data / "labelled", tmp_path / "eval", segmenter=lambda image: image > 0
    )
    rows = read_rows(tmp_path / "eval" / "volumes.csv")
    assert [r["case"] for r in rows] == ["P00", "P01", "P02", "P03"]
    assert {(r["kind"], r["slices"], r["spacing"], r["hd95_unit"]) for r in rows} == {
        ("patient", "2", "unknown", "px")
    }
    assert result["volumes"]["hd95_unit"] == "px" and result["volumes"]["kinds"] == {"patient": 4}
    md = (tmp_path / "eval" / "metrics.md").read_text()
    assert "HD95 (px)" in md and "stacks of 2-D slice files" in md
    assert "unknown slice spacing" in md


def test_offset_scores_match_the_calibrated_model_and_the_choice_is_their_best(tmp_path, unet_file):
    """One prediction pass rescored per lesion offset gives what `score` gives with the
    offset set on the model; `choose_calibration` keeps the best (ties: smaller |b|)."""
    from stitchnet_tf.models.base import LESION_OFFSETS

    data = write_folder(tmp_path / "d", *noisy(4), lungs=[LUNG] * 4)
    model, _ = unet_file
    scorer = SliceScorer(discover(data), 32)  # upsampled to the slices' 64 px before the argmax
    by_offset = scorer.offset_scores(model, LESION_OFFSETS)
    values = [-1.0 if s["mean_lesion_dice"] is None else s["mean_lesion_dice"] for s in by_offset]
    assert len(set(values)) > 1  # the offset moves the lesion extent, so the score
    for b in (-2.0, 0.0, 1.5):
        model.lesion_offset = b
        try:
            direct = scorer.score(model)
        finally:
            model.lesion_offset = 0.0
        assert direct == by_offset[LESION_OFFSETS.index(b)]
    chosen = scorer.choose_calibration(model)
    best = [b for b, v in zip(LESION_OFFSETS, values, strict=True) if v == max(values)]
    assert chosen["decision"] is None and chosen["lesion_offset"] == min(best, key=abs)
    assert chosen["scores"] == by_offset[LESION_OFFSETS.index(chosen["lesion_offset"])]
    assert chosen["plain"] == {None: by_offset[LESION_OFFSETS.index(0.0)]}
    assert model.lesion_offset == 0.0


def test_best_calibration_ranks_by_score_then_small_offset_then_earlier_rule():
    from stitchnet_tf.evaluation import best_calibration
    from stitchnet_tf.models.base import LESION_OFFSETS

    def at(scores: dict[float, float]) -> list[float]:  # offset -> score, the others 0.1
        return [scores.get(b, 0.1) for b in LESION_OFFSETS]

    assert best_calibration({"prior": at({1.0: 0.5}), "posterior": at({-2.0: 0.6})}) == (
        "posterior",
        -2.0,
    )
    # equal scores: the smaller |b| wins across rules, then the earlier rule, then the earlier b
    tie = {"prior": at({1.0: 0.5}), "posterior": at({0.5: 0.5})}
    assert best_calibration(tie) == ("posterior", 0.5)
    assert best_calibration({"prior": at({1.0: 0.5}), "posterior": at({1.0: 0.5})}) == (
        "prior",
        1.0,
    )
    assert best_calibration({None: at({-1.5: 0.5, 1.5: 0.5})}) == (None, -1.5)
    # a score of None (no lesion scored) ranks below every number
    assert best_calibration({None: [None] * 4 + [0.0] + [None] * 4}) == (None, 0.0)


def test_the_plain_rule_is_the_best_at_no_offset_ties_to_the_earlier(tiny_data, tiny_stitchnet_run):
    """StitchNet: `choose_calibration` scores every decision rule at b = 0 ("plain") and names
    the best as "plain_decision" (what `--decision auto` chose before the offset), ties going to
    the earlier rule of `options.DECISIONS`."""
    from stitchnet_tf.inference import load_model
    from stitchnet_tf.options import DECISIONS

    model = load_model(tiny_stitchnet_run).model
    model.lesion_offset = own = 1.0  # set aside: "plain" is b = 0 whatever the model's own b
    scorer = SliceScorer(discover(tiny_data / "labelled"), 32)
    chosen = scorer.choose_calibration(model)
    assert model.lesion_offset == own
    assert list(chosen["plain"]) == list(DECISIONS)
    model.lesion_offset = 0.0
    for rule in DECISIONS:
        assert chosen["plain"][rule] == scorer.score(model, decision=rule)
    values = [chosen["plain"][r]["mean_lesion_dice"] for r in DECISIONS]
    values = [-1.0 if v is None else v for v in values]
    assert chosen["plain_decision"] == DECISIONS[values.index(max(values))]
