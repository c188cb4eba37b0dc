"""Speed and memory: train steps, segmentation-path inference (Keras, SavedModel, TFLite), the
input pipeline, peak training memory, and the StitchNet train step's GFLOP/s against this
machine's float32 matmul peak, all in one run.

Usage (from the repository root; about 30-40 minutes on a 2-core CPU with the defaults):
    python benchmarks/speed.py [--sizes 192 352] [--batch 8] [--reps 5] [--steps 2]
        [--model RUN_DIR --baseline RUN_DIR] [--data ../shared/data] [--parts ...]

- train: images/s of the train step of StitchNet, U-Net and SegNet (paper widths) at each size,
  batch 8, float32 and mixed_bfloat16. The three models are built and traced first, then timed
  in alternation (`--reps` rounds of `--steps` steps each); medians of the rounds.
- flops: FLOPs of one StitchNet train step (TensorFlow's profiler on the traced graph) divided by
  its median time, next to the float32 matmul GFLOP/s (2048×2048, median of 20) measured here.
- inference: segmentation-path images/s at batch 1 of StitchNet vs U-Net for Keras (the traced
  `segmentation_probabilities`), the exported SavedModel and TFLite float32 / float16 / dynamic
  / int8; with `--model`/`--baseline` (run folders trained on the shared data) also their
  parity on real slices: SavedModel max |Δp| and TFLite argmax agreement with Keras, file sizes.
- pipeline: slices/s of the training input pipeline (decode + preprocess + augment, MedSeg
  unlabelled JPEGs, automatic lung mask) at the largest size, against the slices/s StitchNet's
  train step consumes there.
- memory: peak resident memory (ru_maxrss) of a process training each model at the largest size,
  batch 8, float32, for a few steps.
Writes benchmarks/results/speed.json and speed.md with the machine described; a rerun with
`--parts` keeps the earlier results of the parts it does not rerun.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
MODELS = ("stitchnet", "unet", "segnet")
PARTS = ("train", "flops", "inference", "pipeline", "memory")


def batch_for(name: str, size: int, batch: int, seed: int = 0) -> dict:
    """A fixed training batch: x [B,S,S,1], allowed sets [B,S,S,4]; StitchNet gets half of it
    unlabelled (every class allowed), as B/2 labelled slices with `--unlabelled-per-batch B/2`."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch, size, size, 1), np.float32)
    labels = rng.integers(0, 4, (batch, size, size))
    allowed = np.eye(4, dtype=np.float32)[labels]
    if name == "stitchnet":
        allowed[batch // 2 :] = 1.0
    return {"x": x, "allowed": allowed}


PAPER = False  # --paper: the paper's widths and per-variable clipping instead of the defaults


def build(name: str, seed: int = 0):
    """A compiled model with the defaults users get (`train`'s), or with `--paper` the paper's
    widths and objective (StitchNet.authors(); clipnorm 1, clipvalue 0.5)."""
    import keras

    from stitchnet_tf.training import build_model

    if PAPER:
        if name == "stitchnet":
            from stitchnet_tf.models.stitchnet import StitchNet

            model = StitchNet.authors(seed=seed)
        else:
            model = build_model(name, {}, 1.0, 0.5, seed)
    else:
        model = build_model(name, {}, None, None, seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


def train_steps(sizes, batch, reps, steps, precisions) -> tuple[list, dict]:
    """Median seconds per train step for each model, size and precision (models alternated)."""
    import tensorflow as tf

    from stitchnet_tf.precision import set_precision

    rows, graphs = [], {}
    for size in sizes:
        for precision in precisions:
            policy = set_precision(precision == "mixed")
            try:
                models = {n: build(n) for n in MODELS}
                data = {n: batch_for(n, size, batch) for n in MODELS}
                fns = {n: tf.function(m.train_step) for n, m in models.items()}
                trace = {}
                for n in MODELS:
                    t = time.perf_counter()
                    fns[n](data[n])
                    trace[n] = time.perf_counter() - t
                    fns[n](data[n])
                if precision == "float32":
                    graphs[size] = fns["stitchnet"].get_concrete_function(data["stitchnet"])
                times = {n: [] for n in MODELS}
                for _ in range(reps):
                    for n in MODELS:
                        t = time.perf_counter()
                        for _ in range(steps):
                            out = fns[n](data[n])
                        float(out["loss"])
                        times[n].append((time.perf_counter() - t) / steps)
            finally:
                set_precision(False)
            for n in MODELS:
                median = statistics.median(times[n])
                rows.append(
                    {
                        "model": n,
                        "size": size,
                        "policy": policy,
                        "seconds_per_step": median,
                        "images_per_s": batch / median,
                        "trace_seconds": trace[n],
                        "all_seconds": times[n],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows, graphs


def matmul_gflops(n: int = 2048, reps: int = 20) -> float:
    """float32 matmul GFLOP/s of this machine (TensorFlow, all cores), median of `reps`."""
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    mm = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    for _ in range(3):
        mm().numpy()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mm().numpy()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def graph_flops(concrete) -> int:
    """Floating-point operations of a traced function's graph (TensorFlow's profiler)."""
    from tensorflow.python.profiler import model_analyzer, option_builder

    opts = option_builder.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    return int(model_analyzer.profile(concrete.graph, options=opts).total_float_ops)


def real_slices(data: Path, size: int, n: int) -> np.ndarray | None:
    """n preprocessed MedSeg labelled slices [n,S,S,1] (None without the shared data)."""
    folder = data / "medseg-covid" / "labelled"
    if not folder.is_dir():
        return None
    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.pipeline import SliceLoader

    dataset = discover(folder)
    loader = SliceLoader(dataset, dataset.samples[:n], size)
    return np.stack([loader(i)[0] for i in range(len(loader))]).reshape(-1, size, size, 1)


def per_image_seconds(fn, xs, reps: int) -> float:
    """Median seconds of fn(x) over the slices, batch 1, after one warm-up call."""
    fn(xs[:1])
    times = []
    for _ in range(reps):
        for i in range(len(xs)):
            t = time.perf_counter()
            fn(xs[i : i + 1])
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def inference(models: dict, size: int, xs: np.ndarray, reps: int, work: Path) -> list:
    """Batch-1 seconds/image and parity of Keras, SavedModel and TFLite for each model."""
    import tensorflow as tf

    from stitchnet_tf import export
    from stitchnet_tf.errors import DataError

    rows, failed = [], []
    for name, model in models.items():
        keras_fn = tf.function(
            lambda x, m=model: m.segmentation_probabilities(x, tf.cast(x > 0, tf.float32))
        )
        reference = np.asarray(keras_fn(xs))
        labels = reference.argmax(-1)
        version = export.export_savedmodel(model, work / name, size, lung_model=False)
        saved = export.load_exported(version)
        variants = {"keras": (lambda x, f=keras_fn: f(x).numpy(), None, None)}
        out = saved.segment(xs)
        variants["savedmodel"] = (
            lambda x, s=saved: s.segment(x),
            float(np.abs(out["probabilities"] - reference).max()),
            float((out["labels"] == labels).mean()),
        )
        sizes = {"savedmodel": sum(f.stat().st_size for f in version.rglob("*") if f.is_file())}
        for q in ("none", "float16", "dynamic", "int8"):
            try:
                path = export.export_tflite(
                    None,
                    work / f"{name}-{q}.tflite",
                    size,
                    quantize=q,
                    representative=lambda: iter(xs),
                    saved_model=version,
                )
            except DataError as e:  # reported, not fatal: the other variants still run
                failed.append({"model": name, "variant": f"tflite-{q}", "error": str(e)})
                print(json.dumps(failed[-1]), flush=True)
                continue
            lite = export.load_exported(path)
            out = lite.segment(xs)
            variants[f"tflite-{q}"] = (
                lambda x, m=lite: m.segment(x),
                float(np.abs(out["probabilities"] - reference).max()),
                float((out["labels"] == labels).mean()),
            )
            sizes[f"tflite-{q}"] = path.stat().st_size
        timed = {k: [] for k in variants}
        for _ in range(reps):  # alternate the variants
            for k, (fn, _, _) in variants.items():
                timed[k].append(per_image_seconds(fn, xs, 1))
        for k, (_, max_dp, agree) in variants.items():
            rows.append(
                {
                    "model": name,
                    "variant": k,
                    "seconds_per_image": statistics.median(timed[k]),
                    "images_per_s": 1 / statistics.median(timed[k]),
                    "max_abs_dp_vs_keras": max_dp,
                    "argmax_agreement_vs_keras": agree,
                    "bytes": sizes.get(k),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows + failed


def pipeline_rate(data: Path, size: int, n: int) -> float | None:
    """Slices/s of decode + preprocess + augment on the MedSeg unlabelled JPEGs."""
    folder = data / "medseg-covid" / "unlabelled"
    if not folder.is_dir():
        return None
    from pipeline_throughput import rate

    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.pipeline import SliceLoader, slice_dataset

    dataset = discover(folder, patient_pattern=r"Data-1_(.+)_\d+\.jpg")
    loader = SliceLoader(dataset, dataset.samples, size)
    return rate(slice_dataset(loader, shuffle=True, repeat=True, augmentation=True), n)


def peak_memory(name: str, size: int, batch: int) -> float:
    """Peak resident memory (MiB) of a fresh process training `name` for 3 steps."""
    code = (
        "import resource, sys, tensorflow as tf; sys.path.insert(0, sys.argv[1]);"
        "from speed import build, batch_for;"
        f"m = build({name!r}); f = tf.function(m.train_step); b = batch_for({name!r}, {size}, "
        f"{batch});\nfor _ in range(3): float(f(b)['loss'])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "benchmarks")],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def report(out: dict) -> str:
    """speed.md from the results."""
    m = out["machine"]
    lines = [
        "# Speed and memory",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, TensorFlow {m['tensorflow']}; shared with "
        "other jobs while it ran (ratios are from one run with the contenders alternated; "
        f"absolute numbers are noisy). Command: `{out['command']}`.",
        "",
    ]
    train = out.get("train", [])
    if train:
        lines += [
            f"## Train step, batch {out['batch']} (images/s, median of {out['reps']} rounds "
            f"of {out['steps']} steps)",
            "",
            "| size | policy | StitchNet | U-Net | SegNet | StitchNet / U-Net time |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        keys = sorted({(r["size"], r["policy"]) for r in train})
        for size, policy in keys:
            by = {r["model"]: r for r in train if (r["size"], r["policy"]) == (size, policy)}
            ratio = by["stitchnet"]["seconds_per_step"] / by["unet"]["seconds_per_step"]
            lines.append(
                f"| {size} | {policy} | {by['stitchnet']['images_per_s']:.2f} | "
                f"{by['unet']['images_per_s']:.2f} | {by['segnet']['images_per_s']:.2f} | "
                f"{ratio:.2f}× (target ≤ 2×) |"
            )
        lines.append("")
    if "flops" in out:
        f = out["flops"]
        lines += [
            "## Achieved GFLOP/s",
            "",
            f"StitchNet train step at {f['size']}, batch {out['batch']}, float32: "
            f"{f['train_step_gflop']:.1f} GFLOP per step ({f['counted']}), "
            f"{f['achieved_gflops']:.1f} GFLOP/s achieved vs {f['matmul_gflops']:.1f} GFLOP/s "
            f"float32 matmul peak measured in the same run: **{100 * f['fraction']:.0f}%** "
            "(target ≥ 50%).",
            "",
        ]
    if out.get("inference"):
        lines += [
            f"## Segmentation-path inference at {out['inference_size']} px, batch 1",
            "",
            f"Models: {out['inference_models']}. Parity on {out['inference_slices']} "
            "slices against the Keras model.",
            "",
            "| model | variant | ms / slice | slices/s | max abs Δp | argmax agreement | MB |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in out["inference"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} | | | | |")
                continue
            dp = "" if r["max_abs_dp_vs_keras"] is None else f"{r['max_abs_dp_vs_keras']:.1e}"
            ag = (
                ""
                if r["argmax_agreement_vs_keras"] is None
                else f"{100 * r['argmax_agreement_vs_keras']:.2f}%"
            )
            mb = "" if r["bytes"] is None else f"{r['bytes'] / 1e6:.1f}"
            lines.append(
                f"| {r['model']} | {r['variant']} | {1000 * r['seconds_per_image']:.1f} | "
                f"{r['images_per_s']:.1f} | {dp} | {ag} | {mb} |"
            )
        by = {
            (r["model"], r["variant"]): r["seconds_per_image"]
            for r in out["inference"]
            if "error" not in r
        }
        if ("stitchnet", "keras") in by and ("unet", "keras") in by:
            ratio = by[("stitchnet", "keras")] / by[("unet", "keras")]
            lines += [
                "",
                f"StitchNet / U-Net inference time (Keras): {ratio:.2f}× (target ≤ 1.5×).",
            ]
        for model in ("stitchnet", "unet"):
            if (model, "tflite-float16") in by:
                r = by[(model, "keras")] / by[(model, "tflite-float16")]
                lines.append(
                    f"{model}: TFLite float16 is {r:.2f}× the speed of Keras (target ≥ 1×)."
                )
        lines.append("")
    if out.get("pipeline_slices_per_s"):
        need = out["pipeline_consumed_per_s"]
        have = out["pipeline_slices_per_s"]
        lines += [
            "## Input pipeline",
            "",
            f"Decode + preprocess + augment at {out['pipeline_size']} px: {have:.0f} slices/s; "
            f"StitchNet's float32 train step consumes {need:.1f} slices/s there: "
            f"**{have / need:.0f}×** (target ≥ 5×).",
            "",
        ]
    if out.get("memory_mib"):
        lines += [
            f"## Peak resident memory, training at {out['memory_size']} px, batch "
            f"{out['batch']}, float32",
            "",
            "| model | peak RSS (MiB) |",
            "| --- | --- |",
        ]
        lines += [f"| {k} | {v:.0f} |" for k, v in out["memory_mib"].items()]
        lines.append("")
    return "\n".join(lines)


def save(out: dict, folder: Path) -> None:
    """Write speed.json and speed.md (after each part, so a late failure loses nothing)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "speed.json").write_text(json.dumps(out, indent=1) + "\n")
    (folder / "speed.md").write_text(report(out) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 352])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="train steps per timed round")
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed"])
    parser.add_argument("--model", type=Path, help="trained StitchNet run for inference")
    parser.add_argument("--baseline", type=Path, help="trained U-Net run for inference")
    parser.add_argument("--slices", type=int, default=10, help="slices for inference timing")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--paper", action="store_true", help="the paper's widths instead of the defaults"
    )
    args = parser.parse_args()
    global PAPER
    PAPER = args.paper

    import tensorflow as tf
    from pipeline_throughput import machine

    out = {
        "machine": machine(),
        "batch": args.batch,
        "reps": args.reps,
        "steps": args.steps,
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
    }
    previous = args.output / "speed.json"
    if previous.is_file():  # keep the results of parts not rerun now
        earlier = json.loads(previous.read_text())
        kept = {
            "train": ("train",),
            "flops": ("flops",),
            "inference": ("inference", "inference_size", "inference_slices", "inference_models"),
            "pipeline": ("pipeline_size", "pipeline_slices_per_s", "pipeline_consumed_per_s"),
            "memory": ("memory_size", "memory_mib"),
        }
        for part, keys in kept.items():
            if part not in args.parts:
                out |= {k: earlier[k] for k in keys if k in earlier}
        if "train" not in args.parts:
            out |= {k: earlier[k] for k in ("batch", "reps", "steps") if k in earlier}
            out["command"] = earlier.get("command", "") + "; then " + out["command"]
    largest = max(args.sizes)
    graphs = {}
    if "train" in args.parts or "flops" in args.parts:
        out["train"], graphs = train_steps(
            args.sizes, args.batch, args.reps, args.steps, args.precisions
        )
        save(out, args.output)
    if "flops" in args.parts and largest in graphs:
        flops = graph_flops(graphs[largest])
        fresh = build("stitchnet")
        spec = tf.TensorSpec([args.batch, largest, largest, 1], tf.float32)
        forward = graph_flops(
            tf.function(lambda x: fresh(x, training=True)).get_concrete_function(spec)
        )
        counted = "profiler count of the whole step"
        if flops < 2.5 * forward:  # gradient ops without registered FLOP statistics
            flops, counted = 3 * forward, "3 × the profiled forward pass"
        step = next(
            r["seconds_per_step"]
            for r in out["train"]
            if (r["model"], r["size"], r["policy"]) == ("stitchnet", largest, "float32")
        )
        peak = matmul_gflops()
        out["flops"] = {
            "size": largest,
            "train_step_gflop": flops / 1e9,
            "forward_gflop": forward / 1e9,
            "counted": counted,
            "achieved_gflops": flops / 1e9 / step,
            "matmul_gflops": peak,
            "fraction": flops / 1e9 / step / peak,
        }
        print(json.dumps(out["flops"]), flush=True)
        save(out, args.output)
    if "inference" in args.parts:
        from stitchnet_tf.inference import load_model

        if args.model and args.baseline:
            loaded = {"stitchnet": load_model(args.model), "unet": load_model(args.baseline)}
            size = loaded["stitchnet"].size
            models = {k: v.model for k, v in loaded.items()}
            out["inference_models"] = f"trained runs {args.model.name}, {args.baseline.name}"
        else:
            size, models = largest, {n: build(n) for n in ("stitchnet", "unet")}
            out["inference_models"] = "untrained, paper widths"
        xs = real_slices(args.data, size, args.slices)
        if xs is None:
            xs = np.random.default_rng(0).random((args.slices, size, size, 1), np.float32)
        with tempfile.TemporaryDirectory() as work:
            out["inference"] = inference(models, size, xs.astype(np.float32), args.reps, Path(work))
        out["inference_size"], out["inference_slices"] = size, len(xs)
        save(out, args.output)
    if "pipeline" in args.parts:
        rate = pipeline_rate(args.data, largest, 200)
        if rate is not None:
            consumed = next(
                r["images_per_s"]
                for r in out["train"]
                if (r["model"], r["size"], r["policy"]) == ("stitchnet", largest, "float32")
            )
            out.update(
                pipeline_size=largest, pipeline_slices_per_s=rate, pipeline_consumed_per_s=consumed
            )
    save(out, args.output)
    if "memory" in args.parts:
        out["memory_size"] = largest
        out["memory_mib"] = {n: peak_memory(n, largest, args.batch) for n in MODELS}
    out["benchmark_process_peak_rss_mib"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    save(out, args.output)
    print(f"wrote {args.output / 'speed.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
