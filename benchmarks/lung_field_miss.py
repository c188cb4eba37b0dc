"""How much lesion the lung field loses: MedSeg GGO / consolidation pixels outside it.

Usage (from the repository root; a few minutes on a 2-core CPU):
    python benchmarks/lung_field_miss.py [--data ../shared/data] [--model M] [--folds DIR]
        [--baseline MODEL] [--output DIR]

Scores lung models through `LearnedLungMask` (the package's post-processing) on the 50
labelled MedSeg slices and on the held-out zenodo20 test patients of the shipped model's split:
- the shipped model (`saved_models/lung_unet/lung_unet.keras`, or `--model M`) on all 50
  slices (if it was trained on their lesions, `--medseg` of `train_lung_unet.py`, this is a
  training-set figure);
- with `--folds DIR`, each cross-validation fold's own model `DIR/medseg_cv5_fold<k>.keras`
  (trained with `--medseg-exclude benchmarks/splits/medseg_cv5_fold<k>.json`) on that fold's
  10 test slices, pooled over the five folds: the honest estimate of the miss on unseen slices;
- optionally `--baseline MODEL` (e.g. the previous shipped model) on all 50 slices.
Miss = pooled share of the class's pixels outside the field. Writes lung_field_miss.json / .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def medseg(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(id, image [H, W] in [0, 1], class indices [H, W]) of the labelled MedSeg slices."""
    from stitchnet_tf.data.io import read_image, read_mask

    return [
        (f"images/{p.name}", read_image(p), read_mask(folder / "masks" / f"{p.stem}.png"))
        for p in sorted((folder / "images").glob("*.jpg"))
    ]


def miss(segmenter, slices) -> dict:
    """Pooled GGO / consolidation miss, and the worst slice's consolidation miss."""
    counts = {1: [0, 0], 2: [0, 0]}
    worst = (0.0, None)
    for sid, image, y in slices:
        field = segmenter(image)
        for c in (1, 2):
            out = int(np.count_nonzero((y == c) & ~field))
            counts[c][0] += out
            counts[c][1] += int(np.count_nonzero(y == c))
        con = int(np.count_nonzero(y == 2))
        if con and np.count_nonzero((y == 2) & ~field) / con > worst[0]:
            worst = (np.count_nonzero((y == 2) & ~field) / con, sid)
    return {
        "slices": len(slices),
        "ggo_miss": counts[1][0] / max(counts[1][1], 1),
        "consolidation_miss": counts[2][0] / max(counts[2][1], 1),
        "ggo_pixels": counts[1][1],
        "consolidation_pixels": counts[2][1],
        "worst_slice": {"id": worst[1], "consolidation_miss": float(worst[0])},
    }


