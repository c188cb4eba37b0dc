"""Train the small lung-field U-Net (`stitchnet_tf.data.lung_unet`) on zenodo20-lungs and test it.

Usage (from the repository root):
    python benchmarks/train_lung_unet.py [--data ../shared/data/zenodo20-lungs] [--steps 1500]
        [--size 160] [--batch 16] [--seed 0] [--synthetic 30] [--edge-lesions 0.35]
        [--medseg ../shared/data/medseg-covid/labelled [--medseg-exclude SPLIT.json ...]]
        [--init saved_models/lung_unet/lung_unet.keras]

The slices are split by patient with `split_dataset` (fractions 0.6/0.2/0.2, `--seed`; or
`--split SPLIT.json`, e.g. a cross-validation fold's, so that a fold's lung model never saw its
test patients): the
network trains on the train patients, the val patients pick the best checkpoint, and the test
patients are only used at the end. Augmentation aims beyond zenodo's full-frame CLAHE look
(MedSeg slices are cropped tight to the thorax, rotated and plainly windowed): crops tight to the
lungs or zooms, small rotations, flips and 90-degree rotations, windowing, gamma, CLAHE, blur,
low resolution, noise, JPEG artefacts and burned-in marks; dense or hazy blobs painted into the
lung at its border on `--edge-lesions` of the slices (label unchanged); plus `--synthetic`
patients of `synth_patient` slices (10 each) through a jittered lung window. About 10 minutes on
2 shared CPU cores.

`--medseg` adds the MedSeg labelled slices (no lung masks) with a pseudo-lung target: the teacher
lung mask (`--init`, else the shipped model) united with the radiologists' lesion pixels, holes
filled. Lesions are lung, and the MedSeg look (tight thorax crops, plain windowing, large
dependent consolidation) is what the zenodo-only model misses. `--medseg-exclude SPLIT.json`
holds out the split's test slices: they are never trained on and the report gives the share of
their GGO and consolidation pixels outside the lung field (the honest miss; the train slices'
miss is reported too, and is optimistic). `--init` fine-tunes from a saved model.

Writes the model to saved_models/lung_unet/lung_unet.keras (with lung_unet.json: split, options,
results), and lung_unet.json / lung_unet.md to --output (default benchmarks/results): Dice per
test patient (pooled over its slices) of the learned model and of the classical `AutoLungMask`.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lung_field_miss import medseg, miss  # noqa: E402
from lungmask_dice import machine, read_gray  # noqa: E402

from stitchnet_tf.data.intensity import to_uint8, window_hu  # noqa: E402
from stitchnet_tf.data.lung_unet import normalise, to_working_size  # noqa: E402
from stitchnet_tf.data.lungmask import fill_holes  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "zenodo20-lungs"
MODEL_DIR = ROOT / "saved_models" / "lung_unet"


# --------------------------------------------------------------------------- data


def load_part(data: Path, ids: list[str], dataset) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images [N, H, W], bool lung masks [N, H, W] and patients of the sample ids."""
    by_id = {s.id: s for s in dataset.samples}
    images, lungs, patients = [], [], []
    for i in ids:
        s = by_id[i]
        images.append(read_gray(Path(s.image)))
        lungs.append(read_gray(Path(s.lung)) > 127)
        patients.append(s.patient)
    return np.stack(images), np.stack(lungs), patients


def load_medseg(folder: Path, exclude: set[str]) -> tuple[list, list, list, list]:
    """MedSeg labelled slices (`lung_field_miss.medseg`): (train images, train lesion masks,
    held-out images, held-out lesion masks); float32 [H, W] in [0, 1] and int [H, W] class
    indices (0 none, 1 GGO, 2 CON). Slices whose id ("images/<n>.jpg") is in `exclude` are held
    out."""
    parts: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
    for sid, image, mask in medseg(folder):
        parts[sid in exclude][0].append(image)
        parts[sid in exclude][1].append(mask)
    return (*parts[False], *parts[True])


def lesion_miss(segmenter, images: list, lesions: list) -> dict[str, float]:
    """Share of GGO / consolidation pixels outside the segmenter's lung field (pooled), by
    `lung_field_miss.miss`."""
    m = miss(segmenter, [("", i, y) for i, y in zip(images, lesions, strict=True)])
    return {"ggo": m["ggo_miss"], "consolidation": m["consolidation_miss"]}


