"""What the unlabelled slices do to StitchNet's segmentation: lesion extent and intensity.

Usage (from the repository root, after `accuracy.py` has left labelled-only and semi run folders
of the same fold and seed):
    python benchmarks/unlabelled_bias.py --dataset zenodo --protocol short+std+p1 --fold 0 \
        --runs /tmp/runs/z/zenodo/short+std+p1 [--seed 0] [--every 2]

For each pair `stitchnet-image-f<k>-s<seed>` (labelled only) and `stitchnet-semi-f<k>-s<seed>`
(+ unlabelled) under `--runs` it scores the fold's test slices in inference mode with the
label-free lung field, as `accuracy.py` does, and reports:
- predicted / true lesion pixels (pooled, original geometry; above 1: over-segmentation);
- the lesion share of the lung field under the `prior` (softmax π) and `posterior`
  (r ∝ π·Beta(x)) rules;
- the mean lesion probability π_GGO + π_CON and r_GGO + r_CON by decile of the standardised
  intensity x inside the lung field (deciles of the labelled-only model's pixels);
- the per-image style means E[Beta_k] and concentrations κ_k, averaged over slices.
Writes `<results>/unlabelled_bias.json` (one entry per protocol/fold/seed, merged with earlier
entries) and `.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from accuracy import DATA, DATASETS, RESULTS, fold_file  # also puts the repository on sys.path

PAIR = ("stitchnet-image", "stitchnet-semi")
DECILES = 10


def lesion_extent(scorer, model) -> dict[str, float]:
    """Pooled predicted and true lesion pixels of the scorer's slices (original geometry)."""
    from stitchnet_tf.data.classes import CON, GGO, LESION, NO_LESION

    counts = {"predicted": 0, "true": 0, "overlap": 0}

    def add(_id: str, labels: np.ndarray, truth: np.ndarray) -> None:
        predicted = (labels == GGO) | (labels == CON)
        true = ((truth & LESION) > 0) & ((truth & NO_LESION) == 0)
        counts["predicted"] += int(np.count_nonzero(predicted))
        counts["true"] += int(np.count_nonzero(true))
        counts["overlap"] += int(np.count_nonzero(predicted & true))

    scorer.table(model, on_slice=add)
    return {
        **counts,
        "predicted_over_true": counts["predicted"] / max(counts["true"], 1),
        "pooled_lesion_dice": 2 * counts["overlap"] / max(counts["predicted"] + counts["true"], 1),
    }


def lung_pixels(scorer, model) -> dict[str, np.ndarray]:
    """x, π and r [N, 4] of every lung-field pixel at the model size; style means/κ [S, 4]."""
    out: dict[str, list] = {"x": [], "pi": [], "r": [], "mean": [], "kappa": []}
    for chunk in scorer.batches():
        x = np.stack([s.prepared.x for s in chunk])[..., None].astype(np.float32)
        lung = np.stack([s.prepared.lung for s in chunk])[..., None].astype(np.float32)
        outputs = model.infer(x)
        pi = np.asarray(model.class_probabilities(x, outputs, lung, "prior"))
        r = np.asarray(model.class_probabilities(x, outputs, lung, "posterior"))
        alpha, beta = np.asarray(outputs["alpha"]), np.asarray(outputs["beta"])
        inside = lung[..., 0] > 0.5
        out["x"].append(x[..., 0][inside])
        out["pi"].append(pi[inside])
        out["r"].append(r[inside])
        out["mean"].append((alpha / (alpha + beta)).reshape(len(chunk), -1, 4).mean(1))
        out["kappa"].append((alpha + beta).reshape(len(chunk), -1, 4).mean(1))
    return {k: np.concatenate(v) for k, v in out.items()}


def by_decile(px: dict[str, np.ndarray], edges: np.ndarray) -> dict[str, list[float]]:
    """Mean lesion probability under π and r in each intensity decile."""
    from stitchnet_tf.data.classes import CON, GGO

    b = np.clip(np.searchsorted(edges, px["x"], side="right") - 1, 0, DECILES - 1)
    rows: dict[str, list[float]] = {"pi_lesion": [], "r_lesion": []}
    for i in range(DECILES):
        sel = b == i
        for key, p in (("pi_lesion", px["pi"]), ("r_lesion", px["r"])):
            rows[key].append(float(p[sel][:, [GGO, CON]].sum(-1).mean()) if sel.any() else 0.0)
    return rows


