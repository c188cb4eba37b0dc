"""How much of the unlabelled gain is lesion-extent calibration, and how much is a better model.

Usage (from the repository root, after `accuracy.py` has left run folders):
    python benchmarks/calibration_headroom.py --dataset medseg --protocol short+std+n10+ema \
        --runs /tmp/runs/ema/medseg/short+std+n10+ema
    python benchmarks/calibration_headroom.py --report    # rebuild the .md from the .json

For every StitchNet run folder `<runs>/stitchnet-{image,semi}-f<k>-s<seed>` that finished training,
it scores the fold's val and test slices (inference mode, the label-free lung field, as
`accuracy.py`) at every decision rule and lesion offset b that `train --decision auto` searches
(`options.DECISIONS` × `models.base.LESION_OFFSETS`, `SliceScorer.offset_scores`) and reports
test mean lesion Dice
- with `prior` at b = 0 (the uncalibrated model);
- with the rule and offset chosen on val (as shipped; ties as `SliceScorer.choose_calibration`);
- with the rule and offset that score best **on test** (hindsight: no user can choose it; an
  upper bound on what any calibration of the lesion extent could give).
The unlabelled gain (+ unlabelled − labelled only, paired by fold and seed) under the hindsight
choice is the part of the gain that no calibration of the labelled-only model can reach: a
better ranking of pixels, not a better threshold.
Writes `<results>/calibration_headroom.json` (per run, every score; merged with earlier runs,
so an interrupted call resumes) and `.md`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

# accuracy also puts the repository on sys.path
from accuracy import DATA, DATASETS, RESULTS, fold_file, stats

from stitchnet_tf.models.base import LESION_OFFSETS
from stitchnet_tf.options import DECISIONS

PAIR = ("stitchnet-image", "stitchnet-semi")
RUN = re.compile(r"stitchnet-(image|semi)-f(?P<fold>\d+)-s\d+")


def score_run(run: Path, dataset, fold: int, ds: str) -> dict:
    """{rule: {"val": [...], "test": [...]}}: mean lesion Dice at each offset of LESION_OFFSETS."""
    from stitchnet_tf.data.lung_unet import default_segmenter
    from stitchnet_tf.data.splits import Split
    from stitchnet_tf.evaluation import SliceScorer
    from stitchnet_tf.inference import load_model

    split = Split.load(fold_file(ds, fold))
    config = json.loads((run / "config.json").read_text())
    model = load_model(run).model
    scorers = {
        part: SliceScorer(
            dataset.subset(getattr(split, part)),
            config["size"],
            default_segmenter(),
            intensity=config.get("intensity", "none"),
        )
        for part in ("val", "test")
    }
    out = {}
    for rule in DECISIONS:
        out[rule] = {
            part: [
                s["mean_lesion_dice"]
                for s in scorer.offset_scores(model, LESION_OFFSETS, decision=rule)
            ]
            for part, scorer in scorers.items()
        }
    return out


def val_chosen(scores: dict) -> float:
    """Test score at the (rule, b) best on val, as `train --decision auto` chooses it."""
    from stitchnet_tf.evaluation import best_calibration

    rule, b = best_calibration({r: scores[r]["val"] for r in DECISIONS})
    return scores[rule]["test"][LESION_OFFSETS.index(b)]


def summary(scores: dict) -> dict:
    at_zero = LESION_OFFSETS.index(0.0)
    tests = [v for rule in DECISIONS for v in scores[rule]["test"] if v is not None]
    return {
        "prior": scores["prior"]["test"][at_zero],
        "val_chosen": val_chosen(scores),
        "hindsight": max(tests),
    }


def mean_se(values: list[float]) -> str:
    """ "+0.012 (0.004, 5)": the mean, its standard error and the number of runs."""
    s = stats(values)
    if not s["n"]:
        raise ValueError("no values to average")
    if s["n"] < 2:
        return f"{s['mean']:+.3f} (1 run)"
    return f"{s['mean']:+.3f} ({s['sem']:.3f}, {s['n']})"


def report(results: Path) -> None:
    table = json.loads((results / "calibration_headroom.json").read_text())
    lines = [
        "# How much of the unlabelled gain is calibration",
        "",
        "`python benchmarks/calibration_headroom.py` (see its docstring). Test mean lesion Dice of",
        "StitchNet labelled only / + unlabelled: `prior` at b = 0; rule and lesion offset chosen",
        "on val (as shipped); rule and offset best on test (hindsight, an upper bound on any",
        "calibration). Gain: + unlabelled − labelled only, paired; mean (SE, runs). Each cell:",
        "prior / val-chosen / hindsight.",
        "",
    ]
    for key, entry in sorted(table.items()):
        runs = entry["runs"]
        lines += [
            f"## {key}",
            "",
            f"Machine: {json.dumps(entry['machine'])}; {entry['date']}",
            "",
            *([entry["note"], ""] if "note" in entry else []),
            "| run | labelled only | + unlabelled | gain |",
            "|---|---|---|---|",
        ]
        gains: dict[str, list[float]] = {"prior": [], "val_chosen": [], "hindsight": []}
        for name in sorted(runs):
            if not name.startswith(PAIR[0]) or name.replace(*PAIR) not in runs:
                continue
            a, b = summary(runs[name]), summary(runs[name.replace(*PAIR)])
            for k in gains:
                gains[k].append(b[k] - a[k])
            cells = [" / ".join(f"{s[k]:.3f}" for k in gains) for s in (a, b)]
            lines.append(
                f"| {name.removeprefix(PAIR[0] + '-')} | {cells[0]} | {cells[1]} | "
                + " / ".join(f"{b[k] - a[k]:+.3f}" for k in gains)
                + " |"
            )
        if gains["prior"]:
            lines.append(
                "| **mean (SE, runs)** | | | " + " / ".join(mean_se(gains[k]) for k in gains) + " |"
            )
        lines.append("")
    (results / "calibration_headroom.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="medseg")
    parser.add_argument("--protocol", help="the runs' accuracy.py protocol, e.g. short+std+n10")
    parser.add_argument("--runs", type=Path, help="folder of <contender>-f<k>-s<seed> runs")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="only rebuild the .md")
    args = parser.parse_args(argv)
    out = args.results / "calibration_headroom.json"
    if not args.report:
        if args.protocol is None or args.runs is None:
            parser.error("--protocol and --runs are needed unless --report")
        from pipeline_throughput import machine

        from stitchnet_tf.data.datasets import discover
        from stitchnet_tf.fileio import atomic_write_text
        from stitchnet_tf.run import Run

        spec = DATASETS[args.dataset]
        dataset = discover(args.data / spec["folder"], require_labels=True, **spec["read"])
        key = f"{args.dataset} {args.protocol}"

        def read() -> dict:
            return json.loads(out.read_text()) if out.is_file() else {}

        for run in sorted(args.runs.glob("stitchnet-*-f*-s*")):
            match = RUN.fullmatch(run.name)
            done = read().get(key, {}).get("runs", {})
            if not match or run.name in done or not Run(run).finished():
                continue
            scores = score_run(run, dataset, int(match["fold"]), args.dataset)
            print(run.name, summary(scores), flush=True)
            table = read()  # as written now: another call may have added other runs meanwhile
            entry = table.setdefault(key, {"runs": {}})
            entry["runs"][run.name] = scores
            entry["machine"] = machine()
            entry["date"] = datetime.now(UTC).strftime("%Y-%m-%d")
            atomic_write_text(out, json.dumps(table, indent=1) + "\n")
    report(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