def synthetic_slices(n_patients: int, per_patient: int, size: int, seed: int):
    """(HU images, lung masks) of `n_patients` synthetic patients."""
    from stitchnet_tf.data.synthetic import synth_patient

    hus, lungs = [], []
    for p in range(n_patients):
        for s in synth_patient(10_000 * (seed + 1) + p, per_patient, size=size):
            hus.append(s.hu)
            lungs.append(s.lung)
    return hus, lungs


# --------------------------------------------------------------------------- augmentation


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def geometric(
    img: np.ndarray, lung: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random crop (tight to the lungs, or a zoom in/out) with a small rotation, at source
    resolution: (float32 image, float32 mask) of the crop's size."""
    H, W = img.shape
    ys, xs = np.nonzero(lung)
    if rng.random() < 0.5 and ys.size:
        # tight to the thorax like MedSeg: the lung box plus -6%..+30% of its size per side
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        bh, bw = y1 - y0, x1 - x0
        m = rng.uniform(-0.06, 0.3, 4)
        y0, y1 = y0 - m[0] * bh, y1 + m[1] * bh
        x0, x1 = x0 - m[2] * bw, x1 + m[3] * bw
    else:
        # full frame, zoomed in or out, with an aspect change
        side = rng.uniform(0.65, 1.25)
        aspect = _log_uniform(rng, 0.75, 1.33)
        h, w = side * H * aspect**0.5, side * W / aspect**0.5
        cy = H / 2 + rng.uniform(-0.12, 0.12) * H
        cx = W / 2 + rng.uniform(-0.12, 0.12) * W
        y0, y1, x0, x1 = cy - h / 2, cy + h / 2, cx - w / 2, cx + w / 2
    h, w = max(int(round(y1 - y0)), 24), max(int(round(x1 - x0)), 24)
    angle = rng.uniform(-12, 12) if rng.random() < 0.4 else 0.0
    # affine map: source (crop centre, rotated) -> output pixel grid of the crop
    M = cv2.getRotationMatrix2D(((x0 + x1) / 2, (y0 + y1) / 2), angle, 1.0)
    M[0, 2] += w / 2 - (x0 + x1) / 2
    M[1, 2] += h / 2 - (y0 + y1) / 2
    bg = float(np.percentile(img[:8, :].ravel(), 50))  # the outside air of a full-frame slice
    out = cv2.warpAffine(
        img, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=bg
    )
    m = cv2.warpAffine(lung.astype(np.float32), M, (w, h), flags=cv2.INTER_LINEAR)
    return out, m


def intensity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random windowing, gamma, CLAHE, blur, low resolution, noise, JPEG, marks; [0, 1] float32."""
    S = x.shape[0]
    if rng.random() < 0.5:  # narrower window: tissue saturates white, lung goes black
        lo, hi = rng.uniform(0.0, 0.25), rng.uniform(0.55, 1.0)
        x = np.clip((x - lo) / (hi - lo), 0, 1)
    x = np.power(np.clip(x, 0, 1), _log_uniform(rng, 0.6, 1.7)).astype(np.float32)
    if rng.random() < 0.25:
        clahe = cv2.createCLAHE(clipLimit=float(rng.uniform(1.0, 3.0)), tileGridSize=(8, 8))
        x = clahe.apply(to_uint8(x)).astype(np.float32) / 255.0
    if rng.random() < 0.3:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.5))
    if rng.random() < 0.15:
        f = rng.uniform(0.35, 0.7)
        small = cv2.resize(x, (max(int(S * f), 8),) * 2, interpolation=cv2.INTER_AREA)
        x = cv2.resize(small, (S, S), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.15:  # burned-in arrows / text
        u8 = to_uint8(x)
        for _ in range(int(rng.integers(1, 4))):
            c = rng.uniform(0, S, 2)
            pts = (c + rng.normal(0, S * 0.04, (3, 2))).astype(np.int32)
            cv2.fillPoly(u8, [pts], int(rng.choice([0, 255])))
        x = u8.astype(np.float32) / 255.0
    if rng.random() < 0.4:
        x = x + rng.normal(0, rng.uniform(0.005, 0.04), x.shape).astype(np.float32)
    if rng.random() < 0.25:
        ok, buf = cv2.imencode(
            ".jpg", to_uint8(x), [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 90))]
        )
        x = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
    return np.clip(x, 0, 1).astype(np.float32)


def edge_lesions(img: np.ndarray, lung: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint 1-3 dense or hazy blobs into the lung at its border (subpleural consolidation or
    GGO, the classical method's weak spot); the lung mask stays as it is."""
    ys, xs = np.nonzero(lung & ~cv2.erode(lung.astype(np.uint8), np.ones((3, 3))).astype(bool))
    outside = img[~lung]
    if ys.size < 10 or outside.size < 100:
        return img
    tissue = float(np.percentile(outside, rng.uniform(70, 97)))
    air = float(np.median(img[lung]))
    scale = float(np.sqrt(np.count_nonzero(lung)))
    paint = np.zeros(img.shape, np.float32)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(ys.size))
        a, b = scale * rng.uniform(0.08, 0.35), scale * rng.uniform(0.05, 0.2)
        axes = (max(int(a), 2), max(int(b), 2))
        blob = np.zeros(img.shape, np.uint8)
        cv2.ellipse(blob, (int(xs[k]), int(ys[k])), axes, rng.uniform(0, 180), 0, 360, 1, -1)
        strength = 1.0 if rng.random() < 0.6 else rng.uniform(0.3, 0.6)  # consolidation / GGO
        paint = np.maximum(paint, blob.astype(np.float32) * strength)
    paint = cv2.GaussianBlur(paint, (0, 0), rng.uniform(0.7, 2.5)) * lung
    texture = rng.normal(0, rng.uniform(0.01, 0.05), img.shape).astype(np.float32)
    target = np.clip(air + (tissue - air) * paint + texture * (paint > 0), 0, 1)
    return np.where(paint > 0.02, np.maximum(img, target), img).astype(np.float32)


