"""Table-1 metrics: hand-computed counts and scores, empty-truth policies, tables and files."""

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from stitchnet_tf.data.classes import ALL, LESION, NO_LESION
from stitchnet_tf.metrics import (
    METRICS,
    SCHEMES,
    Table1,
    confusion_counts,
    image_scores,
    lesion_dice,
    mean_lesion_dice,
    merge_markdown,
    overall_row,
)

# Multiclass example, exact truth labels as bits: 1 background, 2 healthy, 3 no lesion,
# 4 GGO, 8 consolidation.
TRUTH = np.array(
    [
        [3, 3, 3, 3],
        [1, 4, 4, 2],
        [3, 4, 8, 8],
        [3, 3, 8, 1],
    ],
    np.uint8,
)
PRED = np.array(
    [
        [3, 1, 1, 1],
        [1, 2, 2, 2],
        [1, 3, 3, 3],
        [1, 1, 3, 0],
    ]
)
# By hand:
# GGO  truth (1,1) (1,2) (2,1); predicted 2 at (1,1) (1,2) -> TP 2; (2,1) predicted 3 -> FN 1;
#      predicted 2 at (1,3) where truth is healthy -> FP 1.
# CON  truth (2,2) (2,3) (3,2) all predicted 3 -> TP 3, FN 0; predicted 3 at (0,0) (no lesion)
#      and at (2,1) (GGO) -> FP 2.
# background (no lesion): 10 truth pixels; predicted 0/1 at all but (0,0) and (1,3) -> TP 8,
#      FN 2; the 6 lesion pixels are all predicted 2/3 -> FP 0.
EXPECTED_COUNTS = {"ggo": (2, 1, 1), "con": (3, 2, 0), "background": (8, 0, 2)}
EXPECTED = {
    "ggo": {"iou": 2 / 4, "f1": 4 / 6, "recall": 2 / 3, "precision": 2 / 3},
    "con": {"iou": 3 / 5, "f1": 6 / 8, "recall": 3 / 3, "precision": 3 / 5},
    "background": {"iou": 8 / 10, "f1": 16 / 18, "recall": 8 / 10, "precision": 8 / 8},
}


def assert_scores(got, expected):
    assert set(got) == set(expected)
    for c, metrics in expected.items():
        assert set(got[c]) == set(METRICS)
        for m, v in metrics.items():
            if v is None:
                assert got[c][m] is None, (c, m)
            else:
                assert got[c][m] == pytest.approx(v), (c, m)


def test_schemes_and_metrics_constants():
    assert METRICS == ("iou", "f1", "recall", "precision")
    assert [n for n, _ in SCHEMES["multiclass"]] == ["ggo", "con", "background"]
    assert dict(SCHEMES["multiclass"]) == {"ggo": 4, "con": 8, "background": NO_LESION}
    assert dict(SCHEMES["lesion"]) == {"lesion": LESION, "background": NO_LESION}


def test_hand_computed_multiclass_counts_and_scores():
    assert confusion_counts(PRED, TRUTH) == EXPECTED_COUNTS
    assert_scores(image_scores(PRED, TRUTH), EXPECTED)


def test_unknown_pixels_are_ignored():
    truth = TRUTH.copy()
    truth[1, 3] = ALL  # was healthy, predicted GGO: an FP for ggo and an FN for background
    truth[0, 0] = ALL  # was no lesion, predicted CON: an FP for con and an FN for background
    assert confusion_counts(PRED, truth) == {
        "ggo": (2, 0, 1),
        "con": (3, 1, 0),
        "background": (8, 0, 0),
    }
    # A fully unknown image has no truth for any class.
    everything = np.full((4, 4), ALL, np.uint8)
    assert confusion_counts(PRED, everything) == {c: (0, 0, 0) for c in EXPECTED}


