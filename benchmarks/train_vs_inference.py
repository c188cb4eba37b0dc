"""Training-mode against inference-mode scores of a trained run, per checkpoint and decision rule.

For a run folder: the per-image, lung-masked Table-1 Dice (what `evaluate` reports) on the
val and test slices of its split, with the model in inference mode (normalisation with moving
statistics; what users get) and in training mode (batch statistics; z at the posterior mean
in both), for each decision rule and each checkpoint asked for (best.keras: the val-chosen
epoch; last.keras: the end of the budget). Plus, from the training log, per epoch: the val
score that chose the epoch, the val/train ratios of the KL and supervised terms, the global
and per-block gradient norms and the share of steps whose gradients were clipped. Issue 10
asks for inference within 0.05 of training-mode Dice and the val terms within 1.5× of the
training ones.

The slices are read as the run read them (its config's folder, mask values, sub-folders and
intensity); `--data` overrides the folder.

    python benchmarks/train_vs_inference.py --run RUN [--data DATA/labelled] --output OUT \
        [--checkpoints best last]
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

LOG_TERMS = ("kl", "supervised", "recon")


class TrainingMode:
    """A StitchNet whose `segment` runs `forward` in training mode (z at the posterior mean)."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name: str):  # everything else (size, intensity, …) is the model's
        return getattr(self.model, name)

    def segment(self, x, lung=None, samples: int = 0, decision: str | None = None) -> dict:
        import tensorflow as tf

        x = tf.convert_to_tensor(x, tf.float32)
        rule = decision or self.model.decision
        out = self.model.forward(x, training=True, sample=False, kl=False)
        probs = self.model.class_probabilities(x, out, lung, rule)
        entropy = -tf.reduce_sum(probs * tf.math.log(tf.maximum(probs, 1e-12)), -1)
        return {"probabilities": probs, "labels": tf.argmax(probs, -1), "entropy": entropy}


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def epoch_log(log_csv: Path) -> list[dict]:
    """Per epoch of `log.csv`: the train and val loss terms with their val / train ratios,
    the val mean lesion Dice, the gradient norms (`grad_*`) and the clipped share."""
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row: dict = {"epoch": int(r["epoch"]) + 1}
        for term in LOG_TERMS:
            train, val = _float(r.get(term)), _float(r.get(f"val_{term}"))
            if train is None or val is None:
                continue
            row[term], row[f"val_{term}"] = train, val
            if term != "recon":
                row[f"{term}_ratio"] = val / train if train else float("nan")
        for key, value in r.items():
            if key.startswith("grad_") or key in ("clipped", "val_mean_lesion_dice"):
                if (number := _float(value)) is not None:
                    row[key] = number
        out.append(row)
    return out


def run_dataset(run, data: str | None):
    """The run's labelled slices, read with the options it was trained with (`data`: another
    folder), and its intensity preprocessing."""
    import dataclasses

    config = run.config()
    spec = config.labelled_spec()
    if data:
        spec = dataclasses.replace(spec, path=Path(data))
    return spec.discover(require_labels=True), config.intensity


