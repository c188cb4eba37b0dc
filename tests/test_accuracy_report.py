"""The cross-validation report's statistics (benchmarks/accuracy.py): repeats count once,
the paired difference to the rule is taken fold by fold."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
spec = importlib.util.spec_from_file_location("accuracy", BENCHMARKS / "accuracy.py")
accuracy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(accuracy)


def _run(contender: str, fold: int, seed: int, ggo: float, con: float, **extra) -> dict:
    return {
        "dataset": "medseg",
        "budget": "full",
        "protocol": "full",
        "contender": contender,
        "fold": fold,
        "seed": seed,
        "dice_ggo": ggo,
        "pooled_ggo": ggo,
        "dice_con": con,
        "pooled_con": con,
        "mean_lesion_dice": (ggo + con) / 2,
        "lung_model": "shipped",
        **extra,
    }


def _report(tmp_path, runs: list[dict]) -> dict:
    """Write `runs` as finished results, rebuild the report, return its MedSeg full table."""
    folder = tmp_path / "cv" / "medseg" / "full"
    folder.mkdir(parents=True)
    for r in runs:
        (folder / f"{r['contender']}-f{r['fold']}-s{r['seed']}.json").write_text(json.dumps(r))
    accuracy.report(tmp_path)
    return json.loads((tmp_path / "accuracy_cv.json").read_text())["table"]["medseg"]["full"]


def test_stats_are_the_sample_mean_std_and_standard_error():
    s = accuracy.stats([0.2, 0.4, 0.6])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.4)
    assert s["std"] == pytest.approx(0.2) and s["sem"] == pytest.approx(0.2 / 3**0.5)


def test_a_seed_independent_rule_counts_once_and_pairs_by_fold(tmp_path):
    runs = [
        _run("threshold", 0, 0, 0.4, 0.2, low=0.27, high=0.5),
        _run("threshold", 0, 1, 0.4, 0.2, low=0.27, high=0.5),  # the same fit again
        _run("threshold", 1, 0, 0.5, 0.3, low=0.25, high=0.5),
        _run("unet", 0, 0, 0.5, 0.3),
        _run("unet", 0, 1, 0.6, 0.2),
        _run("unet", 1, 0, 0.5, 0.5),
    ]
    assert len(accuracy.distinct(runs)) == 5  # only the repeated rule fit goes
    table = _report(tmp_path, runs)
    assert table["threshold"]["runs"] == 2 and table["unet"]["runs"] == 3
    # unet - rule on the same fold: 0.4 - 0.3, 0.4 - 0.3, 0.5 - 0.4
    assert table["unet"]["delta_rule"]["mean"] == pytest.approx(0.1)
    assert table["unet"]["mean_lesion_dice"]["mean"] == pytest.approx((0.4 + 0.4 + 0.5) / 3)
    assert "| threshold | 2 | 2 |" in (tmp_path / "accuracy_cv.md").read_text()


def test_variants_pair_with_their_own_kind(tmp_path):
    """TTA rows pair with the base's TTA; the val-chosen rule pairs with the run's own `prior`."""
    auto = {"dice_ggo": 0.6, "pooled_ggo": 0.6, "dice_con": 0.4, "pooled_con": 0.4}
    runs = [
        _run("unet", 0, 0, 0.5, 0.3, tta=_run("unet", 0, 0, 0.6, 0.4)),
        _run(
            "stitchnet",
            0,
            0,
            0.5,
            0.4,
            tta=_run("stitchnet", 0, 0, 0.5, 0.5),
            auto=auto | {"mean_lesion_dice": 0.5, "decision": "posterior"},
        ),
    ]
    table = _report(tmp_path, runs)
    assert table["stitchnet"]["delta_base"]["mean"] == pytest.approx(0.05)  # 0.45 - 0.40
    tta = table["stitchnet + TTA"]["delta_base"]
    assert tta["base"] == "unet + TTA" and tta["mean"] == pytest.approx(0.0)  # 0.5 - 0.5
    chosen = table["stitchnet (val-chosen rule)"]
    assert chosen["delta_base"]["base"] == "stitchnet"
    assert chosen["delta_base"]["mean"] == pytest.approx(0.05)  # 0.5 - 0.45
    assert chosen["dice_ggo"]["mean"] == pytest.approx(0.6)


def test_the_calibrated_variant_pairs_as_shipped(tmp_path):
    """The val-chosen rule + offset (what `train --decision auto` ships): the unlabelled gain
    pairs calibrated with calibrated; without a paired base, with the same runs' val-chosen
    rule, else their plain score."""

    def cal(ggo, con):
        return {"dice_ggo": ggo, "pooled_ggo": ggo, "dice_con": con, "pooled_con": con} | {
            "mean_lesion_dice": (ggo + con) / 2,
            "lesion_offset": 0.5,
        }

    runs = [
        _run("unet", 0, 0, 0.4, 0.2, calibrated=cal(0.5, 0.3)),
        _run(
            "stitchnet-image",
            0,
            0,
            0.4,
            0.4,
            calibrated=cal(0.5, 0.4),
            auto={"mean_lesion_dice": 0.42},
        ),
        _run("stitchnet-semi", 0, 0, 0.5, 0.4, calibrated=cal(0.5, 0.5)),
    ]
    table = _report(tmp_path, runs)
    unet = table["unet (val-chosen rule + offset)"]["delta_base"]
    assert unet["base"] == "unet" and unet["mean"] == pytest.approx(0.1)  # 0.4 - 0.3
    semi = table["stitchnet-semi (val-chosen rule + offset)"]["delta_base"]
    assert semi["base"] == "stitchnet-image (val-chosen rule + offset)"
    assert semi["mean"] == pytest.approx(0.05)  # 0.5 - 0.45
    assert table["stitchnet-semi"]["delta_base"]["mean"] == pytest.approx(0.05)  # 0.45 - 0.4
    image = table["stitchnet-image (val-chosen rule + offset)"]["delta_base"]
    assert image["base"] == "stitchnet-image (val-chosen rule)"  # no `stitchnet` run to pair
    assert image["mean"] == pytest.approx(0.03)  # 0.45 - 0.42


def test_label_efficiency_curves_keep_the_val_chosen_rule_and_drop_tta():
    """The plot shows what users get: each run's own rule and the val-chosen one, not TTA;
    the all-labels point sits at the folds' train-slice count."""
    entry = {"mean_lesion_dice": {"mean": 0.4, "sem": 0.01, "n": 2}}
    table = {
        "medseg": {
            "short+n10": {
                "stitchnet": entry,
                "stitchnet + TTA": entry,
                "stitchnet (val-chosen rule)": entry,
            },
            "short": {"stitchnet": entry},
        }
    }
    curves = accuracy.label_efficiency(table)
    assert set(curves) == {("medseg", "short", "slices")}
    per = curves[("medseg", "short", "slices")]
    assert set(per) == {"stitchnet", "stitchnet (val-chosen rule)"}
    all_labels = len(json.loads(accuracy.fold_file("medseg", 0).read_text())["train"])
    assert sorted(per["stitchnet"]) == [10, all_labels]


