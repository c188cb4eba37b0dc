"""Does a seeded run repeat bit for bit at benchmark size? (issue 12: a paired gain is only
readable if a run is a function of its seed.)

Builds each model twice from the same seed, trains each copy `--steps` steps on the same fixed
batch ([batch, size, size, 1], random intensities and labels, fixed by `--seed`) with the
project's optimizer (FusedAdamW 1e-3, decay 0.01, the models' default global-norm clipping),
and compares every weight (trainable, normalisation statistics) of the two copies. Also, on
one StitchNet from a fixed state, runs `train_step` `--repeats` times and counts the distinct
results: the step alone, without the build. Writes repeatability.md/.json.

Small sizes repeat even where large ones do not (the 32 px tests did before the global-norm
fix, 128 px did not), so run it at the benchmark size:

    python benchmarks/repeatability.py --output benchmarks/results/repeats
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("stitchnet", "unet")


def batch(size: int, batch_size: int, seed: int) -> dict:
    """A fixed batch: x [B, size, size, 1] in (0.05, 1), `allowed` one-hot [B, size, size, 4]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.uniform(0.05, 1.0, (batch_size, size, size, 1)).astype("float32")
    labels = rng.integers(0, 4, (batch_size, size, size))
    return {"x": x, "allowed": np.eye(4, dtype="float32")[labels]}


def build(name: str, seed: int):
    """The benchmark's model (`accuracy.py`'s `stitchnet-image` or `unet`, with the cpu preset's
    widths), compiled with the project's optimizer."""
    from accuracy import PROJECT

    from stitchnet_tf import training
    from stitchnet_tf.models.optimizers import FusedAdamW

    model_name, options, _ = PROJECT["stitchnet-image" if name == "stitchnet" else name]
    options = training.preset_options("cpu", model_name)[1] | options
    model = training.build_model(model_name, options, seed=seed)
    model.compile(optimizer=FusedAdamW(1e-3, weight_decay=0.01))
    return model


def differences(a: list, b: list) -> dict:
    """How many of the paired weight arrays differ, and by how much at most."""
    import numpy as np

    diffs = [float(np.max(np.abs(u.astype("float64") - v))) for u, v in zip(a, b, strict=True)]
    return {"weights": len(diffs), "differ": sum(d > 0 for d in diffs), "max_abs": max(diffs)}


def two_runs(name: str, data: dict, steps: int, seed: int) -> dict:
    """Train two copies built from `seed` for `steps` steps on `data`; compare their weights."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensors(data).repeat(steps)
    weights = []
    for _ in range(2):
        model = build(name, seed)
        model.fit(ds, epochs=1, verbose=0)
        weights.append([w.numpy() for w in model.weights])
    return differences(*weights)


def run_pipeline_runs(folder: Path, steps: int) -> dict:
    """Two models built as the run at `folder` was (its config.json: model, options, seed,
    optimizer), each fitted `steps` steps on that run's own training pipeline (real slices,
    augmentation); the first step after which their weights differ (None: none)."""
    import hashlib

    import keras

    from stitchnet_tf import training
    from stitchnet_tf.data.splits import Split
    from stitchnet_tf.run import Run

    run = Run(folder)
    config = run.config()
    labelled = config.labelled_spec().discover(require_labels=True)
    split = Split.load(run.split_path)

    class Digests(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.digests = []

        def on_train_batch_end(self, batch, logs=None):
            weights = b"".join(v.numpy().tobytes() for v in self.model.trainable_variables)
            self.digests.append(hashlib.md5(weights).hexdigest())

    digests = []
    for _ in range(2):
        batches, _, _ = training.pipelines(config, labelled, None, split, 0, 1)
        model = training.new_model(config)
        keep = Digests()
        model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[keep])
        digests.append(keep.digests)
    first = next((i + 1 for i, (a, b) in enumerate(zip(*digests, strict=True)) if a != b), None)
    return {
        "run": str(folder),
        "config": run.config_dict(),
        "model": config.model,
        "steps": steps,
        "first_differing": first,
    }


def repeated_step(data: dict, repeats: int, seed: int) -> dict:
    """One StitchNet `train_step` run `repeats` times from the same state (weights, optimizer
    moments, random-generator states): the number of distinct weight sets it leaves."""
    import tensorflow as tf

    model = build("stitchnet", seed)
    model(data["x"][:1])
    model.optimizer.build(model.trainable_variables)
    state = [*model.variables, *model.optimizer.variables]
    state += [model.noise_seed.state, model.ladder.seed_generator.state]
    start = [v.numpy() for v in state]
    step = tf.function(model.train_step)
    results = set()
    for _ in range(repeats):
        for v, s in zip(state, start, strict=True):
            v.assign(s)
        step(data)
        results.add(b"".join(v.numpy().tobytes() for v in model.trainable_variables))
    return {"repeats": repeats, "distinct": len(results)}


def report(result: dict) -> str:
    a = result["args"]
    lines = [
        "# Repeatability of seeded training",
        "",
        f"Two copies of each model built from seed {a['seed']}, each trained {a['steps']} steps "
        f"on the same fixed {a['batch']} x {a['size']} x {a['size']} batch (FusedAdamW 1e-3, "
        "default global-norm clipping); every weight compared. Grappler's arithmetic "
        "optimisation and (on a CPU) memory optimizer "
        f"{'on (TensorFlow default)' if a['tf_default'] else 'off (as in train)'}. "
        "`benchmarks/repeatability.py`.",
        "",
        "| model | weights | differ | max abs difference |",
        "|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {r['weights']} | {r['differ']} | {r['max_abs']:.3g} |")
    s = result.get("step")
    if s:
        lines += [
            "",
            f"One StitchNet `train_step` from a fixed state, {s['repeats']} times: "
            f"{s['distinct']} distinct result(s).",
        ]
    r = result.get("pipeline")
    if r:
        first = r["first_differing"]
        lines += [
            "",
            f"Two {r['model']} models built as the run `{r['run']}` was, each fitted "
            f"{r['steps']} steps on its real-data pipeline: "
            + (
                "weights identical after every step."
                if first is None
                else f"weights first differ after step {first}."
            ),
        ]
    lines += [
        "",
        f"Code {result['commit']}, {result['date']}, {result['seconds']:.0f} s; "
        f"machine: {json.dumps(result['machine'])}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="train_step repeats (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument(
        "--run",
        type=Path,
        help="also repeat this run's first --run-steps steps on its own real-data pipeline",
    )
    p.add_argument("--run-steps", type=int, default=100)
    p.add_argument(
        "--tf-default",
        action="store_true",
        help="leave Grappler's arithmetic optimisation and memory optimizer on (TensorFlow's "
        "default; train turns them off: models.base.repeatable_graphs)",
    )
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--name", default="repeatability", help="result file name (no suffix)")
    args = p.parse_args(argv)
    if not args.tf_default:
        from stitchnet_tf.models.base import repeatable_graphs

        repeatable_graphs()

    import subprocess

    from pipeline_throughput import machine

    data = batch(args.size, args.batch, args.seed)
    start = time.time()
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": {name: two_runs(name, data, args.steps, args.seed) for name in args.models},
    }
    if args.repeats:
        result["step"] = repeated_step(data, args.repeats, args.seed)
    if args.run:
        result["pipeline"] = run_pipeline_runs(args.run, args.run_steps)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    result |= {
        "seconds": round(time.time() - start, 1),
        "commit": commit.stdout.strip() or "unknown",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = report(result)
    (args.output / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
