"""Per-block gradient norms of StitchNet at initialisation and after training (issue 10).

Targets: the largest per-block gradient norm at most 100× the head's, at initialisation and
after 1000 steps, and at most 5% of steps clipped at the default global-norm threshold.

Trains the default StitchNet (optionally at a smaller width) with `training.train` on the
synthetic demo data (or a given labelled folder), reads the per-epoch block norms and the
clipped share that the model logs (`grad_*`, `clipped` in log.csv), and measures the block
norms on one batch at initialisation and at the end. Writes gradients.md/.json.

    python benchmarks/gradients.py --output benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def block_norms(model, batch) -> dict:
    """Per-block gradient norms of the loss on one batch (no update)."""
    import tensorflow as tf

    x, allowed = batch["x"], batch["allowed"]
    with tf.GradientTape() as tape:
        outputs = model(x, training=True)
        loss = model.compute_terms(model.dequantise(x), allowed, outputs)["loss"]
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    groups: dict[str, list] = {}
    for v, g in zip(variables, grads, strict=True):
        if g is not None:
            groups.setdefault(model._variable_block(v.path), []).append(g)
    norms = {k: float(tf.linalg.global_norm(v)) for k, v in groups.items()}
    norms["global"] = float(tf.linalg.global_norm([g for g in grads if g is not None]))
    return norms


def summarise(norms: dict) -> dict:
    blocks = {k: v for k, v in norms.items() if k != "global"}
    worst = max(blocks, key=blocks.get)
    return {"largest_block": worst, "ratio_to_head": blocks[worst] / max(blocks["head"], 1e-30)}


def report(result: dict, command: str) -> list[str]:
    """gradients.md's lines from the result dict."""
    at_init, after = result["at_init"], result["after_training"]
    epochs, clipped, settings = result["epochs"], result["clipped_share"], result["settings"]
    blocks = [k for k in at_init if k not in ("global", "largest_block", "ratio_to_head")]
    return [
        "# StitchNet gradient norms per block",
        "",
        f"Command: `python benchmarks/gradients.py {command}`. Machine: "
        f"{result['machine']['platform']}, {result['machine']['cpus']} cores (shared). Default "
        f"model (options {settings.get('options') or 'none'}), {settings['size']} px, batch "
        f"{settings['batch_size']}, Adam {settings['learning_rate']} (cosine), global-norm clip "
        f"{settings['global_clipnorm']}; {settings['steps']} steps in "
        f"{result['train_seconds']:.0f} s.",
        "",
        "| block | at initialisation | after training |",
        "| --- | --- | --- |",
        *(f"| {b} | {at_init[b]:.3g} | {after.get(b, float('nan')):.3g} |" for b in blocks),
        f"| global | {at_init['global']:.3g} | {after['global']:.3g} |",
        "",
        f"Largest block / head: {at_init['ratio_to_head']:.1f}× at initialisation "
        f"({at_init['largest_block']}), {after['ratio_to_head']:.1f}× after training "
        f"({after['largest_block']}); target ≤ 100×.",
        f"Steps clipped at the default threshold: {100 * clipped:.1f}% (target ≤ 5%); per "
        "epoch: " + ", ".join(f"{100 * e['clipped']:.0f}%" for e in epochs) + ".",
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", default=None, help="labelled folder (default: synthetic)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=float, default=None, help="default: the model's")
    parser.add_argument("--backbone-alpha", type=float, default=None)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--report-only", action="store_true", help="rebuild the md from the json")
    args = parser.parse_args()
    if args.report_only:
        out = Path(args.output)
        result = json.loads((out / "gradients.json").read_text())
        (out / "gradients.md").write_text("\n".join(report(result, result["command"])))
        return 0

    import keras

    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.pipeline import training_batches
    from stitchnet_tf.data.splits import split_dataset
    from stitchnet_tf.data.synthetic import write_demo_dataset
    from stitchnet_tf.inference import load_model
    from stitchnet_tf.options import DEFAULT_GLOBAL_CLIPNORM
    from stitchnet_tf.training import TrainConfig, build_model, train

    work = Path(tempfile.mkdtemp(prefix="gradients-"))
    labelled = args.labelled
    if labelled is None:
        write_demo_dataset(work / "data", labelled_patients=10, unlabelled_patients=0, size=96)
        labelled = str(work / "data" / "labelled")
    options = {}
    if args.width is not None:
        options["width"] = args.width
    if args.backbone_alpha is not None:
        options["backbone_alpha"] = args.backbone_alpha

    dataset = discover(labelled, require_labels=True)
    split = split_dataset(dataset, seed=0)
    batch = next(
        iter(
            training_batches(
                dataset, None, args.size, args.batch_size, train_ids=split.train, seed=1
            )
        )
    )
    keras.utils.set_random_seed(0)
    model = build_model("stitchnet", options, seed=0)
    at_init = block_norms(model, batch)

    config = TrainConfig(
        labelled=labelled,
        output=str(work / "run"),
        size=args.size,
        epochs=max(1, args.steps // args.steps_per_epoch),
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=0,
        model_options=options,
    )
    start = time.time()
    train(config, verbose=0, log=lambda m: None)
    seconds = time.time() - start
    with open(work / "run" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = [
        {
            k: float(v)
            for k, v in r.items()
            if k == "epoch" or k.startswith("grad_") or k == "clipped"
        }
        for r in rows
    ]
    clipped = sum(e["clipped"] for e in epochs) / len(epochs)
    trained = load_model(work / "run" / "last.keras").model
    after = block_norms(trained, batch)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": vars(args) | {"global_clipnorm": DEFAULT_GLOBAL_CLIPNORM, "options": options},
        "command": " ".join(sys.argv[1:]),
        "train_seconds": seconds,
        "at_init": at_init | summarise(at_init),
        "after_training": after | summarise(after),
        "clipped_share": clipped,
        "epochs": epochs,
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradients.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = report(result, " ".join(sys.argv[1:]))
    (out / "gradients.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