def analyse(args, seed: int) -> dict:
    from stitchnet_tf.data.classes import CON, GGO
    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.lung_unet import default_segmenter
    from stitchnet_tf.data.splits import Split
    from stitchnet_tf.evaluation import SliceScorer
    from stitchnet_tf.inference import load_model

    spec = DATASETS[args.dataset]
    dataset = discover(args.data / spec["folder"], require_labels=True, **spec["read"])
    split = Split.load(fold_file(args.dataset, args.fold))
    test = sorted(split.test)[:: args.every]
    scorer = SliceScorer(
        dataset.subset(test), args.size, default_segmenter(), intensity="standardise"
    )
    entry: dict = {"test_slices": len(test), "models": {}}
    edges = None
    for contender in PAIR:
        run = args.runs / f"{contender}-f{args.fold}-s{seed}"
        model = load_model(run).model
        px = lung_pixels(scorer, model)
        if edges is None:
            edges = np.quantile(px["x"], np.linspace(0.0, 1.0, DECILES + 1))
            entry["decile_centres"] = [float(v) for v in (edges[:-1] + edges[1:]) / 2]
        entry["models"][contender] = {
            "run": str(run),
            **lesion_extent(scorer, model),
            "lesion_share_prior": float(np.isin(px["pi"].argmax(-1), (GGO, CON)).mean()),
            "lesion_share_posterior": float(np.isin(px["r"].argmax(-1), (GGO, CON)).mean()),
            **by_decile(px, edges),
            "style_mean": [float(v) for v in px["mean"].mean(0)],
            "style_kappa": [float(v) for v in px["kappa"].mean(0)],
        }
        print(contender, json.dumps(entry["models"][contender]), flush=True)
    return entry


def report(out: dict) -> str:
    lines = [
        "# What the unlabelled slices do to StitchNet's segmentation",
        "",
        "Labelled-only StitchNet (`stitchnet-image`) against StitchNet + unlabelled "
        "(`stitchnet-semi`), same fold and seed, on the fold's test slices in inference mode with "
        "the label-free lung field. pred/true: pooled predicted over true lesion pixels (above 1: "
        "over-segmentation). Lesion share: of the lung-field pixels at the model size, under the "
        "`prior` (π) and `posterior` (r ∝ π·Beta(x)) rules. Then the mean lesion probability "
        "(GGO + CON) under π and r by decile of the standardised intensity inside the lung field, "
        "and the per-image style means / concentrations κ (healthy, GGO, CON).",
        "",
    ]
    for key, e in sorted(out["entries"].items()):
        centres = " ".join(f"{v:.2f}" for v in e["decile_centres"])
        lines += [
            f"## {key} ({e['test_slices']} test slices)",
            "",
            "| model | pred/true | pooled lesion Dice | lesion share prior / posterior "
            "| style means | κ |",
            "|---|---|---|---|---|---|",
        ]
        for name, m in e["models"].items():
            means = " / ".join(f"{v:.2f}" for v in m["style_mean"][1:])
            kappa = " / ".join(f"{v:.1f}" for v in m["style_kappa"][1:])
            lines.append(
                f"| {name} | {m['predicted_over_true']:.2f} | {m['pooled_lesion_dice']:.3f} | "
                f"{m['lesion_share_prior']:.3f} / {m['lesion_share_posterior']:.3f} | "
                f"{means} | {kappa} |"
            )
        lines += ["", f"Intensity decile centres: {centres}", ""]
        lines += ["| model | rule | lesion probability by intensity decile |", "|---|---|---|"]
        for name, m in e["models"].items():
            for rule, k in (("π", "pi_lesion"), ("r", "r_lesion")):
                lines.append(f"| {name} | {rule} | {' '.join(f'{v:.2f}' for v in m[k])} |")
        lines += ["", f"{e['machine']['cpu']}, {e['machine']['cores']} cores; {e['date']}.", ""]
    lines += [f"Command: `python benchmarks/unlabelled_bias.py {out['command']}`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="medseg")
    parser.add_argument("--protocol", required=True, help="e.g. short+std+n10 (a label only)")
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, required=True, help="folder with the run pair")
    parser.add_argument("--every", type=int, default=1, help="score every n-th test slice")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    for contender in PAIR:
        run = args.runs / f"{contender}-f{args.fold}-s{args.seed}"
        if not run.is_dir():
            print(f"error: {run}: run folder not found", file=sys.stderr)
            return 2
    from pipeline_throughput import machine

    from stitchnet_tf.fileio import atomic_write_text

    path = args.results / "unlabelled_bias.json"
    out = json.loads(path.read_text()) if path.is_file() else {"entries": {}}
    entry = analyse(args, args.seed)
    entry["machine"] = machine()
    entry["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out["entries"][f"{args.dataset} {args.protocol} fold {args.fold} seed {args.seed}"] = entry
    out["command"] = "--dataset D --protocol P --fold K --seed S --runs DIR [--every N]"
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")
    atomic_write_text(path.with_suffix(".md"), report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