def report(result: dict, command: str) -> list[str]:
    """train_vs_inference.md's lines from the result dict."""
    classes = [k[5:] for k in result["scores"][0] if k.startswith("dice_")]
    lines = [
        f"# Training mode vs inference mode: `{Path(result['run']).name}`",
        "",
        f"Command: `{command}`; {result['machine']['platform']}, {result['machine']['cpus']} "
        "cores. Per-image Dice (Table-1 F1, lung field from the image, `exclude` policy), z at "
        f"the posterior mean in both modes; intensity `{result['intensity']}`. Best epoch "
        f"{result['best_epoch']} of {result['epochs']}.",
        "",
        "| checkpoint | part | rule | mode | "
        + " | ".join(c.upper() for c in classes)
        + " | mean lesion Dice |",
        "| --- | --- | --- | --- | " + "--- | " * len(classes) + "--- |",
    ]
    for r in result["scores"]:
        dice = " | ".join(f"{r[f'dice_{c}']:.3f}" for c in classes)
        lines.append(
            f"| {r['checkpoint']} | {r['part']} | {r['rule']} | {r['mode']} | {dice} "
            f"| {r['mean_lesion_dice']:.3f} |"
        )
    log = result["log"]
    grads = sorted({k for r in log for k in r if k.startswith("grad_") and k != "grad_norm"})
    lines += [
        "",
        "Per epoch: val mean lesion Dice (what chose the epoch), val / train loss ratios, the "
        "global gradient norm before clipping, the largest block norm and the share of steps "
        "clipped (epoch means):",
        "",
        "| epoch | val Dice | kl ratio | supervised | val_supervised | ratio | grad norm "
        "| largest block | clipped |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(r, key, fmt):
        return format(r[key], fmt) if key in r else "–"

    for r in log:
        blocks = {g[5:]: r[g] for g in grads if g in r}
        largest = max(blocks, key=blocks.get) if blocks else None
        lines.append(
            f"| {r['epoch']} | {cell(r, 'val_mean_lesion_dice', '.3f')} "
            f"| {cell(r, 'kl_ratio', '.2f')} | {cell(r, 'supervised', '.3f')} "
            f"| {cell(r, 'val_supervised', '.3f')} | {cell(r, 'supervised_ratio', '.2f')} "
            f"| {cell(r, 'grad_norm', '.3g')} "
            f"| {f'{largest} {blocks[largest]:.3g}' if largest else '–'} "
            f"| {cell(r, 'clipped', '.1%')} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--data", help="the labelled folder (default: the run's)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--checkpoints", nargs="+", choices=("best", "last"), default=["best"])
    parser.add_argument(
        "--parts", nargs="+", choices=("train", "val", "test"), default=["val", "test"]
    )
    args = parser.parse_args(argv)

    from stitchnet_tf.data.splits import Split
    from stitchnet_tf.evaluation import SliceScorer
    from stitchnet_tf.inference import load_model
    from stitchnet_tf.run import Run

    run = Run(args.run)
    dataset, intensity = run_dataset(run, args.data)
    split = Split.load(run.split_path)
    state = run.state()
    result = {
        "run": str(args.run),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "intensity": intensity,
        "best_epoch": state.get("best_epoch"),
        "epochs": state.get("epochs_done"),
        "scores": [],
    }
    withheld = set(split.unlabelled)
    scorers = {}
    for part in args.parts:
        ids = split.part(part)
        if part == "train":  # the slices it learnt from, not the withheld ones
            ids = [i for i in ids if i not in withheld]
        scorers[part] = SliceScorer(dataset.subset(ids), run.size(), intensity=intensity)
    for checkpoint in args.checkpoints:
        model = load_model(getattr(run, checkpoint)).model
        modes, rules = [("inference", model)], (None,)
        if hasattr(model, "forward"):  # StitchNet; other models have no z to hold at its mean
            modes.append(("training", TrainingMode(model)))
            rules = ("prior", "posterior")
        for part, scorer in scorers.items():
            for rule in rules:
                for mode, m in modes:
                    s = scorer.score(m, decision=rule)
                    row = {
                        "checkpoint": checkpoint,
                        "part": part,
                        "rule": rule or "argmax",
                        "mode": mode,
                        "slices": len(scorer),
                    }
                    row |= {f"dice_{k}": v for k, v in s["lesion_dice"].items()}
                    row["mean_lesion_dice"] = s["mean_lesion_dice"]
                    result["scores"].append(row)
                    print(json.dumps(row), flush=True)
    result["log"] = epoch_log(args.run / "log.csv")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "train_vs_inference.json").write_text(json.dumps(result, indent=1) + "\n")
    command = "python benchmarks/train_vs_inference.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = report(result, command)
    (args.output / "train_vs_inference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
