"""How often the consistency term's strong view moves a lung pixel across the class cut-offs.

Usage (from the repository root; about 10 s on a 2-core CPU):
    python benchmarks/strong_view.py [--data ../shared/data] [--draws 20]

Weak-to-strong consistency (`models.consistency`) asks the student to give the strongly
augmented slice the teacher's pseudo-label of the weak slice, pixel by pixel. In CT the
intensity is what tells healthy lung, GGO and consolidation apart (the threshold rule does as
well as the models with two cut-offs). A strong view that jitters brightness, contrast and
gamma can move a pixel from one intensity class to another while its pseudo-label stays.

This script counts it, with no model: the 50 labelled MedSeg slices, prepared as the models see
them (128 px, label-free lung field, intensity standardised), each given `--draws` strong views
(`consistency.strong_intensity`, with and without the attenuation transforms, i.e.
`--consistency-strong intensity` and `texture`) and, for reference, the labelled recipe's own
intensity augmentation (`pipeline.augment_intensity`). For each, the share of lung-field pixels
whose class under a two-threshold rule (cut-offs `--low` / `--high`: by default the rule fitted
on MedSeg fold 0's standardised train slices) differs from the class of the unaugmented pixel,
overall and by the unaugmented pixel's class. Writes `results/strong_view.md` / `.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from accuracy import DATA, DATASETS, RESULTS  # also puts the repository on sys.path

CLASSES = ("healthy", "GGO", "CON")


def views(x: np.ndarray, lung: np.ndarray, draws: int) -> dict[str, list[np.ndarray]]:
    """`draws` augmented copies of x [N, S, S, 1] (lung field `lung`) per kind of view."""
    import tensorflow as tf

    from stitchnet_tf.data.pipeline import augment_intensity
    from stitchnet_tf.models.consistency import strong_intensity

    out: dict[str, list[np.ndarray]] = {
        "strong: intensity": [],
        "strong: texture": [],
        "recipe": [],
    }
    for d in range(draws):
        seed = tf.constant([d, 7])
        out["strong: intensity"].append(strong_intensity(x, lung, seed).numpy())
        out["strong: texture"].append(strong_intensity(x, lung, seed, attenuation=False).numpy())
        out["recipe"].append(
            np.stack(
                [
                    augment_intensity(
                        tf.constant(x[i]), tf.constant(lung[i]), tf.constant([d, i])
                    ).numpy()
                    for i in range(len(x))
                ]
            )
        )
    return out


def rule_classes(v: np.ndarray, low: float, high: float) -> np.ndarray:
    """0 healthy, 1 GGO, 2 CON by the two cut-offs (inside the lung field)."""
    return np.where(v < low, 0, np.where(v < high, 1, 2))


def changed(x: np.ndarray, lung: np.ndarray, copies: list[np.ndarray], low: float, high: float):
    """Share of lung pixels whose rule class changes, overall and by the original class."""

    inside = lung[..., 0] > 0.5
    before = rule_classes(x[..., 0], low, high)[inside]
    flips = np.concatenate([rule_classes(c[..., 0], low, high)[inside] != before for c in copies])
    by = np.tile(before, len(copies))
    return {
        "all": float(flips.mean()),
        **{name: float(flips[by == k].mean()) for k, name in enumerate(CLASSES)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--results", type=Path, default=RESULTS)
    rule = json.loads(
        (RESULTS / "cv" / "medseg" / "short+std" / "threshold-f0-s0.json").read_text()
    )
    parser.add_argument("--low", type=float, default=rule["low"])
    parser.add_argument("--high", type=float, default=rule["high"])
    args = parser.parse_args(argv)
    spec = DATASETS["medseg"]
    folder = args.data / spec["folder"]
    if not folder.is_dir():
        print(f"error: {folder}: not found", file=sys.stderr)
        return 2
    from pipeline_throughput import machine

    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.evaluation import SliceScorer
    from stitchnet_tf.fileio import atomic_write_text

    dataset = discover(folder, require_labels=True, **spec["read"])
    scorer = SliceScorer(dataset, args.size, intensity="standardise")
    slices = [s for chunk in scorer.batches() for s in chunk]
    x = np.stack([s.prepared.x for s in slices])[..., None].astype(np.float32)
    lung = np.stack([s.prepared.lung for s in slices])[..., None].astype(np.float32)
    x = x * (lung > 0.5)
    inside = lung[..., 0] > 0.5
    before = rule_classes(x[..., 0], args.low, args.high)[inside]
    share = {name: float(np.mean(before == k)) for k, name in enumerate(CLASSES)}
    rows = {
        kind: changed(x, lung, copies, args.low, args.high)
        for kind, copies in views(x, lung, args.draws).items()
    }
    out = {
        "slices": len(slices),
        "size": args.size,
        "draws": args.draws,
        "low": args.low,
        "high": args.high,
        "class_share": share,
        "changed": rows,
        "machine": machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    lines = [
        "# How often a view moves a lung pixel across the class cut-offs "
        "(benchmarks/strong_view.py)",
        "",
        f"{len(slices)} labelled MedSeg slices at {args.size} px, label-free lung field, intensity "
        f"standardised; a two-threshold rule with cut-offs {args.low:g} / {args.high:g} (MedSeg "
        f"fold 0's standardised rule) classes each lung pixel healthy / GGO / CON before and after "
        f"the view; {args.draws} draws a slice. Share of the lung pixels whose class changes "
        "(by the unaugmented pixel's class: "
        + ", ".join(f"{n} {100 * v:.1f}% of the lung" for n, v in share.items())
        + ").",
        "",
        "| view | all lung pixels | healthy | GGO | CON |",
        "|---|---|---|---|---|",
        *(
            f"| {kind} | {100 * r['all']:.1f}% | "
            + " | ".join(f"{100 * r[c]:.1f}%" for c in CLASSES)
            + " |"
            for kind, r in rows.items()
        ),
        "",
        "`strong: intensity`: `consistency.strong_intensity` as `--consistency-strong intensity` "
        "(brightness ×0.7–1.3, contrast ×0.7–1.3, gamma 0.6–1.6, noise σ ≤ 0.04, blur on half); "
        "`strong: texture`: the same without brightness, contrast and gamma; `recipe`: the "
        "labelled slices' `pipeline.augment_intensity` (each transform with probability "
        "0.1–0.3).",
        "",
        f"Machine: {json.dumps(out['machine'])}; {out['date']}.",
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "strong_view.json", json.dumps(out, indent=1) + "\n")
    atomic_write_text(args.results / "strong_view.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
