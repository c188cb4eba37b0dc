"""How good the consistency term's pseudo-labels are, on slices whose labels were withheld.

Usage (from the repository root, after `accuracy.py --labelled N` has left run folders):
    python benchmarks/pseudo_labels.py --runs /tmp/runs/ucons/medseg/short+std+n10 \
        [--contenders unet-cons] [--threshold 0.95]

A `--labelled N` run treats the fold's other train slices as unlabelled (the split's
`unlabelled` ids), but their MedSeg labels exist. Each run's chosen model (best.keras) scores
them in inference mode at the model size with the label-free lung field; where its highest
healthy / GGO / CON probability (renormalised over the three) reaches `--threshold`, the pixel
would get a pseudo-label (a run trained with class-balanced thresholds, `--consistency-balance`,
uses its own running per-class thresholds, capped at `--threshold`). Reported per run and
pooled over the runs: the share of lung-field pixels that are confident, the share of each
class among the confident pseudo-labels, their accuracy against the truth (pixels with one
known class), overall and by pseudo-label class, and the share of true GGO and CON pixels
confidently called healthy. The teacher during training is an earlier state of the model in
training mode: this measures the end of the run, not every step. Runs still training are
skipped (`Run.finished`).
Writes `results/pseudo_labels.md` / `.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from accuracy import DATA, DATASETS, RESULTS  # also puts the repository on sys.path

NAMES = ("healthy", "GGO", "CON")


def counts(probabilities: np.ndarray, allowed: np.ndarray, lung: np.ndarray, threshold):
    """Pixel counts of one slice: probabilities [S,S,4], allowed bits [S,S], lung [S,S] bool,
    threshold a scalar or one per class [3] (healthy, GGO, CON).
    Returns {"lung", "confident", "known_confident", "correct", "by_label": [[correct, n]] x3,
    "lesion_as_healthy": [[called healthy, n]] for GGO, CON}."""
    from stitchnet_tf.data.classes import CON, GGO, HEALTHY, bits

    p = probabilities[..., 1:] / np.maximum(probabilities[..., 1:].sum(-1, keepdims=True), 1e-9)
    label = p.argmax(-1)  # 0 healthy, 1 GGO, 2 CON
    confident = (p.max(-1) >= np.broadcast_to(threshold, (3,))[label]) & lung
    truth = np.full(allowed.shape, -1)
    for k, c in enumerate((HEALTHY, GGO, CON)):
        truth[allowed == bits(c)] = k
    known = confident & (truth >= 0)
    right = known & (label == truth)
    return {
        "lung": int(lung.sum()),
        "confident": int(confident.sum()),
        "known_confident": int(known.sum()),
        "correct": int(right.sum()),
        "by_label": [
            [int((right & (label == k)).sum()), int((known & (label == k)).sum())] for k in range(3)
        ],
        "lesion_as_healthy": [
            [int((confident & (truth == k) & (label == 0)).sum()), int((lung & (truth == k)).sum())]
            for k in (1, 2)
        ],
    }


def add(a: dict, b: dict) -> dict:
    """Element-wise sum of two `counts` results."""
    return {k: (np.asarray(a[k]) + np.asarray(b[k])).tolist() for k in a}


def shares(c: dict) -> dict:
    def ratio(n, d):
        return n / d if d else None

    return {
        "confident_share": ratio(c["confident"], c["lung"]),
        "accuracy": ratio(c["correct"], c["known_confident"]),
        **{f"precision_{n}": ratio(*c["by_label"][k]) for k, n in enumerate(NAMES)},
        "label_share": [ratio(c["by_label"][k][1], c["known_confident"]) for k in range(3)],
        "ggo_called_healthy": ratio(*c["lesion_as_healthy"][0]),
        "con_called_healthy": ratio(*c["lesion_as_healthy"][1]),
        "true_ggo_share": ratio(c["lesion_as_healthy"][0][1], c["lung"]),
        "true_con_share": ratio(c["lesion_as_healthy"][1][1], c["lung"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of run folders")
    parser.add_argument("--contenders", nargs="+", default=["unet-cons"])
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    spec = DATASETS["medseg"]
    if not (args.data / spec["folder"]).is_dir():
        print(f"error: {args.data / spec['folder']}: not found", file=sys.stderr)
        return 2
    from pipeline_throughput import machine

    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.lung_unet import default_segmenter
    from stitchnet_tf.data.preprocess import prepare, read_sample
    from stitchnet_tf.fileio import atomic_write_text
    from stitchnet_tf.inference import load_model
    from stitchnet_tf.run import Run

    dataset = discover(args.data / spec["folder"], require_labels=True, **spec["read"])
    by_id = {s.id: s for s in dataset.samples}
    segmenter = default_segmenter()
    prepared: dict = {}  # sample id -> `Prepared`: runs of one fold share their withheld slices

    def prepared_slice(sample_id: str):
        if sample_id not in prepared:
            raw = read_sample(by_id[sample_id], dataset.mask_map)
            prepared[sample_id] = prepare(
                raw, args.size, segmenter, use_labels=False, intensity="standardise"
            )
        return prepared[sample_id]

    runs, pooled = {}, {}
    for contender in args.contenders:
        for run in sorted(args.runs.glob(f"{contender}-f*-s*")):
            if not Run(run).finished():
                continue
            model = load_model(run).model
            threshold = args.threshold
            running = getattr(getattr(model, "consistency", None), "class_thresholds", None)
            if running is not None:
                threshold = np.minimum(running.numpy(), threshold)
            withheld = json.loads((run / "split.json").read_text())["unlabelled"]
            total = None
            for sample_id in withheld:
                p = prepared_slice(sample_id)
                x, lung = p.x[None, ..., None], p.lung[None, ..., None].astype(np.float32)
                probs = np.asarray(model.segmentation_probabilities(x, lung))[0]
                c = counts(probs, p.allowed, p.lung.astype(bool), threshold)
                total = c if total is None else add(total, c)
            runs[run.name] = {"slices": len(withheld), "counts": total, **shares(total)}
            runs[run.name]["thresholds"] = np.broadcast_to(threshold, (3,)).round(4).tolist()
            pooled[contender] = total if contender not in pooled else add(pooled[contender], total)
            print(run.name, json.dumps(shares(total)), flush=True)
    if not runs:
        print(f"error: {args.runs}: no finished run folders of {args.contenders}", file=sys.stderr)
        return 2
    out = {
        "threshold": args.threshold,
        "size": args.size,
        "runs": runs,
        "pooled": {c: shares(total) for c, total in pooled.items()},
        "machine": machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    rows = [*runs.items(), *((f"pooled: {c}", r) for c, r in out["pooled"].items())]
    lines = [
        "# The consistency term's pseudo-labels on the withheld slices "
        "(benchmarks/pseudo_labels.py)",
        "",
        f"Each run's chosen model on its fold's withheld train slices (labels hidden from the run, "
        f"known here), inference mode, {args.size} px, label-free lung field; confident: the "
        f"largest healthy / GGO / CON probability ≥ {args.threshold}. Accuracy against pixels of "
        "one known class.",
        "",
        "| run | confident (of lung) | pseudo-labels healthy / GGO / CON | accuracy | "
        "healthy right | GGO right | CON right | GGO called healthy | CON called healthy |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {pct(r['confident_share'])} | "
            + " / ".join(pct(v) for v in r["label_share"])
            + f" | {pct(r['accuracy'])} | "
            f"{pct(r['precision_healthy'])} | {pct(r['precision_GGO'])} | "
            f"{pct(r['precision_CON'])} | {pct(r['ggo_called_healthy'])} | "
            f"{pct(r['con_called_healthy'])} |"
            for name, r in rows
        ),
        "",
        "For comparison, the truth: "
        + "; ".join(
            f"{c}'s slices GGO {pct(r['true_ggo_share'])}, CON {pct(r['true_con_share'])}"
            for c, r in out["pooled"].items()
        )
        + " of the lung-field pixels (pooled).",
        "",
        f"Machine: {json.dumps(out['machine'])}; {out['date']}.",
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "pseudo_labels.json", json.dumps(out, indent=1) + "\n")
    atomic_write_text(args.results / "pseudo_labels.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
