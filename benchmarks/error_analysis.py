"""Where the MedSeg lesion Dice is lost: per-slice errors of trained cross-validation runs.

Usage (from the repository root, after `accuracy.py --budget full` has left its run folders):
    python benchmarks/error_analysis.py --runs ../runs/cv/medseg/full --folds 2 3 4 --seed 1

For each fold it fits the threshold rule on the fold's train slices and loads the U-Net and
StitchNet runs (`<runs>/<contender>-f<k>-s<seed>/best.keras`), then scores, in inference mode
with the label-free lung field (as `accuracy.py` does):
- every test slice: GGO and CON Dice, the binary lesion Dice (lesion vs no lesion: detection
  without the GGO/CON split) and the lesion pixels' share of the slice;
- the fold's own train slices, the same way (the generalisation gap, inference mode on both).
Writes `<results>/error_analysis.md` / `.json`: per-image means by lesion-share tercile, class
Dice against binary lesion Dice, train against test.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from accuracy import DATA, DATASETS, RESULTS, fold_file  # also puts the repository on sys.path

CONTENDERS = ("threshold", "unet", "stitchnet", "stitchnet posterior")
#: the models' lesion extent with the rule's GGO/CON split (`hybrid`)
HYBRIDS = ("unet + rule split", "stitchnet + rule split")


def predict(scorer, model, decision=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Slice id -> (predicted class ids, truth bits), in the slices' original geometry."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    scorer.table(
        model, decision=decision, on_slice=lambda i, y, truth: out.__setitem__(i, (y, truth))
    )
    return out


def hybrid(labels: np.ndarray, rule: np.ndarray) -> np.ndarray:
    """The model's lesion extent with the threshold rule's GGO/CON split where the rule calls
    the pixel a lesion (the model's own class elsewhere)."""
    from stitchnet_tf.data.classes import CON, GGO

    out = labels.copy()
    lesion = (labels == GGO) | (labels == CON)
    for c in (GGO, CON):
        out[lesion & (rule == c)] = c
    return out


def slice_rows(predicted: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[dict]:
    """Per-slice Dice ({id, ggo, con, lesion, share, counts}) of predicted labels."""
    from stitchnet_tf.metrics import confusion_counts

    rows = []
    for image_id, (labels, truth) in predicted.items():
        multi = confusion_counts(labels, truth, "multiclass")
        lesion = confusion_counts(labels, truth, "lesion")
        tp, _, fn = lesion["lesion"]
        rows.append(
            {
                "id": image_id,
                "ggo": dice(*multi["ggo"]),
                "con": dice(*multi["con"]),
                "lesion": dice(*lesion["lesion"]),
                "share": (tp + fn) / truth.size,  # lesion pixels' share of the slice
                "counts": {k: [int(v) for v in multi[k]] for k in ("ggo", "con")}
                | {"lesion": [int(v) for v in lesion["lesion"]]},
            }
        )
    return rows


def dice(tp: int, fp: int, fn: int) -> float | None:
    """F1 from counts; None when the class is absent from the truth."""
    from stitchnet_tf.metrics import scores_from_counts

    return scores_from_counts(tp, fp, fn, absent="exclude")["f1"]


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summary(rows: list[dict]) -> dict:
    """Per-image mean Dice and pooled Dice (`pooled_<class>`) over `rows`."""
    out = {k: mean(r[k] for r in rows) for k in ("ggo", "con", "lesion")}
    for k in ("ggo", "con", "lesion"):
        tp, fp, fn = np.sum([r["counts"][k] for r in rows], axis=0) if rows else (0, 0, 0)
        out[f"pooled_{k}"] = dice(int(tp), int(fp), int(fn))
    out["class_mean"] = mean([out["ggo"], out["con"]])
    out["n"] = len(rows)
    return out


def analyse(args) -> dict:
    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.lung_unet import default_segmenter
    from stitchnet_tf.data.splits import Split
    from stitchnet_tf.evaluation import SliceScorer
    from stitchnet_tf.inference import load_model
    from stitchnet_tf.threshold_fit import fit_threshold_rule

    dataset = discover(args.data / DATASETS["medseg"]["folder"], require_labels=True)
    segmenter = default_segmenter()
    test_rows: dict[str, list[dict]] = {c: [] for c in CONTENDERS + HYBRIDS}
    train_rows: dict[str, list[dict]] = {c: [] for c in CONTENDERS + HYBRIDS}
    for fold in args.folds:
        split = Split.load(fold_file("medseg", fold))
        split.check(dataset)
        test = SliceScorer(dataset.subset(split.test), args.size, segmenter)
        train = SliceScorer(dataset.subset(split.train), args.size, segmenter)
        models = {
            "threshold": fit_threshold_rule(dataset.subset(split.train), args.size, segmenter)
        }
        for contender in ("unet", "stitchnet"):
            run = args.runs / f"{contender}-f{fold}-s{args.seed}"
            models[contender] = load_model(run).model
        decisions = {"stitchnet posterior": ("stitchnet", "posterior")}
        for rows, scorer in ((test_rows, test), (train_rows, train)):
            predicted = {c: predict(scorer, m) for c, m in models.items()}
            for c, (name, decision) in decisions.items():
                predicted[c] = predict(scorer, models[name], decision)
            rule = predicted["threshold"]
            for c in ("unet", "stitchnet"):
                predicted[f"{c} + rule split"] = {
                    i: (hybrid(labels, rule[i][0]), truth)
                    for i, (labels, truth) in predicted[c].items()
                }
            for contender, got in predicted.items():
                got = [r | {"fold": fold} for r in slice_rows(got)]
                rows[contender] += got
                print(f"fold {fold} {contender}: {len(got)} slices {summary(got)}", flush=True)
    shares = sorted(r["share"] for r in test_rows["threshold"])
    cuts = [shares[len(shares) // 3], shares[2 * len(shares) // 3]]
    groups = {
        f"lesion share < {cuts[0]:.3f}": lambda s: s < cuts[0],
        f"{cuts[0]:.3f} – {cuts[1]:.3f}": lambda s: cuts[0] <= s < cuts[1],
        f"≥ {cuts[1]:.3f}": lambda s: s >= cuts[1],
    }
    return {
        "folds": args.folds,
        "seed": args.seed,
        "size": args.size,
        "test": {c: summary(r) for c, r in test_rows.items()},
        "train": {c: summary(r) for c, r in train_rows.items()},
        "by_share": {
            name: {
                c: summary([r for r in rows if keep(r["share"])]) for c, rows in test_rows.items()
            }
            for name, keep in groups.items()
        },
        "slices": test_rows,
    }


def paired(rows: list[dict], rule: list[dict], key: str) -> tuple[float, float] | None:
    """Mean and standard error of the per-slice difference to the rule in `key` (`lesion`, or
    `class_mean`: the mean of the slice's GGO and CON Dice)."""

    def value(r: dict) -> float | None:
        return mean([r["ggo"], r["con"]]) if key == "class_mean" else r[key]

    by_slice = {(r["fold"], r["id"]): value(r) for r in rule}
    d = [
        value(r) - by_slice[(r["fold"], r["id"])]
        for r in rows
        if value(r) is not None and by_slice.get((r["fold"], r["id"])) is not None
    ]
    if len(d) < 2:
        return None
    return float(np.mean(d)), float(np.std(d, ddof=1) / np.sqrt(len(d)))


def fmt_delta(d: tuple[float, float] | None) -> str:
    return "–" if d is None else f"{d[0]:+.3f} ({d[1]:.3f})"


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def write_report(result: dict, results: Path, command: str) -> None:
    lines = [
        "# Where the MedSeg lesion Dice is lost",
        "",
        f"`{command}`; folds {result['folds']}, seed {result['seed']}, {result['size']} px, the "
        "full-budget runs of `accuracy.py` (best epoch by val), inference mode, label-free lung "
        "field (shipped lung model), per-image Dice. `lesion`: lesion vs no lesion (GGO and CON "
        "merged), the Dice a perfect GGO/CON split would leave; `class mean`: the mean of GGO "
        "and CON Dice (what the accuracy tables report).",
        "",
        "## Test slices and the fold's own train slices",
        "",
        "Δ rule: mean per-slice difference to the threshold rule on the same test slices "
        "(standard error).",
        "",
        "| contender | slices | GGO | CON | class mean | Δ rule | lesion (binary) | Δ rule | "
        "pooled GGO / CON | train class mean | train lesion | train pooled GGO / CON |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rule = result["slices"]["threshold"]
    for c in CONTENDERS + HYBRIDS:
        t, tr, rows = result["test"][c], result["train"][c], result["slices"][c]
        lines.append(
            f"| {c} | {t['n']} | {fmt(t['ggo'])} | {fmt(t['con'])} | {fmt(t['class_mean'])} | "
            f"{fmt_delta(paired(rows, rule, 'class_mean'))} | {fmt(t['lesion'])} | "
            f"{fmt_delta(paired(rows, rule, 'lesion'))} | "
            f"{fmt(t['pooled_ggo'])} / {fmt(t['pooled_con'])} | "
            f"{fmt(tr['class_mean'])} | {fmt(tr['lesion'])} | "
            f"{fmt(tr['pooled_ggo'])} / {fmt(tr['pooled_con'])} |"
        )
    lines += [
        "",
        "## Test slices by lesion share (terciles of the lesion pixels' share of the slice)",
        "",
        "| share | contender | slices | GGO | CON | lesion (binary) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, by in result["by_share"].items():
        for c in CONTENDERS + HYBRIDS:
            s = by[c]
            lines.append(
                f"| {name} | {c} | {s['n']} | {fmt(s['ggo'])} | {fmt(s['con'])} | "
                f"{fmt(s['lesion'])} |"
            )
    lines += ["", f"Run {result['date']} on {result['machine']}.", ""]
    (results / "error_analysis.md").write_text("\n".join(lines))
    (results / "error_analysis.json").write_text(json.dumps(result, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, help="accuracy.py's run folders")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="only rebuild the report")
    args = parser.parse_args(argv)
    if args.runs is None and not args.report:
        parser.error("--runs is required (unless --report)")
    from pipeline_throughput import machine

    if args.report:
        result = json.loads((args.results / "error_analysis.json").read_text())
    else:
        result = analyse(args)
        result |= {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "command": "python benchmarks/error_analysis.py " + " ".join(argv or sys.argv[1:]),
        }
    write_report(result, args.results, result.get("command", ""))
    print((args.results / "error_analysis.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
