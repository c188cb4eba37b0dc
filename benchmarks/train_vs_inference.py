"""Training-mode against inference-mode scores of a trained run, and its decision rules.

For a run folder: the per-image, lung-masked Table-1 Dice (what `evaluate` reports) on the
val and test slices of its split, with the model in inference mode (normalisation with moving
statistics; what users get) and in training mode (batch statistics; z at the posterior mean
in both), for each decision rule; plus the training log's val/train ratios of the KL and
supervised terms from the second epoch on. Issue 10 asks for inference within 0.05 of
training-mode Dice and the val terms within 1.5× of the training ones.

    python benchmarks/train_vs_inference.py --run RUN --data DATA/labelled --output OUT
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class TrainingMode:
    """A StitchNet whose `segment` runs `forward` in training mode (z at the posterior mean)."""

    def __init__(self, model):
        self.model = model

    def segment(self, x, lung=None, samples: int = 0, decision: str | None = None) -> dict:
        import tensorflow as tf

        x = tf.convert_to_tensor(x, tf.float32)
        rule = decision or self.model.decision
        out = self.model.forward(x, training=True, sample=False, kl=False)
        probs = self.model.class_probabilities(x, out, lung, rule)
        entropy = -tf.reduce_sum(probs * tf.math.log(tf.maximum(probs, 1e-12)), -1)
        return {"probabilities": probs, "labels": tf.argmax(probs, -1), "entropy": entropy}


def log_ratios(log_csv: Path) -> list[dict]:
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row = {"epoch": int(r["epoch"]) + 1}
        for term in ("kl", "supervised", "recon"):
            try:
                train, val = float(r[term]), float(r[f"val_{term}"])
            except (KeyError, ValueError):
                continue
            row[term] = train
            row[f"val_{term}"] = val
            if term != "recon":
                row[f"{term}_ratio"] = val / train if train else float("nan")
        out.append(row)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args()

    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.splits import Split
    from stitchnet_tf.evaluation import SliceScorer
    from stitchnet_tf.inference import load_model

    loaded = load_model(args.run)
    model = loaded.model
    split = Split.load(args.run / "split.json")
    dataset = discover(args.data, require_labels=True)
    result = {
        "run": str(args.run),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "scores": [],
    }
    for part in ("val", "test"):
        scorer = SliceScorer(dataset.subset(split.part(part)), loaded.size)
        for rule in ("prior", "posterior"):
            for mode, m in (("inference", model), ("training", TrainingMode(model))):
                s = scorer.score(m, decision=rule)
                row = {"part": part, "rule": rule, "mode": mode, "slices": len(scorer)}
                row |= {f"dice_{k}": v for k, v in s["lesion_dice"].items()}
                row["mean_lesion_dice"] = s["mean_lesion_dice"]
                result["scores"].append(row)
                print(json.dumps(row), flush=True)
    result["log"] = log_ratios(args.run / "log.csv")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "train_vs_inference.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Training mode vs inference mode: `{args.run.name}`",
        "",
        f"Command: `python benchmarks/train_vs_inference.py {' '.join(sys.argv[1:])}`; "
        f"{platform.platform()}, {os.cpu_count()} cores. Per-image Dice (Table-1 F1, lung field "
        "from the image, `exclude` policy), z at the posterior mean in both modes.",
        "",
        "| part | rule | mode | GGO | CON | mean lesion Dice |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["scores"]:
        lines.append(
            f"| {r['part']} | {r['rule']} | {r['mode']} | {r.get('dice_ggo', float('nan')):.3f} "
            f"| {r.get('dice_con', float('nan')):.3f} | {r['mean_lesion_dice']:.3f} |"
        )
    lines += [
        "",
        "Validation vs training loss terms per epoch (ratio = val / train):",
        "",
        "| epoch | kl | val_kl | ratio | supervised | val_supervised | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["log"]:
        if "kl" in r:
            lines.append(
                f"| {r['epoch']} | {r['kl']:.4f} | {r['val_kl']:.4f} | {r['kl_ratio']:.2f} | "
                f"{r['supervised']:.3f} | {r['val_supervised']:.3f} | "
                f"{r['supervised_ratio']:.2f} |"
            )
    (args.output / "train_vs_inference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