def lobar_consolidation(img: np.ndarray, lung: np.ndarray, rng: np.random.Generator):
    """Fill the far part of one lung (beyond a random cut across it, 20-75% of its extent in a
    random direction) with soft-tissue intensity: a lobe consolidated to the chest wall, which
    must stay lung. The lung mask does not change."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(lung.astype(np.uint8), connectivity=8)
    outside = img[~lung]
    if n <= 1 or outside.size < 100:
        return img
    big = 1 + np.argsort(stats[1:, cv2.CC_STAT_AREA])[::-1][:2]
    part = lab == int(rng.choice(big))
    ys, xs = np.nonzero(part)
    angle = rng.uniform(0, 2 * np.pi)
    along = ys * np.sin(angle) + xs * np.cos(angle)
    cut = np.quantile(along, 1.0 - rng.uniform(0.2, 0.75))
    fill = np.zeros(img.shape, np.float32)
    fill[ys[along >= cut], xs[along >= cut]] = 1.0
    fill = cv2.GaussianBlur(fill, (0, 0), rng.uniform(0.7, 2.0)) * part
    tissue = float(np.percentile(outside, rng.uniform(75, 97)))
    texture = rng.normal(0, rng.uniform(0.01, 0.05), img.shape).astype(np.float32)
    structure = (img - float(np.median(img[part]))) * rng.uniform(0.0, 0.4)  # vessels, bronchi
    target = np.clip(tissue * rng.uniform(0.85, 1.05) + structure + texture, 0, 1)
    return (img * (1 - fill) + target * fill).astype(np.float32)


def augment(
    img: np.ndarray,
    lung: np.ndarray,
    size: int,
    rng: np.random.Generator,
    lesion_probability: float = 0.0,
    lobar_probability: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One training example: ([size, size] float32 in [0, 1], [size, size] float32 0/1)."""
    if rng.random() < lesion_probability:
        img = edge_lesions(img, lung, rng)
    if rng.random() < lobar_probability:
        img = lobar_consolidation(img, lung, rng)
    x, m = geometric(img, lung, rng)
    x = normalise(x)
    if x is None:
        x = np.zeros(m.shape, np.float32)
    x = to_working_size(x, size)
    m = (to_working_size(m, size) > 0.5).astype(np.float32)
    k = int(rng.integers(4))
    x, m = np.rot90(x, k), np.rot90(m, k)
    if rng.random() < 0.5:
        x, m = x[:, ::-1], m[:, ::-1]
    x = intensity(np.ascontiguousarray(x), rng)
    x = normalise(x)
    if x is None:
        x = np.zeros(m.shape, np.float32)
    return x, np.ascontiguousarray(m)


