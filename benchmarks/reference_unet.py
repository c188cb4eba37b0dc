"""A plain reference U-Net: an independent yardstick for the project's lesion models.

Usage (from the repository root; about 20-30 minutes on a 2-core CPU with the defaults):
    python benchmarks/reference_unet.py [--seed 0] [--steps 2000] [--size 128] [--width 16]
        [--split benchmarks/splits/medseg_seed0.json] [--output benchmarks/results]

Recipe: a textbook U-Net (four levels of two conv3x3-BN-ReLU + max-pool, a bottleneck, decoder
of upsampling + skip concatenation + two conv3x3-BN-ReLU; `--width` filters at the top level,
doubling per level) with a 3-class softmax (no lesion, GGO, consolidation), trained on the whole
slice (no lung crop) resized to `--size`, values in [0, 1]; loss = cross-entropy + soft Dice
over the two lesion classes; Adam 1e-3 with cosine decay to zero; random flips and random
crop-scale (0.8-1.0 of each side, resized back); `--steps` steps of `--batch` slices drawn from
the split's train part.

Evaluation, as a user gets it: predict on each slice at `--size`, resize the softmax
probabilities linearly to the slice's original size, take the argmax, then mark every pixel
outside the lung field (from the image alone, `lung_unet.default_segmenter`) as background, and
score with `metrics.Table1` (per-image F1 = Dice, mean ± population std; pooled Dice from the
summed TP/FP/FN) on the split's test and val parts.

Writes `<output>/reference_unet_s<seed>.json` (`reference_unet_w<width>_s<seed>.json` for a
non-default width), then rebuilds `<output>/reference_unet.json` and `reference_unet.md` from
every such file found there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "medseg-covid" / "labelled"
SPLIT = ROOT / "benchmarks" / "splits" / "medseg_seed0.json"
DEFAULT_WIDTH = 16
DEFAULT_STEPS = 2000
COMMAND = "python benchmarks/reference_unet.py --seed {seed} --steps {steps} --size {size}"


# ---------------------------------------------------------------- model and training (plain)
def build_unet(size: int, width: int = 16, levels: int = 4):
    import keras
    from keras import layers

    def block(x, f):
        for _ in range(2):
            x = layers.Conv2D(f, 3, padding="same", use_bias=False)(x)
            x = layers.ReLU()(layers.BatchNormalization()(x))
        return x

    inputs = keras.Input((size, size, 1))
    x, skips = inputs, []
    for i in range(levels):
        x = block(x, width * 2**i)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    x = block(x, width * 2**levels)  # bottleneck
    for i in reversed(range(levels)):
        x = layers.Concatenate()([layers.UpSampling2D(interpolation="bilinear")(x), skips[i]])
        x = block(x, width * 2**i)
    outputs = layers.Conv2D(3, 1, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="reference_unet")


def ce_dice_loss(y_true, y_pred):
    """Cross-entropy + (1 - soft Dice) averaged over the lesion classes (1 GGO, 2 CON); the
    Dice sums over the whole batch. y_true [B, S, S, 3] one-hot, y_pred softmax."""
    from keras import ops

    ce = ops.mean(ops.sum(-y_true * ops.log(ops.clip(y_pred, 1e-7, 1.0)), axis=-1))
    t, p = y_true[..., 1:], y_pred[..., 1:]
    dice = (2 * ops.sum(t * p, axis=(0, 1, 2)) + 1) / (ops.sum(t + p, axis=(0, 1, 2)) + 1)
    return ce + 1 - ops.mean(dice)


def resize(arr: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """[H, W] -> [size, size]: nearest for labels, area when shrinking, linear when enlarging."""
    shrink = arr.shape[0] > size or arr.shape[1] > size
    flag = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(arr, (size, size), interpolation=flag)


def batches(images, labels, size: int, batch: int, rng: np.random.Generator):
    """Endless (x [B, S, S, 1], one-hot y [B, S, S, 3]) with flips and crop-scale 0.8-1.0."""
    while True:
        xs, ys = [], []
        for i in rng.integers(len(images), size=batch):
            image, label = images[i], labels[i]
            H, W = image.shape
            s = rng.uniform(0.8, 1.0)
            h, w = max(1, round(s * H)), max(1, round(s * W))
            y0, x0 = rng.integers(H - h + 1), rng.integers(W - w + 1)
            x, y = image[y0 : y0 + h, x0 : x0 + w], label[y0 : y0 + h, x0 : x0 + w]
            x, y = resize(x, size), resize(y, size, nearest=True)
            if rng.random() < 0.5:
                x, y = x[:, ::-1], y[:, ::-1]
            if rng.random() < 0.5:
                x, y = x[::-1], y[::-1]
            xs.append(x)
            ys.append(y)
        yield np.stack(xs)[..., None], np.eye(3, dtype=np.float32)[np.stack(ys)]


def train(images, labels, size: int, steps: int, batch: int, width: int, seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    model = build_unet(size, width)
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=steps, alpha=0.0)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=ce_dice_loss)
    data = batches(images, labels, size, batch, np.random.default_rng(seed))
    start = time.perf_counter()
    history = model.fit(data, steps_per_epoch=steps, epochs=1, shuffle=False, verbose=2)
    return model, time.perf_counter() - start, float(history.history["loss"][-1])


# ---------------------------------------------------------------- data and evaluation
def lesion_index(allowed: np.ndarray) -> np.ndarray:
    """Allowed-set bits of a MedSeg mask -> 0 no lesion, 1 GGO, 2 consolidation."""
    from stitchnet_tf.data.classes import CON, GGO, NO_LESION, bits

    known = {NO_LESION: 0, bits(GGO): 1, bits(CON): 2}
    if not set(np.unique(allowed).tolist()) <= set(known):
        raise ValueError(f"unexpected mask sets {np.unique(allowed)}: not a MedSeg mask")
    out = np.zeros(allowed.shape, np.uint8)
    for b, k in known.items():
        out[allowed == b] = k
    return out


def to_four_class(probabilities: np.ndarray, shape: tuple[int, int], lung: np.ndarray):
    """Model-size softmax [S, S, 3] -> 4-class labels [H, W] on the original slice: linear
    resize of the probabilities, argmax, then background outside the lung field."""
    from stitchnet_tf.data.classes import BACKGROUND, HEALTHY

    H, W = shape
    up = cv2.resize(probabilities.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
    lesion = up.argmax(-1)  # 0 no lesion, 1 GGO, 2 CON
    labels = np.where(lesion == 0, HEALTHY, lesion + 1)
    return np.where(lung, labels, BACKGROUND).astype(np.uint8)


def pooled_dice(table) -> dict:
    totals: dict[str, list[int]] = {}
    for row in table.per_image_rows():
        t = totals.setdefault(row["class"], [0, 0, 0])
        for j, key in enumerate(("tp", "fp", "fn")):
            t[j] += row[key]
    return {c: 2 * tp / max(2 * tp + fp + fn, 1) for c, (tp, fp, fn) in totals.items()}


def evaluate(model, raws: dict, lungs: dict, size: int) -> dict:
    from stitchnet_tf.data.classes import LESION
    from stitchnet_tf.metrics import Table1

    table, unmasked = Table1(scheme="multiclass"), Table1(scheme="multiclass")
    ids = list(raws)
    x = np.stack([resize(raws[i].image, size) for i in ids])[..., None]
    probabilities = model.predict(x, batch_size=8, verbose=0)
    for sample_id, p in zip(ids, probabilities, strict=True):
        shape = raws[sample_id].image.shape
        table.add(sample_id, to_four_class(p, shape, lungs[sample_id]), raws[sample_id].allowed)
        everywhere = np.ones(shape, bool)
        unmasked.add(sample_id, to_four_class(p, shape, everywhere), raws[sample_id].allowed)

    def scores(t) -> dict:
        s = t.summary()
        pooled = pooled_dice(t)
        return {
            c: {
                "dice_mean": s["classes"][c]["f1"]["mean"],
                "dice_std": s["classes"][c]["f1"]["std"],
                "iou_mean": s["classes"][c]["iou"]["mean"],
                "dice_pooled": pooled[c],
                "n_images": s["classes"][c]["n_images"],
                "n_left_out": s["classes"][c]["n_left_out"],
            }
            for c in ("ggo", "con")
        }

    per_image = {
        r["image"] + ":" + r["class"]: r["f1"]
        for r in table.per_image_rows()
        if r["class"] != "background"
    }
    lesion = np.concatenate([(raws[i].allowed & LESION).ravel() != 0 for i in ids])
    inside = np.concatenate([lungs[i].ravel() for i in ids])
    return {
        "slices": len(ids),
        "truth_lesion_outside_lung_field": float((lesion & ~inside).sum() / max(lesion.sum(), 1)),
        "lung_field": scores(table),
        "no_lung_field": scores(unmasked),
        "per_image_dice": per_image,
    }


def machine() -> dict:
    """The benchmarks' machine description (`pipeline_throughput.machine`), plus Keras'."""
    import keras

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pipeline_throughput import machine as describe

    return describe() | {"platform": platform.platform(), "keras": keras.__version__}


# ---------------------------------------------------------------- reports
def cell(mean, std=None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def run_name(settings: dict) -> str:
    steps = "" if settings["steps"] == DEFAULT_STEPS else f" n{settings['steps']}"
    return f"w{settings['width']}{steps} s{settings['seed']}"


def run_tag(width: int, steps: int) -> str:
    """The file-name tag of a run with non-default width or steps ("" for the defaults)."""
    return ("" if width == DEFAULT_WIDTH else f"_w{width}") + (
        "" if steps == DEFAULT_STEPS else f"_n{steps}"
    )


def command(settings: dict) -> str:
    width = "" if settings["width"] == DEFAULT_WIDTH else f" --width {settings['width']}"
    return COMMAND.format(**settings) + width


def write_combined(output: Path) -> None:
    """Rebuild reference_unet.json / .md from every per-run JSON in `output`."""
    from stitchnet_tf.fileio import atomic_write_text

    paths = sorted(output.glob("reference_unet_s*.json")) + sorted(
        p for p in output.glob("reference_unet_*_s*.json") if p.name[15] in "wn"
    )
    runs = [json.loads(p.read_text()) for p in paths]
    if not runs:
        return

    def width_order(w: int) -> tuple[bool, int]:
        return w != DEFAULT_WIDTH, w

    runs.sort(
        key=lambda r: (
            width_order(r["settings"]["width"]),
            r["settings"]["steps"] != DEFAULT_STEPS,
            r["settings"]["steps"],
            r["settings"]["seed"],
        )
    )
    groups = list(dict.fromkeys((r["settings"]["width"], r["settings"]["steps"]) for r in runs))
    first = runs[0]
    combined: dict = {"default_width": DEFAULT_WIDTH, "runs": runs, "mean_over_seeds": {}}
    lines = [
        "# Plain reference U-Net on MedSeg (medseg_seed0 split)",
        "",
        f"Reproduce (from the repository root): `{command(first['settings'])}` "
        "(one run per `--seed`; it rewrites this file from every `reference_unet*_s*.json`)",
        "",
        f"Runs: {', '.join(run_name(r['settings']) for r in runs)} (w = base width in filters, "
        f"s = seed; the default width is {DEFAULT_WIDTH}). Dice = Table-1 F1; per image: mean ± "
        "population std over the slices that contain the class; pooled: over all pixels of "
        "the part's slices.",
        "",
    ]
    for part in ("test", "val"):
        lines += [
            f"## {part} slices ({first[part]['slices']}), lung field from the image",
            "",
            "| run | GGO Dice per image | CON Dice per image | GGO pooled | CON pooled |"
            " GGO IoU | CON IoU |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in runs:
            g, c = r[part]["lung_field"]["ggo"], r[part]["lung_field"]["con"]
            lines.append(
                f"| {run_name(r['settings'])} | {cell(g['dice_mean'], g['dice_std'])} | "
                f"{cell(c['dice_mean'], c['dice_std'])} | {cell(g['dice_pooled'])} | "
                f"{cell(c['dice_pooled'])} | {cell(g['iou_mean'])} | {cell(c['iou_mean'])} |"
            )
        for w, n in groups:
            group = [
                r[part]["lung_field"]
                for r in runs
                if (r["settings"]["width"], r["settings"]["steps"]) == (w, n)
            ]
            name = run_name({"width": w, "steps": n, "seed": 0})[:-3]
            if len(group) < 2:
                continue
            mean = {
                f"{k}_{q}": float(np.mean([g[k][q] for g in group]))
                for k in ("ggo", "con")
                for q in ("dice_mean", "dice_pooled")
            }
            combined["mean_over_seeds"].setdefault(name.replace(" ", "_"), {})[part] = mean | {
                "seeds": len(group)
            }
            lines.append(
                f"| {name}, mean of {len(group)} seeds | {cell(mean['ggo_dice_mean'])} | "
                f"{cell(mean['con_dice_mean'])} | {cell(mean['ggo_dice_pooled'])} | "
                f"{cell(mean['con_dice_pooled'])} | | |"
            )
        left = first[part]["lung_field"]
        lines += [
            "",
            f"- Slices left out of the per-image means (no such class in the truth; `Table1` "
            f"absent=exclude): GGO {left['ggo']['n_left_out']}, CON {left['con']['n_left_out']} "
            f"of {first[part]['slices']}.",
            f"- Truth lesion pixels outside the segmenter's lung field (lost whatever the model "
            f"does): {100 * first[part]['truth_lesion_outside_lung_field']:.1f}%.",
            "- Without the lung-field step (diagnostic only, per-image Dice): "
            + "; ".join(
                f"{run_name(r['settings'])} GGO "
                f"{cell(r[part]['no_lung_field']['ggo']['dice_mean'])} / CON "
                f"{cell(r[part]['no_lung_field']['con']['dice_mean'])}"
                for r in runs
            )
            + ".",
            "",
        ]
    lines += [
        "## Training",
        "",
        "| run | parameters | train seconds | steps/s | final loss |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        t = r["training"]
        lines.append(
            f"| {run_name(r['settings'])} | {t['parameters']:,} | {t['seconds']:.0f} | "
            f"{t['steps_per_second']:.2f} | {t['final_loss']:.3f} |"
        )
    s, m = first["settings"], first["machine"]
    lines += [
        "",
        "Train seconds: wall time of `model.fit` (includes tracing and the Python-side "
        "augmentation; excludes reading the data and the evaluation).",
        "",
        "## Settings",
        "",
        "- U-Net: 4 levels of (conv3x3-BN-ReLU x2) + 2x2 max-pool, a bottleneck block, a decoder "
        "of bilinear upsampling + skip concatenation + (conv3x3-BN-ReLU x2); filters = base "
        "width doubling per level; 1x1 conv to a 3-class softmax (no lesion, GGO, CON). "
        f"Default base width {DEFAULT_WIDTH}: 30 training slices need no more, and width 32 "
        "trains about half as fast on a 2-core CPU.",
        f"- Input: the whole slice (no lung crop) resized to {s['size']}x{s['size']} "
        "(area when shrinking), values in [0, 1].",
        f"- Training: {s['steps']} steps of batch {s['batch']} drawn at random from the "
        f"{s['train_slices']} train slices; loss = cross-entropy + (1 - soft Dice averaged over "
        "GGO and CON, each summed over the batch, smoothing 1); Adam 1e-3, cosine decay to 0 "
        "over the run; random horizontal and vertical flips, random crop of 0.8-1.0 of the "
        "side (same fraction for both sides) resized back. No checkpoint selection: the "
        "last weights are scored, so val is as held out as test.",
        "- Evaluation: softmax at model size, resized linearly to the slice's original size, "
        "argmax; pixels outside the lung field of `lung_unet.default_segmenter()` "
        f"(`{s['segmenter']}`, from the image only, never the labels) set to background, "
        "no-lesion pixels inside it to healthy; scored by `stitchnet_tf.metrics.Table1` "
        "(multiclass, absent=exclude) against the original-size masks; pooled Dice = "
        "2 sum TP / (2 sum TP + sum FP + sum FN) over the slices.",
        f"- Data: `{s['data']}`, split `{s['split']}`.",
        f"- Machine: {m['cpu']}, {m['cores']} cores (shared with other work); {m['platform']}; "
        f"Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}; last run "
        f"{max(r['date'] for r in runs)}.",
        "",
    ]
    atomic_write_text(output / "reference_unet.json", json.dumps(combined, indent=1) + "\n")
    atomic_write_text(output / "reference_unet.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--split", type=Path, default=SPLIT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="top-level filters")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: {args.data}: data folder not found", file=sys.stderr)
        return 2
    if args.size % 16:
        print(f"error: --size {args.size} is not a multiple of 16", file=sys.stderr)
        return 2

    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.lung_unet import default_segmenter
    from stitchnet_tf.data.preprocess import read_sample
    from stitchnet_tf.data.splits import Split
    from stitchnet_tf.fileio import atomic_write_text

    dataset = discover(args.data, require_labels=True)
    split = Split.load(args.split)
    split.check(dataset)
    by_id = {s.id: s for s in dataset.samples}
    raws = {
        part: {i: read_sample(by_id[i], dataset.mask_map) for i in split.part(part)}
        for part in ("train", "val", "test")
    }
    images = [r.image for r in raws["train"].values()]
    labels = [lesion_index(r.allowed) for r in raws["train"].values()]
    print(f"{len(images)} train slices; training {args.steps} steps", flush=True)

    model, seconds, loss = train(
        images, labels, args.size, args.steps, args.batch, args.width, args.seed
    )
    print(f"trained in {seconds:.0f} s ({args.steps / seconds:.2f} steps/s)", flush=True)
    segmenter = default_segmenter()
    result = {
        "settings": {
            "seed": args.seed,
            "steps": args.steps,
            "size": args.size,
            "batch": args.batch,
            "width": args.width,
            "train_slices": len(images),
            "data": os.path.relpath(args.data, ROOT),
            "split": os.path.relpath(args.split, ROOT),
            "segmenter": repr(segmenter).replace(str(ROOT) + os.sep, ""),
        },
        "training": {
            "seconds": seconds,
            "steps_per_second": args.steps / seconds,
            "final_loss": loss,
            "parameters": int(model.count_params()),
        },
    }
    for part in ("test", "val"):
        lungs = {i: segmenter(r.image).astype(bool) for i, r in raws[part].items()}
        result[part] = evaluate(model, raws[part], lungs, args.size)
        s = result[part]["lung_field"]
        print(
            f"{part}: GGO {cell(s['ggo']['dice_mean'], s['ggo']['dice_std'])} "
            f"(pooled {s['ggo']['dice_pooled']:.3f}), CON "
            f"{cell(s['con']['dice_mean'], s['con']['dice_std'])} "
            f"(pooled {s['con']['dice_pooled']:.3f})",
            flush=True,
        )
    result["machine"] = machine()
    result["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"reference_unet{run_tag(args.width, args.steps)}_s{args.seed}.json"
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    write_combined(args.output)
    print(f"wrote {path} and reference_unet.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