def test_partial_lesion_truth_is_ignored_for_ggo_and_con():
    truth = np.array(
        [
            [3, 3, 3, 3],
            [3, 4, 12, 3],
            [3, 8, 12, 3],
            [3, 3, 3, 15],
        ],
        np.uint8,
    )
    pred = np.array(
        [
            [1, 1, 1, 1],
            [1, 2, 2, 1],
            [1, 3, 3, 1],
            [1, 1, 1, 3],
        ]
    )
    # The 12 pixels are predicted GGO and CON, but their truth is only "some lesion": neither
    # an FP for ggo nor for con. For background they are negatives (predicted lesion: no FP).
    assert confusion_counts(pred, truth) == {
        "ggo": (1, 0, 0),
        "con": (1, 0, 0),
        "background": (11, 0, 0),
    }
    assert_scores(
        image_scores(pred, truth), {c: dict.fromkeys(METRICS, 1.0) for c in EXPECTED_COUNTS}
    )
    # For the lesion scheme the 12 pixels are positives.
    assert confusion_counts(pred, truth, "lesion") == {
        "lesion": (4, 0, 0),
        "background": (11, 0, 0),
    }


def test_lesion_scheme_with_binary_truth_and_four_class_predictions():
    L, N = LESION, NO_LESION
    truth = np.array(
        [
            [N, N, N, N],
            [N, L, L, N],
            [N, L, L, N],
            [N, N, N, N],
        ],
        np.uint8,
    )
    pred = np.array(
        [
            [0, 1, 1, 2],
            [1, 2, 3, 1],
            [0, 1, 2, 1],
            [0, 0, 0, 0],
        ]
    )
    # lesion: 4 truth pixels, predicted 2/3 at three -> TP 3, FN 1 ((2,1) predicted healthy);
    #   (0,3) predicted GGO outside lesions -> FP 1.
    # background: 12 truth pixels, all predicted 0/1 but (0,3) -> TP 11, FN 1; (2,1) -> FP 1.
    assert confusion_counts(pred, truth, "lesion") == {
        "lesion": (3, 1, 1),
        "background": (11, 1, 1),
    }
    assert_scores(
        image_scores(pred, truth, scheme="lesion"),
        {
            "lesion": {"iou": 3 / 5, "f1": 6 / 8, "recall": 3 / 4, "precision": 3 / 4},
            "background": {"iou": 11 / 13, "f1": 22 / 24, "recall": 11 / 12, "precision": 11 / 12},
        },
    )
    # Scored as multiclass, such a mask says nothing about GGO vs CON: both are left out.
    got = image_scores(pred, truth, scheme="multiclass")
    assert got["ggo"] == dict.fromkeys(METRICS) and got["con"] == dict.fromkeys(METRICS)


# Two images without consolidation in the truth: one with CON predicted, one without.
NO_CON_TRUTH = np.array([[3, 3, 3, 3], [3, 4, 4, 3], [3, 4, 4, 3], [3, 3, 3, 3]], np.uint8)
PRED_WITH_CON = np.array([[1, 1, 1, 3], [1, 2, 2, 1], [1, 2, 2, 1], [1, 1, 1, 1]])
PRED_WITHOUT_CON = np.array([[1, 1, 1, 1], [1, 2, 2, 1], [1, 2, 2, 1], [1, 1, 1, 1]])


@pytest.mark.parametrize(
    "absent, with_con, without_con",
    [("exclude", None, None), ("zero", 0.0, 0.0), ("one", 0.0, 1.0)],
)
def test_absent_policies_per_image(absent, with_con, without_con):
    got = image_scores(PRED_WITH_CON, NO_CON_TRUTH, absent=absent)
    assert got["con"] == dict.fromkeys(METRICS, with_con)
    got = image_scores(PRED_WITHOUT_CON, NO_CON_TRUTH, absent=absent)
    assert got["con"] == dict.fromkeys(METRICS, without_con)
    # Classes present in the truth are unaffected by the policy.
    assert got["ggo"] == dict.fromkeys(METRICS, 1.0)