def test_label_efficiency_by_patient_is_its_own_curve():
    """`--labelled-patients N` runs (+pN) count patients, and the all-labels point sits at
    fold 0's train patients."""
    entry = {"mean_lesion_dice": {"mean": 0.5, "sem": 0.02, "n": 1}}
    table = {
        "zenodo": {
            "short+std+p1": {"unet": entry},
            "short+std+p3": {"unet": entry},
            "short+std": {"unet": entry},
        }
    }
    curves = accuracy.label_efficiency(table)
    assert set(curves) == {("zenodo", "short+std", "patients")}
    fold0 = json.loads(accuracy.fold_file("zenodo", 0).read_text())
    assert sorted(curves[("zenodo", "short+std", "patients")]["unet"]) == [
        1,
        3,
        len(fold0["patients"]["train"]),
    ]


def test_protocol_names_the_labelled_patients_and_refuses_both_counts():
    from types import SimpleNamespace

    args = SimpleNamespace(
        budget="short",
        lung_models=None,
        intensity="standardise",
        labelled=None,
        labelled_patients=3,
        ema=None,
        unlabelled_slices=None,
    )
    assert accuracy.protocol(args) == "short+std+p3"
    args.unlabelled_slices = 20
    assert accuracy.protocol(args) == "short+std+p3+u20"
    args.unlabelled_slices = None
    args.labelled, args.labelled_patients, args.ema = 10, None, 0.99
    assert accuracy.protocol(args) == "short+std+n10+ema"
    # an EMA protocol is a table of its own, not a point on the label-efficiency curves
    entry = {"mean_lesion_dice": {"mean": 0.5, "sem": 0.02, "n": 1}}
    assert accuracy.label_efficiency({"medseg": {"short+std+n10+ema": {"unet": entry}}}) == {}
    with pytest.raises(SystemExit):
        accuracy.main(["--labelled", "10", "--labelled-patients", "1", "--report"])
    with pytest.raises(SystemExit):  # a cap on unlabelled slices is for --labelled-patients
        accuracy.main(["--labelled", "10", "--unlabelled-slices", "20", "--report"])


