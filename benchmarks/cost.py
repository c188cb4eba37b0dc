"""StitchNet's cost against the U-Net's, both with the defaults `train` uses (issue 10 item 7).

Targets: the train step at most 2× the U-Net's (192 px, batch 8) and the segmentation-path
inference (`segmentation_probabilities`, batch 1) at most 1.5×. The two models are timed in
alternation within one run (median of `--reps` rounds), so load from other jobs hits both.

    python benchmarks/cost.py --output benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
MODELS = ("stitchnet", "unet")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="train steps per timed round")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    from stitchnet_tf.training import build_model

    rng = np.random.default_rng(0)
    x = rng.random((args.batch, args.size, args.size, 1), np.float32)
    allowed = np.eye(4, dtype=np.float32)[rng.integers(0, 4, (args.batch, args.size, args.size))]
    batch = {"x": tf.constant(x), "allowed": tf.constant(allowed)}
    one = tf.constant(x[:1])
    lung = tf.ones_like(one)
    models, steps, infers, trace = {}, {}, {}, {}
    for name in MODELS:
        keras.utils.set_random_seed(0)
        model = build_model(name, {}, None, None, 0)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        models[name] = model
        steps[name] = tf.function(model.train_step)
        infers[name] = tf.function(lambda a, b, m=model: m.segmentation_probabilities(a, b))
        t = time.perf_counter()
        steps[name](batch)
        infers[name](one, lung)
        trace[name] = time.perf_counter() - t
    train_times = {n: [] for n in MODELS}
    infer_times = {n: [] for n in MODELS}
    for _ in range(args.reps):
        for n in MODELS:
            t = time.perf_counter()
            for _ in range(args.steps):
                out = steps[n](batch)
            float(out["loss"])
            train_times[n].append((time.perf_counter() - t) / args.steps)
            t = time.perf_counter()
            for _ in range(10):
                p = infers[n](one, lung)
            p.numpy()
            infer_times[n].append((time.perf_counter() - t) / 10)
    train = {n: statistics.median(v) for n, v in train_times.items()}
    infer = {n: statistics.median(v) for n, v in infer_times.items()}
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": vars(args) | {"output": str(args.output)},
        "params": {n: int(m.count_params()) for n, m in models.items()},
        "train_seconds_per_step": train,
        "inference_seconds_per_slice": infer,
        "train_ratio": train["stitchnet"] / train["unet"],
        "inference_ratio": infer["stitchnet"] / infer["unet"],
        "trace_seconds": trace,
        "all": {"train": train_times, "inference": infer_times},
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "cost.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# StitchNet's cost against the U-Net (defaults of `train`)",
        "",
        f"Command: `python benchmarks/cost.py {' '.join(sys.argv[1:])}`; {platform.platform()}, "
        f"{os.cpu_count()} cores, shared with other jobs; the models alternate within one run "
        f"(median of {args.reps} rounds).",
        "",
        "| | StitchNet | U-Net | ratio | target |",
        "| --- | --- | --- | --- | --- |",
        f"| train step, {args.size} px, batch {args.batch} (s) | {train['stitchnet']:.3f} | "
        f"{train['unet']:.3f} | {result['train_ratio']:.2f}× | ≤ 2× |",
        f"| segmentation path, {args.size} px, batch 1 (ms) | {1e3 * infer['stitchnet']:.1f} | "
        f"{1e3 * infer['unet']:.1f} | {result['inference_ratio']:.2f}× | ≤ 1.5× |",
        f"| parameters (M) | {result['params']['stitchnet'] / 1e6:.2f} | "
        f"{result['params']['unet'] / 1e6:.2f} | | |",
        "",
    ]
    (args.output / "cost.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