def zenodo_dice(segmenter, data: Path, split: dict) -> float:
    """Mean per-patient pooled lung Dice on the zenodo20 test patients of `split`."""
    import csv

    import cv2

    with open(data / "patients.csv", newline="", encoding="utf-8") as f:
        patient = {r["file"]: r["patient"] for r in csv.DictReader(f)}
    inter: dict[str, int] = {}
    total: dict[str, int] = {}
    for name, p in patient.items():
        if p not in split["patients"]["test"]:
            continue
        image = cv2.imread(str(data / "images" / name), cv2.IMREAD_GRAYSCALE) / 255.0
        truth = cv2.imread(str(data / "lungs" / name), cv2.IMREAD_GRAYSCALE) > 127
        field = segmenter(image.astype(np.float32))
        inter[p] = inter.get(p, 0) + int(np.count_nonzero(field & truth))
        total[p] = total.get(p, 0) + int(np.count_nonzero(field) + np.count_nonzero(truth))
    return float(np.mean([2.0 * inter[p] / total[p] for p in inter]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--folds", type=Path, default=None, help="per-fold lung models")
    parser.add_argument("--baseline", type=Path, default=None, help="another model to compare")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    labelled = args.data / "medseg-covid" / "labelled"
    zenodo = args.data / "zenodo20-lungs"
    if not labelled.is_dir() or not zenodo.is_dir():
        print(f"error: {args.data}: MedSeg or zenodo20 folder not found", file=sys.stderr)
        return 2
    from pipeline_throughput import machine

    from stitchnet_tf.data.lung_unet import DEFAULT_MODEL, LearnedLungMask
    from stitchnet_tf.fileio import atomic_write_text

    slices = medseg(labelled)
    # the zenodo20 test patients of the shipped model's split (the fine-tuned models keep it)
    split = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())["split"]
    out: dict = {"benchmark": "lung_field_miss", "models": {}}
    named = [("shipped" if args.model is None else "model", args.model or DEFAULT_MODEL)]
    if args.baseline is not None:
        named.append(("baseline", args.baseline))
    for name, path in named:
        seg = LearnedLungMask(path)
        out["models"][name] = {"model": str(path), "all_50": miss(seg, slices)}
        out["models"][name]["zenodo_test_dice"] = zenodo_dice(seg, zenodo, split)
        print(name, json.dumps(out["models"][name]), flush=True)
    if args.folds is not None:
        held, per_fold = [], []
        for k in range(5):
            fold = json.loads((ROOT / f"benchmarks/splits/medseg_cv5_fold{k}.json").read_text())
            test = set(fold["test"])
            seg = LearnedLungMask(args.folds / f"medseg_cv5_fold{k}.keras")
            part = [s for s in slices if s[0] in test]
            held += [(sid, seg(img), y) for sid, img, y in part]
            per_fold.append(miss(seg, part) | {"zenodo_test_dice": zenodo_dice(seg, zenodo, split)})
        pooled = miss(lambda field: field, [(sid, f, y) for sid, f, y in held])
        out["cross_validated"] = {"pooled": pooled, "folds": per_fold}
        print("cross-validated", json.dumps(pooled), flush=True)
    out["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out["machine"] = machine()
    atomic_write_text(args.output / "lung_field_miss.json", json.dumps(out, indent=1) + "\n")

    lines = [
        "# Lesion pixels outside the lung field (MedSeg labelled slices)",
        "",
        "Pooled share of GGO / consolidation pixels that the lung field (`LearnedLungMask`, "
        "threshold 0.5, components cleaned) leaves out; zenodo20: mean per-patient lung Dice on "
        f"the held-out test patients {', '.join(split['patients']['test'])}.",
        "",
        "| model | slices | GGO miss | CON miss | worst slice CON miss | zenodo lung Dice |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, v in out["models"].items():
        m = v["all_50"]
        lines.append(
            f"| {name} (`{Path(v['model']).name}`), all 50 | {m['slices']} | {m['ggo_miss']:.1%} "
            f"| {m['consolidation_miss']:.1%} | {m['worst_slice']['consolidation_miss']:.1%} "
            f"| {v['zenodo_test_dice']:.4f} |"
        )
    if "cross_validated" in out:
        cv = out["cross_validated"]
        for k, f in enumerate(cv["folds"]):
            lines.append(
                f"| fold {k} model, its 10 test slices | {f['slices']} | {f['ggo_miss']:.1%} | "
                f"{f['consolidation_miss']:.1%} | {f['worst_slice']['consolidation_miss']:.1%} "
                f"| {f['zenodo_test_dice']:.4f} |"
            )
        p = cv["pooled"]
        lines.append(
            f"| **cross-validated (each slice by the model that did not train on it)** | "
            f"{p['slices']} | **{p['ggo_miss']:.1%}** | **{p['consolidation_miss']:.1%}** | "
            f"{p['worst_slice']['consolidation_miss']:.1%} | |"
        )
    m = out["machine"]
    lines += [
        "",
        f"Command: `python benchmarks/lung_field_miss.py {' '.join(sys.argv[1:])}`; "
        f"{m['cpu']}, {m['cores']} cores; {out['date']}.",
        "",
    ]
    atomic_write_text(args.output / "lung_field_miss.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