def test_semi_in_learns_from_the_withheld_slices_alone(tmp_path):
    """`stitchnet-semi-in` adds unlabelled slices from the labelled collection only (the
    withheld train slices, as zenodo20's semi runs); `stitchnet-semi` adds MedSeg's unlabelled
    folder too; `stitchnet-image` trains on the labelled slices alone."""
    from types import SimpleNamespace

    args = SimpleNamespace(
        budget="short",
        dataset="medseg",
        data=tmp_path,
        runs=tmp_path / "runs",
        lung_models=None,
        intensity="standardise",
        labelled=10,
        labelled_patients=None,
        ema=None,
        unlabelled_slices=None,
    )

    def config(contender):
        return accuracy.run_config(args, contender, 0, 1, tmp_path / "lab", 64, None)

    semi_in, semi, image = (
        config(c) for c in ("stitchnet-semi-in", "stitchnet-semi", "stitchnet-image")
    )
    assert semi_in.unlabelled is None and semi_in.unlabelled_per_batch is None
    assert semi.unlabelled == str(tmp_path / "medseg-covid" / "unlabelled")
    assert semi.unlabelled_per_batch is None
    assert image.unlabelled is None and image.unlabelled_per_batch == 0
    # the same labelled slices, model and budget: only the unlabelled stream differs
    for c in (semi, image):
        assert (c.max_labelled, c.seed, c.split, c.model_options, c.steps_per_epoch) == (
            semi_in.max_labelled,
            semi_in.seed,
            semi_in.split,
            semi_in.model_options,
            semi_in.steps_per_epoch,
        )
    assert accuracy.PAIRED_BASE["stitchnet-semi-in"] == "stitchnet-image"


def test_keep_unlabelled_drops_the_other_withheld_slices_from_training():
    from stitchnet_tf.data.splits import Split

    lab = ["a0", "a1"]
    withheld = [f"u{i}" for i in range(10)]
    split = Split(train=lab + withheld, val=["v"], test=["t"], unlabelled=withheld)
    kept = accuracy.keep_unlabelled(split, 3, seed=1)
    assert len(kept.unlabelled) == 3 and set(kept.unlabelled) <= set(withheld)
    # the labelled slices stay; the 7 other withheld slices are neither labelled nor unlabelled
    assert sorted(kept.train) == sorted(lab + kept.unlabelled)
    assert (kept.val, kept.test) == (split.val, split.test)
    assert accuracy.keep_unlabelled(split, 3, seed=1) == kept  # the seed fixes the choice
    assert {tuple(accuracy.keep_unlabelled(split, 3, seed=s).unlabelled) for s in range(5)} != {
        tuple(kept.unlabelled)
    }
    with pytest.raises(ValueError, match="1 to 10"):
        accuracy.keep_unlabelled(split, 11, seed=0)


# ---------------------------------------------------------------- error analysis

spec_e = importlib.util.spec_from_file_location("error_analysis", BENCHMARKS / "error_analysis.py")
error_analysis = importlib.util.module_from_spec(spec_e)
spec_e.loader.exec_module(error_analysis)


def test_medseg_runs_are_also_scored_lesion_vs_no_lesion():
    """`scored` adds the binary lesion Dice from the same predictions: GGO and CON swapped
    score 0 per class and 1 merged."""
    from stitchnet_tf.data.classes import BACKGROUND, CON, GGO, HEALTHY, bits
    from stitchnet_tf.metrics import Table1

    truth = np.full((2, 4), bits(BACKGROUND, HEALTHY), np.uint8)
    truth[0, :2], truth[1, :2] = bits(GGO), bits(CON)
    swapped = np.full((2, 4), HEALTHY)
    swapped[0, :2], swapped[1, :2] = CON, GGO

    class Scorer:  # `SliceScorer.table`'s contract on one slice
        absent, scheme = "exclude", "multiclass"

        def table(self, model, on_slice=None, **options):
            self.options = options
            table = Table1(self.scheme, self.absent)
            table.add("a", swapped, truth)
            if on_slice:
                on_slice("a", swapped, truth)
            return table

    scorer = Scorer()
    got = accuracy.scored(scorer, None, ("ggo", "con"), decision="posterior")
    assert got["dice_ggo"] == got["dice_con"] == got["mean_lesion_dice"] == 0.0
    assert got["dice_lesion"] == got["pooled_lesion"] == 1.0
    assert scorer.options == {"decision": "posterior"}
    # zenodo20's class is the lesion already: scored once, as it is
    scorer.scheme = "lesion"
    got = accuracy.scored(scorer, None, ("lesion",))
    assert set(got) == {"dice_lesion", "pooled_lesion", "mean_lesion_dice"}
    assert got["mean_lesion_dice"] == 1.0


