"""Automatic lung-field masks (`AutoLungMask`) against radiologist lung masks on zenodo20-lungs.

Usage (from the repository root):
    python benchmarks/lungmask_dice.py [--data ../shared/data/zenodo20-lungs] [--output DIR]

Reads every slice of the set (images/<f>.png, lungs/<f>.png 0/255, patients.csv `file,patient`),
runs `AutoLungMask()` with its defaults on each slice scaled to [0, 1] and reports the Dice per
patient (pooled over the patient's slices: 2 sum|A&B| / (sum|A| + sum|B|)), their mean and the
worst patient, the mean per-slice Dice, and the segmenter's time per slice (reading excluded).
Writes lungmask_auto.json and lungmask_auto.md to --output (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import csv
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
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "zenodo20-lungs"


def machine() -> dict:
    """A short description of this machine."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "opencv_threads": cv2.getNumThreads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "platform": platform.platform(),
    }


def read_set(data: Path) -> list[tuple[str, str]]:
    """(file, patient) for every slice, checking that the image and lung mask exist."""
    from stitchnet_tf.errors import DataError

    table = data / "patients.csv"
    for need in (data / "images", data / "lungs", table):
        if not need.exists():
            raise DataError(need, "not found (expected images/, lungs/ and patients.csv)")
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"file", "patient"} <= set(reader.fieldnames or ()):
            raise DataError(table, f"needs columns file,patient, has {reader.fieldnames}")
        rows = [(r["file"], r["patient"]) for r in reader]
    if not rows:
        raise DataError(table, "no slices listed")
    for name, _ in rows:
        for sub in ("images", "lungs"):
            if not (data / sub / name).is_file():
                raise DataError(data / sub / name, "listed in patients.csv but missing")
    return rows


def read_gray(path: Path) -> np.ndarray:
    from stitchnet_tf.errors import DataError

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise DataError(path, "cannot be read as an image")
    return img


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="zenodo20-lungs folder")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(
            f"error: {args.data}: data folder not found (the zenodo20-lungs set of the shared "
            "data; pass --data)",
            file=sys.stderr,
        )
        return 2

    sys.path.insert(0, str(ROOT))
    from stitchnet_tf.data.lungmask import AutoLungMask
    from stitchnet_tf.errors import DataError
    from stitchnet_tf.fileio import atomic_write_text

    try:
        rows = read_set(args.data)
        seg = AutoLungMask()
        inter: dict[str, int] = {}
        total: dict[str, int] = {}
        slices: dict[str, list[float]] = {}
        seconds = []
        for name, patient in rows:
            image = read_gray(args.data / "images" / name).astype(np.float32) / 255.0
            truth = read_gray(args.data / "lungs" / name) > 127
            t = time.perf_counter()
            mask = seg(image)
            seconds.append(time.perf_counter() - t)
            if mask.shape != truth.shape:
                raise DataError(args.data / "lungs" / name, "size differs from the image")
            i, s = int(np.count_nonzero(mask & truth)), int(mask.sum() + truth.sum())
            inter[patient] = inter.get(patient, 0) + i
            total[patient] = total.get(patient, 0) + s
            slices.setdefault(patient, []).append(2.0 * i / s if s else 1.0)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    per_patient = {
        p: {
            "slices": len(slices[p]),
            "dice": 2.0 * inter[p] / total[p] if total[p] else 1.0,
            "mean_slice_dice": float(np.mean(slices[p])),
            "min_slice_dice": float(np.min(slices[p])),
        }
        for p in sorted(slices)
    }
    worst = min(per_patient, key=lambda p: per_patient[p]["dice"])
    all_slices = [d for p in slices for d in slices[p]]
    ms = 1000.0 * np.asarray(seconds)
    h, w = image.shape
    out = {
        "benchmark": "lungmask_dice",
        "segmenter": type(seg).__name__,
        "config": seg.get_config(),
        "data": str(args.data),
        "slices": len(all_slices),
        "patients": len(per_patient),
        "image_size": [h, w],
        "mean_patient_dice": float(np.mean([v["dice"] for v in per_patient.values()])),
        "worst_patient": {"patient": worst, "dice": per_patient[worst]["dice"]},
        "mean_slice_dice": float(np.mean(all_slices)),
        "slices_dice_below_0.5": int(np.sum(np.asarray(all_slices) < 0.5)),
        "ms_per_slice": {"mean": float(ms.mean()), "median": float(np.median(ms))},
        "per_patient": per_patient,
        "command": " ".join(["python", "benchmarks/lungmask_dice.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }
    atomic_write_text(args.output / "lungmask_auto.json", json.dumps(out, indent=1) + "\n")

    m = out["machine"]
    lines = [
        "# Automatic lung-field mask vs radiologist lung masks (zenodo20-lungs)",
        "",
        f"`AutoLungMask()` defaults, {out['slices']} slices of {h}x{w} px, "
        f"{out['patients']} patient groups. Dice per patient is pooled over its slices.",
        "",
        "| patient | slices | Dice (pooled) | mean slice Dice | worst slice Dice |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for p, v in per_patient.items():
        lines.append(
            f"| {p} | {v['slices']} | {v['dice']:.3f} | {v['mean_slice_dice']:.3f} "
            f"| {v['min_slice_dice']:.3f} |"
        )
    lines += [
        "",
        f"- **Mean per-patient Dice: {out['mean_patient_dice']:.3f}**; worst patient "
        f"{worst}: {per_patient[worst]['dice']:.3f}.",
        f"- Mean per-slice Dice: {out['mean_slice_dice']:.3f} "
        f"({out['slices_dice_below_0.5']} slices below 0.5).",
        f"- Time per slice (segmenter only, sequential, reading excluded): "
        f"{out['ms_per_slice']['mean']:.1f} ms mean, {out['ms_per_slice']['median']:.1f} ms "
        "median.",
        f"- Command (from the repository root): `{out['command']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores (OpenCV threads {m['opencv_threads']}); "
        f"Python {m['python']}, NumPy {m['numpy']}, OpenCV {m['opencv']}; {out['date']}.",
        "",
    ]
    atomic_write_text(args.output / "lungmask_auto.md", "\n".join(lines))
    print(
        f"mean per-patient Dice {out['mean_patient_dice']:.4f}, worst {worst} "
        f"{per_patient[worst]['dice']:.4f}, mean per-slice Dice {out['mean_slice_dice']:.4f}, "
        f"{out['ms_per_slice']['mean']:.1f} ms/slice"
    )
    print(f"wrote {args.output / 'lungmask_auto.json'} and lungmask_auto.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
