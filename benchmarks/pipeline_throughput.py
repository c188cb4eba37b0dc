"""Input-pipeline throughput: slices/s for decode + preprocess + augment on the shared data.

Usage (from the repository root):
    python benchmarks/pipeline_throughput.py [--data ../shared/data] [--sizes 192 352] [--n 400]

Measures, per dataset and model size, the tf.data pipeline that training uses (lazy parallel
read, lung-field preprocessing, the paper's augmentation) and its parts: decoding only, and
decode + preprocess without augmentation. Writes benchmarks/results/pipeline_throughput.json
and .md with the machine described.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """A short description of this machine (lungmask_dice's, plus TensorFlow's version)."""
    import tensorflow as tf
    from lungmask_dice import machine as describe

    return describe() | {"tensorflow": tf.__version__}


def rate(ds, n: int, warmup: int = 16) -> float:
    """Slices per second over `n` elements of `ds` after `warmup` elements."""
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 352])
    parser.add_argument("--n", type=int, default=400, help="slices timed per measurement")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"error: {args.data}: shared data folder not found", file=sys.stderr)
        return 2

    import tensorflow as tf

    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.io import read_image
    from stitchnet_tf.data.pipeline import SliceLoader, slice_dataset

    datasets = {
        "medseg-unlabelled (JPEG, automatic lung mask)": discover(
            args.data / "medseg-covid" / "unlabelled", patient_pattern=r"Data-1_(.+)_\d+\.jpg"
        ),
        "zenodo20 (PNG, supplied lung mask)": discover(
            args.data / "zenodo20-lungs", masks_subdir="infection", mask_values="binary"
        ),
    }
    results = []
    for name, dataset in datasets.items():
        samples = dataset.samples
        decode = (
            tf.data.Dataset.range(len(samples))
            .shuffle(len(samples), seed=0)
            .repeat()
            .map(
                lambda i, s=samples: tf.numpy_function(
                    lambda j: read_image(s[int(j)].image, s[int(j)].slice), [i], tf.float32
                ),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        )
        row = {"dataset": name, "decode_only": rate(decode, args.n)}
        for size in args.sizes:
            loader = SliceLoader(dataset, samples, size)
            plain = slice_dataset(loader, shuffle=True, repeat=True)
            full = slice_dataset(loader, shuffle=True, repeat=True, augmentation=True)
            row[f"preprocess_{size}"] = rate(plain, args.n)
            row[f"preprocess_augment_{size}"] = rate(full, args.n)
        print(json.dumps(row))
        results.append(row)

    out = {
        "machine": machine(),
        "n": args.n,
        "sizes": args.sizes,
        "results": results,
        "command": "python benchmarks/pipeline_throughput.py " + " ".join(sys.argv[1:]),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "pipeline_throughput.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        "# Input pipeline throughput (slices/s)",
        "",
        f"Machine: {out['machine']['cpu']}, {out['machine']['cores']} cores, "
        f"TensorFlow {out['machine']['tensorflow']}. Command: `{out['command'].strip()}`. "
        f"{args.n} slices timed after 16 of warm-up; tf.data AUTOTUNE parallelism.",
        "",
        "| dataset | decode only | "
        + " | ".join(f"decode+preprocess {s} | +augment {s}" for s in args.sizes)
        + " |",
        "| --- | --- | " + " | ".join("--- | ---" for _ in args.sizes) + " |",
    ]
    for r in results:
        cells = [f"{r['decode_only']:.0f}"] + [
            f"{r[f'preprocess_{s}']:.0f} | {r[f'preprocess_augment_{s}']:.0f}" for s in args.sizes
        ]
        lines.append(f"| {r['dataset']} | " + " | ".join(cells) + " |")
    (args.output / "pipeline_throughput.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output / 'pipeline_throughput.md'}")
    return (
        0
        if np.isfinite([v for r in results for v in r.values() if isinstance(v, float)]).all()
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