def test_absent_policies_in_the_table():
    tables = {a: Table1(absent=a) for a in ("exclude", "zero", "one")}
    for t in tables.values():
        t.add("hand", PRED, TRUTH)  # CON present: precision 0.6, IoU 0.6
        t.add("with-con", PRED_WITH_CON, NO_CON_TRUTH)
        t.add("without-con", PRED_WITHOUT_CON, NO_CON_TRUTH)
    con = {a: t.summary()["classes"]["con"] for a, t in tables.items()}
    assert con["exclude"]["n_images"] == 1 and con["exclude"]["n_left_out"] == 2
    assert con["exclude"]["iou"] == {"mean": pytest.approx(0.6), "std": 0.0}
    assert con["zero"]["n_images"] == 3 and con["zero"]["n_left_out"] == 0
    assert con["zero"]["iou"]["mean"] == pytest.approx(0.6 / 3)
    assert con["one"]["n_images"] == 3 and con["one"]["n_left_out"] == 0
    assert con["one"]["iou"]["mean"] == pytest.approx((0.6 + 0 + 1) / 3)
    assert con["one"]["iou"]["std"] == pytest.approx(np.std([0.6, 0.0, 1.0]))
    for a, t in tables.items():
        ggo = t.summary()["classes"]["ggo"]
        assert (ggo["n_images"], ggo["n_left_out"]) == (3, 0), a
    rows = tables["exclude"].per_image_rows()
    left = {(r["image"], r["class"]) for r in rows if r["left_out"]}
    assert left == {("with-con", "con"), ("without-con", "con")}
    assert not any(r["left_out"] for r in tables["zero"].per_image_rows())


def test_precision_is_zero_when_nothing_is_predicted_but_truth_is_present():
    pred = np.ones((4, 4), int)  # all healthy: no GGO predicted
    got = image_scores(pred, NO_CON_TRUTH, absent="one")["ggo"]
    assert got == dict.fromkeys(METRICS, 0.0)
    assert confusion_counts(pred, NO_CON_TRUTH)["ggo"] == (0, 0, 4)


def test_mean_and_population_std_against_numpy():
    rng = np.random.default_rng(0)
    table = Table1()
    per_image = []
    for i in range(7):
        truth = rng.choice(np.array([1, 2, 3, 4, 8, 12, 15], np.uint8), size=(8, 8))
        if i == 3:
            truth[truth == 8] = 3  # one image without consolidation: left out for con
        pred = rng.integers(0, 4, size=(8, 8))
        per_image.append(table.add(f"img{i}", pred, truth))
    s = table.summary()
    assert s["n_images"] == 7
    for c in ("ggo", "con", "background"):
        kept = [p[c] for p in per_image if p[c]["iou"] is not None]
        assert s["classes"][c]["n_images"] == len(kept)
        assert s["classes"][c]["n_left_out"] == 7 - len(kept)
        for m in METRICS:
            values = np.array([k[m] for k in kept])
            assert s["classes"][c][m]["mean"] == pytest.approx(values.mean())
            assert s["classes"][c][m]["std"] == pytest.approx(values.std(ddof=0))
    assert s["classes"]["con"]["n_left_out"] == 1
    # A tiny hand case: ggo IoU 0.5 then 1.0 -> 0.75 ± 0.25.
    t = Table1()
    t.add("a", PRED, TRUTH)
    t.add("b", PRED_WITHOUT_CON, NO_CON_TRUTH)
    assert t.summary()["classes"]["ggo"]["iou"] == {"mean": 0.75, "std": 0.25}


def test_overall_is_the_mean_of_the_class_means():
    table = Table1()
    table.add("hand", PRED, TRUTH)
    table.add("without-con", PRED_WITHOUT_CON, NO_CON_TRUTH)
    s = table.summary()
    for m in METRICS:
        means = [s["classes"][c][m]["mean"] for c in ("ggo", "con", "background")]
        assert s["overall"][m] == pytest.approx(np.mean(means))
    # With a single image it is the mean over the classes of that image's scores.
    one = Table1()
    one.add("hand", PRED, TRUTH)
    expected = {m: np.mean([EXPECTED[c][m] for c in EXPECTED]) for m in METRICS}
    assert one.summary()["overall"] == pytest.approx(expected)


# The paper's Table 1 class means (docs/DESIGN.md §5) and its published Overall rows.
PAPER = {
    "U-Net": {
        "ggo": (0.391, 0.499, 0.608, 0.470),
        "con": (0.404, 0.490, 0.616, 0.485),
        "background": (0.983, 0.992, 0.987, 0.996),
        "overall": (0.593, 0.660, 0.737, 0.650),
    },
    "SegNet": {
        "ggo": (0.004, 0.007, 0.012, 0.009),
        "con": (0.021, 0.027, 0.057, 0.021),
        "background": (0.970, 0.984, 0.999, 0.971),
        "overall": (0.332, 0.339, 0.356, 0.334),
    },
    "StitchNet": {
        "ggo": (0.358, 0.471, 0.517, 0.489),
        "con": (0.318, 0.397, 0.539, 0.387),
        "background": (0.985, 0.992, 0.992, 0.993),
        "overall": (0.554, 0.620, 0.683, 0.623),
    },
}