class Batches:
    """Background thread making augmented batches; batch `i` depends only on (seed, i)."""

    def __init__(self, images, lungs, synth_hu, synth_lungs, args, steps: int, medseg=((), ())):
        self.images, self.lungs = images, lungs
        self.medseg_images, self.medseg_lungs = medseg
        self.synth_hu, self.synth_lungs = synth_hu, synth_lungs
        self.args, self.steps = args, steps
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _example(self, rng: np.random.Generator):
        if self.medseg_images and rng.random() < self.args.medseg_fraction:
            j = int(rng.integers(len(self.medseg_images)))
            return augment(
                self.medseg_images[j],
                self.medseg_lungs[j],
                self.args.size,
                rng,
                lobar_probability=self.args.lobar,
            )
        if self.synth_hu and rng.random() < self.args.synthetic_fraction:
            j = int(rng.integers(len(self.synth_hu)))
            level = rng.uniform(-700, -450)
            width = rng.uniform(1200, 1800)
            img = window_hu(self.synth_hu[j], level, width)
            if rng.random() < 0.5:  # zenodo-like: min-max and CLAHE
                u8 = to_uint8(normalise(img))
                img = cv2.createCLAHE(2.0, (8, 8)).apply(u8).astype(np.float32) / 255.0
            return augment(img, self.synth_lungs[j], self.args.size, rng)
        j = int(rng.integers(len(self.images)))
        img = self.images[j].astype(np.float32) / 255.0
        return augment(
            img, self.lungs[j], self.args.size, rng, self.args.edge_lesions, self.args.lobar
        )

    def _run(self) -> None:
        cv2.setNumThreads(1)
        for i in range(self.steps):
            rng = np.random.default_rng(np.random.SeedSequence([self.args.seed, 1, i]))
            xs, ys = zip(*(self._example(rng) for _ in range(self.args.batch)), strict=True)
            self.q.put((np.stack(xs)[..., None], np.stack(ys)[..., None]))

    def get(self):
        return self.q.get()


# --------------------------------------------------------------------------- training


def dice_bce(y_true, y_pred):
    """Binary cross-entropy + (1 - soft Dice over the batch)."""
    import keras
    from keras import ops

    bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred))
    inter = ops.sum(y_true * y_pred)
    dice = (2.0 * inter + 1.0) / (ops.sum(y_true) + ops.sum(y_pred) + 1.0)
    return bce + 1.0 - dice


def pooled_dice(masks, truths, patients) -> dict[str, dict]:
    """Dice per patient pooled over its slices, plus its mean / worst slice Dice."""
    inter: dict[str, int] = {}
    total: dict[str, int] = {}
    per: dict[str, list[float]] = {}
    for m, t, p in zip(masks, truths, patients, strict=True):
        i, s = int(np.count_nonzero(m & t)), int(np.count_nonzero(m) + np.count_nonzero(t))
        inter[p] = inter.get(p, 0) + i
        total[p] = total.get(p, 0) + s
        per.setdefault(p, []).append(2.0 * i / s if s else 1.0)
    return {
        p: {
            "slices": len(per[p]),
            "dice": 2.0 * inter[p] / total[p] if total[p] else 1.0,
            "mean_slice_dice": float(np.mean(per[p])),
            "min_slice_dice": float(np.min(per[p])),
        }
        for p in sorted(per)
    }


