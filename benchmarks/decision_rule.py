"""Which decision rule segments better on real data: π(z) alone or r_k ∝ π_k Beta_k(x)?

Usage (from the repository root; about 30-40 minutes on a 2-core CPU with the defaults):
    python benchmarks/decision_rule.py [--data ../shared/data/medseg-covid] [--size 128]
        [--steps 1000] [--norm batch|group] [--batch 8] [--unlabelled-per-batch 4] [--seed 0]

Trains one StitchNet on the MedSeg labelled slices (a fixed 40/10 split by slice: the slices have
no patient ids) plus the 1600 unlabelled slices, then scores both rules on the 10 validation
slices (BatchNorm in inference mode, z at the posterior mean, background fixed by the lung
field): Dice of GGO, consolidation and any lesion, pooled over the slices and as a mean over
slices, after re-estimating BatchNorm statistics with z at the posterior mean. Writes
benchmarks/results/decision_rule_<norm>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def dice_table(labels: np.ndarray, truth_sets: np.ndarray) -> dict:
    """Dice per class over the exactly labelled pixels: labels [N,H,W], truth_sets [N,H,W,4]."""
    exact = truth_sets.sum(-1) == 1
    truth = np.where(exact, truth_sets.argmax(-1), -1)
    out = {}
    for name, classes in (("ggo", [2]), ("con", [3]), ("lesion", [2, 3])):
        t = np.isin(truth, classes)
        p = np.isin(labels, classes) & exact
        inter, total = (t & p).sum((1, 2)), t.sum((1, 2)) + p.sum((1, 2))
        per_image = [2 * i / s for i, s in zip(inter, total, strict=True) if t.sum() and s > 0]
        out[name] = {
            "pooled": float(2 * inter.sum() / max(total.sum(), 1)),
            "mean_over_slices": float(np.mean(per_image)) if per_image else None,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "medseg-covid"
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--norm", default="batch", choices=["batch", "group"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--unlabelled-per-batch", type=int, default=4)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"error: {args.data}: data folder not found", file=sys.stderr)
        return 2

    import keras
    import tensorflow as tf
    from pipeline_throughput import machine

    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.pipeline import SliceLoader, training_batches
    from stitchnet_tf.data.splits import split_dataset
    from stitchnet_tf.models.base import recalibrate_batchnorm
    from stitchnet_tf.models.stitchnet import StitchNet

    keras.utils.set_random_seed(args.seed)
    lab = discover(args.data / "labelled")
    unl = discover(args.data / "unlabelled", patient_pattern=r"Data-1_(.+)_\d+\.jpg")
    split = split_dataset(lab, (0.8, 0.2, 0.0), seed=args.seed)
    batches = training_batches(
        lab,
        unl,
        args.size,
        args.batch,
        train_ids=split.train,
        unlabelled_per_batch=args.unlabelled_per_batch,
        seed=args.seed,
        cache=True,
    )
    val = lab.subset(split.val)
    loader = SliceLoader(val, val.samples, args.size)
    examples = [loader(i) for i in range(len(val))]
    x = np.stack([e[0] for e in examples])
    truth = np.stack([e[1] for e in examples])
    lung = np.stack([e[2] for e in examples])

    model = StitchNet(
        width=args.width,
        backbone_alpha=args.alpha,
        seed=args.seed,
        supervised_weight=100.0,
        focal_gamma=2.0,
        norm=args.norm,
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-4))
    start = time.time()
    history = model.fit(batches, epochs=10, steps_per_epoch=max(1, args.steps // 10), verbose=2)
    train_seconds = time.time() - start

    results = {}
    recalibrate_batchnorm(model, batches, 30)
    for rule in ("prior", "posterior"):
        labels = model.segment(tf.constant(x), lung=tf.constant(lung), decision=rule)["labels"]
        results[rule] = dice_table(np.asarray(labels), truth)
    out = {
        "machine": machine(),
        "command": "python benchmarks/decision_rule.py " + " ".join(sys.argv[1:]),
        "args": {k: str(v) for k, v in vars(args).items()},
        "train_seconds": train_seconds,
        "val_slices": split.val,
        "final_train_metrics": {k: float(v[-1]) for k, v in history.history.items()},
        "dice": results,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"decision_rule_{args.norm}"
    (args.output / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    rows = [
        "| rule | GGO pooled | GGO mean | CON pooled | CON mean | lesion pooled | lesion mean |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for rule, d in results.items():
        rows.append(
            f"| {rule} | "
            + " | ".join(
                f"{fmt(d[c]['pooled'])} | {fmt(d[c]['mean_over_slices'])}"
                for c in ("ggo", "con", "lesion")
            )
            + " |"
        )
    (args.output / f"{stem}.md").write_text(
        "# Decision rule: prior π(z) vs posterior r ∝ π·Beta(x)\n\n"
        f"StitchNet width {args.width} ({args.norm} norm), MobileNetV2 alpha {args.alpha}, "
        f"{args.size}×{args.size}, "
        f"{args.steps} steps of batch {args.batch} (+ {args.unlabelled_per_batch} unlabelled), "
        f"trained in {train_seconds / 60:.1f} min on {out['machine']['cpu']} "
        f"({out['machine']['cores']} cores). MedSeg: 40 labelled training slices + 1600 "
        "unlabelled, scored on 10 held-out labelled slices (split by slice, seed "
        f"{args.seed}).\n\nCommand: `{out['command'].strip()}`\n\n" + "\n".join(rows) + "\n"
    )
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