@pytest.mark.parametrize("model", list(PAPER))
def test_paper_overall_row_arithmetic(model):
    rows = PAPER[model]
    class_means = {
        c: dict(zip(METRICS, rows[c], strict=True)) for c in ("ggo", "con", "background")
    }
    got = overall_row(class_means)
    for m, published in zip(METRICS, rows["overall"], strict=True):
        assert got[m] == pytest.approx(published, abs=1e-3), m


def _two_image_table(absent="exclude"):
    t = Table1(absent=absent)
    t.add("hand", PRED, TRUTH)
    t.add("without-con", PRED_WITHOUT_CON, NO_CON_TRUTH)
    return t


def test_markdown_layout():
    md = _two_image_table().to_markdown(title="MedSeg test", model_name="StitchNet")
    lines = md.splitlines()
    assert lines[0] == "### MedSeg test"
    assert "| class | model | IoU | F1 | Recall | Precision |" in lines
    # GGO: IoU 0.5 and 1.0; F1 2/3 and 1; recall 2/3 and 1; precision 2/3 and 1.
    assert (
        "| GGO | StitchNet | 0.750 ± 0.250 | 0.833 ± 0.167 | 0.833 ± 0.167 | 0.833 ± 0.167 |"
        in (lines)
    )
    # CON: only the hand image is kept.
    assert (
        "| CON | StitchNet | 0.600 ± 0.000 | 0.750 ± 0.000 | 1.000 ± 0.000 | 0.600 ± 0.000 |"
        in (lines)
    )
    body = [ln for ln in lines if ln.startswith("| ") and "---" not in ln][1:]
    assert [ln.split(" | ")[0] for ln in body] == ["| GGO", "| CON", "| Background", "| Overall"]
    overall = body[-1]
    assert "±" not in overall and re.fullmatch(
        r"\| Overall \| StitchNet( \| \d\.\d{3}){4} \|", overall
    )
    policy = [ln for ln in lines if ln.startswith("Empty ground truth")]
    assert len(policy) == 1
    assert "`exclude`" in policy[0]
    assert "GGO 0 of 2" in policy[0] and "CON 1 of 2" in policy[0]
    assert "Background 0 of 2" in policy[0]
    zero = _two_image_table("zero").to_markdown()
    assert "policy `zero`" in zero and "no image left out" in zero


def test_merge_markdown_groups_rows_by_class():
    unet = Table1()
    unet.add("hand", PRED, TRUTH)
    md = merge_markdown({"U-Net": unet, "StitchNet": _two_image_table()}, "Table 1")
    body = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    firsts = [tuple(ln.split(" | ")[:2]) for ln in body]
    assert firsts == [
        (f"| {c}", m)
        for c in ("GGO", "CON", "Background", "Overall")
        for m in ("U-Net", "StitchNet")
    ]
    assert md.splitlines()[0] == "### Table 1"
    assert "- U-Net: Empty ground truth" in md and "- StitchNet: Empty ground truth" in md
    with pytest.raises(ValueError, match="different schemes"):
        merge_markdown({"a": unet, "b": Table1(scheme="lesion")}, None)