def summary(per_patient: dict[str, dict]) -> dict:
    worst = min(per_patient, key=lambda p: per_patient[p]["dice"])
    return {
        "mean_patient_dice": float(np.mean([v["dice"] for v in per_patient.values()])),
        "worst_patient": {"patient": worst, "dice": per_patient[worst]["dice"]},
        "per_patient": per_patient,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="zenodo20-lungs folder")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--model", type=Path, default=MODEL_DIR / "lung_unet.keras")
    parser.add_argument("--size", type=int, default=160, help="working size of the network")
    parser.add_argument("--filters", default="8,16,32,64,96", help="filters per level")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (batches)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine)")
    parser.add_argument("--seed", type=int, default=0, help="split, augmentation and init seed")
    parser.add_argument(
        "--split",
        type=Path,
        default=None,
        help="split JSON of --data to use instead of the seeded one (e.g. a CV fold's)",
    )
    parser.add_argument("--synthetic", type=int, default=30, help="synthetic patients (10 slices)")
    parser.add_argument("--synthetic-fraction", type=float, default=0.15)
    parser.add_argument(
        "--edge-lesions", type=float, default=0.35, help="share of slices with painted lesions"
    )
    parser.add_argument("--eval-every", type=int, default=300, help="steps between val checks")
    parser.add_argument("--medseg", type=Path, default=None, help="MedSeg labelled folder")
    parser.add_argument(
        "--medseg-exclude",
        type=Path,
        action="append",
        default=[],
        help="split JSON whose test slices are held out of --medseg (repeatable)",
    )
    parser.add_argument("--medseg-fraction", type=float, default=0.3, help="share of examples")
    parser.add_argument("--init", type=Path, default=None, help="fine-tune from this model")
    parser.add_argument(
        "--lobar", type=float, default=0.0, help="share of slices with a consolidated lobe painted"
    )
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"error: {args.data}: zenodo20-lungs folder not found (pass --data)", file=sys.stderr)
        return 2

    import keras
    import tensorflow as tf

    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.lung_unet import LearnedLungMask, build_lung_unet, mask_from_probability
    from stitchnet_tf.data.lungmask import AutoLungMask
    from stitchnet_tf.data.splits import Split, split_dataset
    from stitchnet_tf.fileio import atomic_write_text

    t_start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    dataset = discover(args.data, masks_subdir="infection", lungs_subdir="lungs")
    if args.split is not None:
        split = Split.load(args.split)
        split.check(dataset)
        how = f"from `{args.split.name}`"
    else:
        split = split_dataset(dataset, seed=args.seed)
        how = f"with `split_dataset` (seed {args.seed}, fractions {list(split.fractions)})"
    print(f"split {how}: {split.patients}", flush=True)
    tr_img, tr_lung, _ = load_part(args.data, split.train, dataset)
    va_img, va_lung, va_pat = load_part(args.data, split.val, dataset)
    synth_hu, synth_lung = (
        synthetic_slices(args.synthetic, 10, 256, args.seed) if args.synthetic else ([], [])
    )
    print(
        f"train {len(tr_img)} slices + {len(synth_hu)} synthetic, val {len(va_img)}, "
        f"test {len(split.test)}; data ready in {time.perf_counter() - t_start:.0f} s",
        flush=True,
    )

    medseg_train, medseg_held, medseg_train_lesions = ((), ()), ((), ()), ((), ())
    if args.medseg is not None:
        exclude: set[str] = set()
        for f in args.medseg_exclude:
            exclude |= set(json.loads(f.read_text())["test"])
        m_img, m_les, h_img, h_les = load_medseg(args.medseg, exclude)
        teacher = LearnedLungMask(args.init) if args.init else LearnedLungMask()
        m_lung = [fill_holes(teacher(i) | (y > 0)) for i, y in zip(m_img, m_les, strict=True)]
        medseg_train, medseg_held = (m_img, m_lung), (h_img, h_les)
        medseg_train_lesions = (m_img, m_les)
        print(f"MedSeg: {len(m_img)} train slices (pseudo-lung), {len(h_img)} held out", flush=True)

    filters = tuple(int(f) for f in args.filters.split(","))
    if args.init is not None:
        model = keras.models.load_model(args.init, safe_mode=True, compile=False)
        if tuple(model.input_shape[1:3]) != (args.size, args.size):
            print(f"error: {args.init}: input {model.input_shape}, not --size {args.size}")
            return 2
    else:
        model = build_lung_unet(args.size, filters)
    schedule = keras.optimizers.schedules.CosineDecay(
        args.lr * 0.1, args.steps, alpha=0.01, warmup_target=args.lr, warmup_steps=args.steps // 20
    )
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=dice_bce, jit_compile=False)
    spec = tf.TensorSpec([None, args.size, args.size, 1], tf.float32)
    infer = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    va_x = np.stack(
        [to_working_size(normalise(i.astype(np.float32) / 255.0), args.size) for i in va_img]
    )

    def val_dice() -> float:
        prob = np.concatenate(
            [np.asarray(infer(va_x[s : s + 32, ..., None])) for s in range(0, len(va_x), 32)]
        )
        masks = [mask_from_probability(p[..., 0], va_lung.shape[1:]) for p in prob]
        return summary(pooled_dice(masks, va_lung, va_pat))["mean_patient_dice"]

    batches = Batches(tr_img, tr_lung, synth_hu, synth_lung, args, args.steps, medseg_train)
    t_train = time.perf_counter()
    best, best_step, best_weights, losses, history = -1.0, 0, None, [], []
    for step in range(1, args.steps + 1):
        x, y = batches.get()
        losses.append(float(model.train_on_batch(x, y)))
        if step % 50 == 0:
            print(
                f"step {step}/{args.steps} loss {np.mean(losses[-50:]):.4f} "
                f"{time.perf_counter() - t_train:.0f} s",
                flush=True,
            )
        if step % args.eval_every == 0 or step == args.steps:
            d = val_dice()
            history.append(
                {"step": step, "val_mean_patient_dice": d, "loss": np.mean(losses[-50:])}
            )
            print(f"  val mean per-patient Dice {d:.4f}", flush=True)
            if d > best:
                best, best_step, best_weights = d, step, model.get_weights()
    train_seconds = time.perf_counter() - t_train
    model = build_lung_unet(args.size, filters)  # uncompiled: no optimizer state in the file
    model.set_weights(best_weights)
    args.model.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.model.with_name(f".{args.model.stem}.tmp-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, args.model)
    print(
        f"saved {args.model} (step {best_step}, val Dice {best:.4f}); "
        f"training {train_seconds:.0f} s"
    )

    # held-out test patients: the saved model through the LungSegmenter interface vs classical
    te_img, te_lung, te_pat = load_part(args.data, split.test, dataset)
    learned, classical = LearnedLungMask(args.model), AutoLungMask()
    nearest = LearnedLungMask(args.model, upsample="nearest")
    results = {}
    for name, seg in (("learned", learned), ("classical", classical), ("learned_nearest", nearest)):
        masks, seconds = [], []
        for img in te_img:
            x = img.astype(np.float32) / 255.0
            t = time.perf_counter()
            masks.append(seg(x))
            seconds.append(time.perf_counter() - t)
        results[name] = summary(pooled_dice(masks, te_lung, te_pat)) | {
            "config": seg.get_config(),
            "ms_per_slice": 1000.0 * float(np.mean(seconds)),
        }
    va_results = {}
    for name, seg in (("learned", learned), ("classical", classical)):
        va_results[name] = summary(pooled_dice([seg(i / 255.0) for i in va_img], va_lung, va_pat))
    medseg_miss = {}
    if args.medseg is not None:
        for part, (imgs, lesions) in (("held_out", medseg_held), ("train", medseg_train_lesions)):
            if imgs:
                medseg_miss[part] = {"slices": len(imgs)} | lesion_miss(learned, imgs, lesions)
    total_seconds = time.perf_counter() - t_start

    command = " ".join(["python", "benchmarks/train_lung_unet.py", *sys.argv[1:]])
    out = {
        "benchmark": "train_lung_unet",
        "data": str(args.data),
        "split": {
            "file": None if args.split is None else str(args.split),
            "seed": args.seed,
            "fractions": list(split.fractions),
            "patients": split.patients,
            "slices": {p: len(split.part(p)) for p in ("train", "val", "test")},
        },
        "options": {
            k: (
                str(v)
                if isinstance(v, Path)
                else [str(f) for f in v]
                if k == "medseg_exclude"
                else v
            )
            for k, v in vars(args).items()
        },
        "model": {
            "file": str(
                args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model
            ),
            "parameters": int(model.count_params()),
            "size": args.size,
            "filters": list(filters),
            "bytes": args.model.stat().st_size,
            "best_step": best_step,
            "best_val_mean_patient_dice": best,
        },
        "history": history,
        "test": results,
        "medseg_lesion_miss": medseg_miss,
        "val": {
            k: {kk: v[kk] for kk in ("mean_patient_dice", "worst_patient")}
            for k, v in va_results.items()
        },
        "training_seconds": train_seconds,
        "total_seconds": total_seconds,
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine() | {"tensorflow": tf.__version__, "keras": keras.__version__},
    }
    text = json.dumps(out, indent=1) + "\n"
    atomic_write_text(args.output / "lung_unet.json", text)
    atomic_write_text(args.model.with_suffix(".json"), text)

    L, C = results["learned"], results["classical"]
    m = out["machine"]
    lines = [
        "# Learned lung-field U-Net vs classical AutoLungMask (zenodo20-lungs, held-out patients)",
        "",
        f"U-Net `{out['model']['file']}`: {out['model']['parameters']:,} parameters, "
        f"{args.size}x{args.size} working size, filters {list(filters)}, "
        f"{out['model']['bytes'] / 1e6:.1f} MB. Split by patient {how}:",
        "",
        f"- train: {', '.join(split.patients['train'])} ({len(split.train)} slices"
        f"{f' + {len(synth_hu)} synthetic' if synth_hu else ''})",
        f"- val (checkpoint choice): {', '.join(split.patients['val'])} ({len(split.val)} slices)",
        f"- test (reported below): {', '.join(split.patients['test'])} ({len(split.test)} slices)",
        "",
        "Dice per patient is pooled over its slices (2 sum|A&B| / (sum|A| + sum|B|)); both methods "
        "run through the `LungSegmenter` interface on the 256x256 slices scaled to [0, 1].",
        "",
        "| test patient | slices | learned Dice | classical Dice | learned worst slice "
        "| classical worst slice |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p, v in L["per_patient"].items():
        c = C["per_patient"][p]
        lines.append(
            f"| {p} | {v['slices']} | {v['dice']:.3f} | {c['dice']:.3f} "
            f"| {v['min_slice_dice']:.3f} | {c['min_slice_dice']:.3f} |"
        )
    lines += [
        f"| **mean** | {len(split.test)} | **{L['mean_patient_dice']:.3f}** "
        f"| **{C['mean_patient_dice']:.3f}** | | |",
        "",
        f"- Worst test patient: learned {L['worst_patient']['patient']} "
        f"{L['worst_patient']['dice']:.3f}; classical {C['worst_patient']['patient']} "
        f"{C['worst_patient']['dice']:.3f}.",
        f'- Learned with `upsample="nearest"` (threshold at {args.size} px, then nearest '
        f"neighbour): mean {results['learned_nearest']['mean_patient_dice']:.3f}, worst "
        f"{results['learned_nearest']['worst_patient']['dice']:.3f}.",
        f"- Val patients (used to pick the checkpoint, so optimistic for the learned model): "
        f"learned {va_results['learned']['mean_patient_dice']:.3f} (worst "
        f"{va_results['learned']['worst_patient']['dice']:.3f}), classical "
        f"{va_results['classical']['mean_patient_dice']:.3f} (worst "
        f"{va_results['classical']['worst_patient']['dice']:.3f}).",
        f"- Time per slice (sequential, reading excluded): learned {L['ms_per_slice']:.1f} ms, "
        f"classical {C['ms_per_slice']:.1f} ms.",
        f"- Training: {args.steps} steps of {args.batch} augmented slices, "
        f"{train_seconds / 60:.1f} min (checkpoint of step {best_step}); whole run "
        f"{total_seconds / 60:.1f} min.",
        *(
            f"- MedSeg {part} slices ({v['slices']}): {v['ggo']:.1%} of GGO and "
            f"{v['consolidation']:.1%} of consolidation pixels fall outside the lung field"
            + (" (trained on their lesions: optimistic)." if part == "train" else ".")
            for part, v in medseg_miss.items()
        ),
        f"- Command (from the repository root): `{command}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs); Python "
        f"{m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}; {out['date']}.",
        "",
    ]
    atomic_write_text(args.output / "lung_unet.md", "\n".join(lines))
    for part, v in medseg_miss.items():
        print(f"MedSeg {part} lesion miss: GGO {v['ggo']:.4f}, CON {v['consolidation']:.4f}")
    print(
        f"test mean per-patient Dice: learned {L['mean_patient_dice']:.4f} (worst "
        f"{L['worst_patient']['dice']:.4f}), classical {C['mean_patient_dice']:.4f} (worst "
        f"{C['worst_patient']['dice']:.4f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