def test_same_scores_checks_every_class():
    recorded = {"dice_ggo": 0.5, "dice_con": None}
    assert accuracy.same_scores(
        recorded, {"dice_ggo": 0.5 + 1e-9, "dice_con": None}, ("ggo", "con")
    )
    assert not accuracy.same_scores(recorded, {"dice_ggo": 0.51, "dice_con": None}, ("ggo", "con"))
    assert not accuracy.same_scores(recorded, {"dice_ggo": 0.5, "dice_con": 0.1}, ("ggo", "con"))


def test_the_binary_lesion_table_pairs_like_the_class_table(tmp_path):
    """Rows whose runs all record the binary lesion Dice get it, paired with the rule and the
    base by fold and seed (calibrated with calibrated); a row lacking it is left out."""

    def lesion(d):
        return {"dice_lesion": d, "pooled_lesion": d}

    runs = [
        _run("threshold", 0, 0, 0.3, 0.3, low=0.2, high=0.5, **lesion(0.5)),
        _run("threshold", 1, 0, 0.3, 0.3, low=0.2, high=0.4, **lesion(0.6)),
        _run("stitchnet-image", 0, 0, 0.4, 0.4, calibrated=lesion(0.6) | _cal(), **lesion(0.6)),
        _run("stitchnet-image", 1, 0, 0.4, 0.4, calibrated=lesion(0.6) | _cal(), **lesion(0.7)),
        _run("stitchnet-semi", 0, 0, 0.4, 0.4, calibrated=lesion(0.7) | _cal(), **lesion(0.7)),
        _run("stitchnet-semi", 1, 0, 0.4, 0.4, calibrated=lesion(0.6) | _cal(), **lesion(0.7)),
        _run("unet", 0, 0, 0.4, 0.4),  # scored before the binary Dice was recorded
    ]
    table = _report(tmp_path, runs)
    semi = table["stitchnet-semi"]["lesion_binary"]
    assert semi["dice"]["mean"] == pytest.approx(0.7)
    assert semi["delta_rule"]["mean"] == pytest.approx(0.15)  # 0.2, 0.1
    assert semi["delta_base"]["base"] == "stitchnet-image"
    assert semi["delta_base"]["mean"] == pytest.approx(0.05)  # 0.1, 0.0
    shipped = table["stitchnet-semi (val-chosen rule + offset)"]["lesion_binary"]["delta_base"]
    assert shipped["base"] == "stitchnet-image (val-chosen rule + offset)"
    assert shipped["mean"] == pytest.approx(0.05)  # 0.1, 0.0
    assert "lesion_binary" not in table["unet"]
    assert "Binary lesion Dice" in (tmp_path / "accuracy_cv.md").read_text()


def _cal() -> dict:
    return {"dice_ggo": 0.4, "pooled_ggo": 0.4, "dice_con": 0.4, "pooled_con": 0.4} | {
        "mean_lesion_dice": 0.4,
        "lesion_offset": 0.0,
    }


def test_error_analysis_scores_lesions_merged_and_split():
    from stitchnet_tf.data.classes import BACKGROUND, CON, GGO, HEALTHY, bits

    truth = np.full((2, 4), bits(BACKGROUND, HEALTHY), np.uint8)
    truth[0, :2], truth[1, :2] = bits(GGO), bits(CON)
    # every lesion pixel found, but GGO and CON swapped: class Dice 0, lesion Dice 1
    swapped = np.full((2, 4), HEALTHY)
    swapped[0, :2], swapped[1, :2] = CON, GGO
    (row,) = error_analysis.slice_rows({"a": (swapped, truth)})
    assert row["ggo"] == row["con"] == 0.0
    assert row["lesion"] == 1.0
    assert row["share"] == 0.5
    # the rule's split where the rule sees a lesion, the model's class elsewhere
    rule = np.full((2, 4), HEALTHY)
    rule[0, 0], rule[1, 0] = GGO, CON
    mixed = error_analysis.hybrid(swapped, rule)
    assert mixed.tolist() == [[GGO, CON, HEALTHY, HEALTHY], [CON, GGO, HEALTHY, HEALTHY]]