def test_write_produces_four_consistent_files(tmp_path):
    table = _two_image_table()
    paths = table.write(tmp_path / "out", stem="medseg", model_name="StitchNet")
    assert {k: p.name for k, p in paths.items()} == {
        "markdown": "medseg.md",
        "csv": "medseg.csv",
        "json": "medseg.json",
        "per_image_csv": "medseg_per_image.csv",
    }
    assert all(p.is_file() for p in paths.values())
    summary = table.summary()

    assert paths["markdown"].read_text() == table.to_markdown(model_name="StitchNet")

    data = json.loads(paths["json"].read_text())
    assert data["model"] == "StitchNet"
    assert {k: v for k, v in data.items() if k != "model"} == summary

    with paths["csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["ggo", "con", "background", "overall"]
    for r in rows[:-1]:
        c = summary["classes"][r["class"]]
        assert r["model"] == "StitchNet"
        assert int(r["n_images"]) == c["n_images"] and int(r["n_left_out"]) == c["n_left_out"]
        for m in METRICS:
            assert float(r[f"{m}_mean"]) == pytest.approx(c[m]["mean"])
            assert float(r[f"{m}_std"]) == pytest.approx(c[m]["std"])
    for m in METRICS:
        assert float(rows[-1][f"{m}_mean"]) == pytest.approx(summary["overall"][m])
        assert rows[-1][f"{m}_std"] == ""

    with paths["per_image_csv"].open(newline="") as f:
        per_image = list(csv.DictReader(f))
    assert list(per_image[0]) == [
        "image", "class", "iou", "f1", "recall", "precision", "tp", "fp", "fn", "left_out",
    ]  # fmt: skip
    assert len(per_image) == 2 * 3
    hand = {r["class"]: r for r in per_image if r["image"] == "hand"}
    for c, (tp, fp, fn) in EXPECTED_COUNTS.items():
        assert (int(hand[c]["tp"]), int(hand[c]["fp"]), int(hand[c]["fn"])) == (tp, fp, fn)
        assert float(hand[c]["iou"]) == pytest.approx(EXPECTED[c]["iou"])
    con = next(r for r in per_image if r["image"] == "without-con" and r["class"] == "con")
    assert con["left_out"] == "True" and con["iou"] == ""


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=re.escape("(4, 4)") + ".*" + re.escape("(3, 4)")):
        image_scores(PRED, TRUTH[:3])
    with pytest.raises(ValueError, match="shape"):
        Table1().add("x", PRED[:, :2], TRUTH)


def test_invalid_inputs_and_options():
    with pytest.raises(ValueError, match="0..3"):
        image_scores(PRED + 1, TRUTH)
    with pytest.raises(ValueError, match="1..15"):
        image_scores(PRED, TRUTH * 0)
    with pytest.raises(ValueError, match="integers"):
        image_scores(PRED.astype(float), TRUTH)
    with pytest.raises(ValueError, match="scheme"):
        image_scores(PRED, TRUTH, scheme="fourclass")
    with pytest.raises(ValueError, match="absent"):
        Table1(absent="nan")
    t = Table1()
    t.add("a", PRED, TRUTH)
    with pytest.raises(ValueError, match="already added"):
        t.add("a", PRED, TRUTH)


def test_empty_table_and_fully_left_out_class():
    t = Table1(scheme="lesion")
    s = t.summary()
    assert s["n_images"] == 0 and s["overall"] == dict.fromkeys(METRICS)
    assert "n/a" in t.to_markdown()
    t.add("no-lesion", np.zeros((4, 4), int), np.full((4, 4), NO_LESION, np.uint8))
    s = t.summary()
    assert s["classes"]["lesion"]["iou"] == {"mean": None, "std": None}
    assert s["overall"]["iou"] == 1.0  # only background has a mean


def test_mean_lesion_dice_averages_the_lesion_classes_per_image_f1():
    t = Table1()
    t.add("a", PRED, TRUTH)
    t.add("b", np.where(PRED == 3, 2, PRED), TRUTH)  # CON called GGO: CON F1 0
    s = t.summary()
    dice = lesion_dice(s)
    assert set(dice) == {"ggo", "con"}
    assert dice["ggo"] == s["classes"]["ggo"]["f1"]["mean"]
    con_a = t.per_image_rows()[1]["f1"]  # image a, class con
    assert dice["con"] == s["classes"]["con"]["f1"]["mean"] == pytest.approx(con_a / 2)
    assert mean_lesion_dice(s) == pytest.approx((dice["ggo"] + dice["con"]) / 2)
    # lesion scheme: the lesion class alone; no lesion anywhere: None
    t = Table1(scheme="lesion")
    t.add("no-lesion", np.zeros((4, 4), int), np.full((4, 4), NO_LESION, np.uint8))
    assert lesion_dice(t.summary()) == {"lesion": None} and mean_lesion_dice(t.summary()) is None
    t.add("lesion", np.full((4, 4), 2), np.full((4, 4), LESION, np.uint8))
    assert mean_lesion_dice(t.summary()) == 1.0


def test_no_tensorflow_import():
    code = "import sys, stitchnet_tf.metrics; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
