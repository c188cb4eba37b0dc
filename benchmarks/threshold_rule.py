"""The two-threshold rule on MedSeg: a no-learning contender, fitted on train, scored on test.

Usage (from the repository root; about a minute on a 2-core CPU):
    python benchmarks/threshold_rule.py [--data ../shared/data] [--size 128] [--step 0.01]

Fits `stitchnet_tf.models.threshold.ThresholdRule` (inside the lung field: x < low healthy,
low <= x < high GGO, x >= high consolidation) on the train part of
benchmarks/splits/medseg_seed0.json (30 MedSeg labelled slices) at the models' input size: the
slices are lung-cropped and resized as for the models, the lung field comes from the image alone
(MedSeg has no lung masks: the package's lung segmenter). The cut-offs maximise the train mean
per-image lesion Dice. The rule is then scored with `stitchnet_tf.evaluation.evaluate` (Table 1
in the original slice geometry) on the test part and the val part, next to the hand-chosen
cut-offs 0.25 / 0.50 as a reference. Writes benchmarks/results/threshold_rule.md and
threshold_rule.json; the JSON is itself a rule file:
`stitchnet-tf evaluate --model benchmarks/results/threshold_rule.json ...` reproduces the scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

HAND = (0.25, 0.50)  # the earlier hand-chosen cut-offs, as a reference


def shown(path: Path) -> str:
    """A path relative to the repository root (for the report)."""
    return os.path.relpath(Path(path).resolve(), ROOT)


def dice_cell(summary: dict, name: str) -> str:
    from stitchnet_tf.metrics import format_cell

    f1 = summary["classes"][name]["f1"]
    return format_cell(f1["mean"], f1["std"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--split", type=Path, default=ROOT / "benchmarks/splits/medseg_seed0.json")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--step", type=float, default=0.01)
    parser.add_argument("--refine", type=int, default=25, help="best grid pairs rescored exactly")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    labelled = args.data / "medseg-covid" / "labelled"
    if not labelled.is_dir():
        print(f"error: {labelled}: MedSeg labelled folder not found", file=sys.stderr)
        return 2

    from pipeline_throughput import machine

    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.lung_unet import default_segmenter
    from stitchnet_tf.data.splits import Split
    from stitchnet_tf.evaluation import evaluate
    from stitchnet_tf.fileio import atomic_write_text
    from stitchnet_tf.metrics import summaries_markdown
    from stitchnet_tf.models.threshold import ThresholdRule
    from stitchnet_tf.threshold_fit import fit_threshold_rule

    dataset = discover(labelled, require_labels=True)
    split = Split.load(args.split)
    split.check(dataset)
    segmenter = default_segmenter()
    start = time.time()
    rule = fit_threshold_rule(
        dataset.subset(split.train), args.size, segmenter, step=args.step, refine=args.refine
    )
    fit_seconds = time.time() - start
    print(f"fitted {rule} on {len(split.train)} train slices in {fit_seconds:.0f} s", flush=True)
    hand = ThresholdRule(*HAND, args.size, {"method": "hand-chosen"})

    scores: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, r in (("fitted", rule), ("hand", hand)):
            path = r.save(Path(tmp) / f"{name}.json")
            for part in ("test", "val"):
                out = Path(tmp) / f"{name}-{part}"
                result = evaluate(
                    path, labelled, out, split=args.split, part=part, log=lambda m: None
                )
                scores[f"{name}/{part}"] = result
                s = result["summary"]
                print(
                    f"{name} {r.low:.2f}/{r.high:.2f} {part}: GGO {dice_cell(s, 'ggo')}, "
                    f"CON {dice_cell(s, 'con')}, mean lesion Dice {s['mean_lesion_dice']:.4f}",
                    flush=True,
                )

    def part_result(key: str) -> dict:
        r = scores[key]
        s = r["summary"]
        return {
            "slices": r["slices"],
            "mean_lesion_dice": s["mean_lesion_dice"],
            "dice_ggo": s["classes"]["ggo"]["f1"],
            "dice_con": s["classes"]["con"]["f1"],
            "lung_field": r["lung_field"],
            "seconds": r["seconds"],
            "summary": s,
        }

    info = machine()
    command = (
        f"stitchnet-tf evaluate --model {shown(args.output / 'threshold_rule.json')} "
        f"--data {shown(labelled)} --split {shown(args.split)} --part test -o <folder>"
    )
    report = rule.to_dict() | {
        "benchmark": {
            "data": shown(labelled),
            "split": shown(args.split),
            "size": args.size,
            "segmenter": type(segmenter).__name__,
            "fit_seconds": fit_seconds,
            "fitted": {part: part_result(f"fitted/{part}") for part in ("test", "val")},
            "hand_chosen": {
                "low": hand.low,
                "high": hand.high,
                **{part: part_result(f"hand/{part}") for part in ("test", "val")},
            },
            "command": command,
            "script": "python benchmarks/threshold_rule.py",
            "machine": info,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        }
    }
    fitted_name = f"rule {rule.low:.2f}/{rule.high:.2f} (fitted)"
    hand_name = f"rule {hand.low:.2f}/{hand.high:.2f} (hand)"
    lines = [
        "# Two-threshold rule on MedSeg (no learning)",
        "",
        f"Rule, on the prepared slice x in [0, 1] (lung-cropped and resized to {args.size} px, "
        f"as the models see it): {rule.to_dict()['rule']}. Cut-offs fitted on the "
        f"{len(split.train)} train slices of `{shown(args.split)}` by grid search (step "
        f"{args.step}, the {rule.fit_info['refined']} best pairs rescored exactly) maximising "
        "the mean per-image lesion Dice: "
        f"**low = {rule.low:.2f}, high = {rule.high:.2f}** (train mean lesion Dice "
        f"{rule.fit_info['train_mean_lesion_dice']:.3f}). Lung field from the image alone "
        f"({type(segmenter).__name__}; MedSeg has no lung masks); the labels are used only "
        "for scoring, in the original slice geometry (`stitchnet_tf.evaluation.evaluate`). "
        f"Reference: the hand-chosen cut-offs {hand.low:.2f} / {hand.high:.2f}.",
        "",
        "Per-image Dice (mean ± std over slices; mean lesion Dice = mean of GGO and CON):",
        "",
        "| rule | part | slices | GGO Dice | CON Dice | mean lesion Dice |",
        "| --- | --- | ---: | --- | --- | ---: |",
    ]
    for name, key in ((fitted_name, "fitted"), (hand_name, "hand")):
        for part in ("test", "val"):
            r = scores[f"{key}/{part}"]
            s = r["summary"]
            lines.append(
                f"| {name} | {part} | {r['slices']} | {dice_cell(s, 'ggo')} | "
                f"{dice_cell(s, 'con')} | {s['mean_lesion_dice']:.3f} |"
            )
    lines.append("")
    for part in ("test", "val"):
        lines.append(
            summaries_markdown(
                {
                    fitted_name: scores[f"fitted/{part}"]["summary"],
                    hand_name: scores[f"hand/{part}"]["summary"],
                },
                title=f"Table 1, {part} part ({scores[f'fitted/{part}']['slices']} slices)",
            )
        )
    lines += [
        f"Machine: {info['cpu']}, {info['cores']} cores (shared), TensorFlow "
        f"{info['tensorflow']}; fit {fit_seconds:.0f} s. Reproduce: "
        f"`python benchmarks/threshold_rule.py`; the JSON beside this file is a rule file: "
        f"`{command}`.",
        "",
    ]
    args.output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output / "threshold_rule.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(args.output / "threshold_rule.md", "\n".join(lines))
    print(f"wrote {shown(args.output / 'threshold_rule.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