def test_error_analysis_pairs_slices_with_the_rule():
    rule = [{"fold": 0, "id": i, "ggo": 0.5, "con": None, "lesion": 0.5} for i in "abc"]
    rows = [
        {"fold": 0, "id": i, "ggo": g, "con": None, "lesion": 0.5}
        for i, g in zip("cba", (0.8, 0.6, 0.7), strict=True)
    ]
    d, se = error_analysis.paired(rows, rule, "class_mean")
    assert d == pytest.approx(0.2)
    assert se == pytest.approx(np.std([0.3, 0.1, 0.2], ddof=1) / np.sqrt(3))
    assert error_analysis.paired(rows, rule, "lesion") == (0.0, 0.0)


def test_unlabelled_bias_averages_lesion_probability_by_intensity_decile():
    """benchmarks/unlabelled_bias.py: π_GGO + π_CON (and r's) averaged within each decile."""
    bias_spec = importlib.util.spec_from_file_location(
        "unlabelled_bias", BENCHMARKS / "unlabelled_bias.py"
    )
    bias = importlib.util.module_from_spec(bias_spec)
    bias_spec.loader.exec_module(bias)
    x = np.arange(100, dtype=np.float32) / 100.0
    lesion = (x >= 0.9).astype(np.float32)  # only the brightest decile is lesion
    pi = np.stack([0 * x, 1 - lesion, lesion / 2, lesion / 2], -1)
    r = np.stack([0 * x, 1 - x, x / 2, x / 2], -1)
    edges = np.quantile(x, np.linspace(0.0, 1.0, bias.DECILES + 1))
    rows = bias.by_decile({"x": x, "pi": pi, "r": r}, edges)
    assert rows["pi_lesion"] == pytest.approx([0.0] * 9 + [1.0])
    assert rows["r_lesion"] == pytest.approx([np.mean(x[i * 10 : i * 10 + 10]) for i in range(10)])


def test_the_unlabelled_gain_pairs_each_scoring_with_its_own_kind(tmp_path):
    """The report's gain table: semi minus labelled-only StitchNet by fold and seed, plain with
    plain and calibrated with calibrated; a `+uK` protocol pairs with the labelled-only runs of
    its base protocol; zenodo20 gets no binary column (its class is the lesion)."""

    def run(contender, fold, protocol, d, shipped, dataset="medseg"):
        lesion = {"dice_lesion": d, "pooled_lesion": d}
        r = _run(contender, fold, 0, d, d, protocol=protocol, dataset=dataset, **lesion)
        shipped = {"mean_lesion_dice": shipped, "dice_lesion": shipped, "pooled_lesion": shipped}
        return r | {"calibrated": _cal() | shipped}

    runs = [
        run("stitchnet-image", 0, "n10", 0.40, 0.45),
        run("stitchnet-image", 1, "n10", 0.50, 0.50),
        run("stitchnet-semi", 0, "n10", 0.50, 0.46),
        run("stitchnet-semi", 1, "n10", 0.50, 0.50),
        run("stitchnet-semi", 2, "n10", 0.90, 0.90),  # no labelled-only run: left out
        run("stitchnet-semi", 0, "n10+u20", 0.60, 0.40),
        run("stitchnet-image", 0, "p1", 0.3, 0.3, dataset="zenodo"),
        run("stitchnet-semi", 0, "p1", 0.4, 0.3, dataset="zenodo"),
    ]
    for r in runs:
        folder = tmp_path / "cv" / r["dataset"] / r["protocol"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{r['contender']}-f{r['fold']}-s0.json").write_text(json.dumps(r))
    accuracy.report(tmp_path)
    gains = json.loads((tmp_path / "accuracy_cv.json").read_text())["unlabelled_gain"]
    by = {(g["dataset"], g["protocol"]): g for g in gains}
    n10 = by[("medseg", "n10")]
    assert n10["prior"]["n"] == 2 and n10["prior"]["mean"] == pytest.approx(0.05)  # 0.1, 0
    assert n10["as shipped"]["mean"] == pytest.approx(0.005)  # 0.01, 0
    assert n10["binary, as shipped"]["mean"] == pytest.approx(0.005)
    assert "val-chosen rule" not in n10  # no run has it
    u20 = by[("medseg", "n10+u20")]
    assert u20["prior"]["n"] == 1 and u20["prior"]["mean"] == pytest.approx(0.2)
    assert u20["as shipped"]["mean"] == pytest.approx(-0.05)
    p1 = by[("zenodo", "p1")]
    assert p1["prior"]["mean"] == pytest.approx(0.1) and p1["as shipped"]["mean"] == 0
    assert not any(c.startswith("binary") for c in p1)
    assert "## The unlabelled gain in every protocol" in (tmp_path / "accuracy_cv.md").read_text()
