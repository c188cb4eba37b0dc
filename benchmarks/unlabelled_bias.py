"""What the unlabelled slices do to StitchNet's segmentation: lesion extent, intensity and
calibration.

Usage (from the repository root, after `accuracy.py` has left run folders of one fold and seed):
    python benchmarks/unlabelled_bias.py --dataset zenodo --protocol short+std+p1 --fold 0 \
        --runs /tmp/runs/z/zenodo/short+std+p1 [--seed 0] [--contenders stitchnet-image ...]
    python benchmarks/unlabelled_bias.py --report    # rebuild the .md from the .json

For each contender's run `<runs>/<contender>-f<k>-s<seed>` (by default labelled-only
`stitchnet-image` and `stitchnet-semi`, + unlabelled) it scores the fold's val and test slices
in inference mode with the label-free lung field, as `accuracy.py` does, and reports:
- predicted / true lesion pixels on test (pooled, original geometry; above 1:
  over-segmentation);
- test mean lesion Dice with the `prior` rule, with the rule chosen on val (what `train
  --decision auto` gave before the lesion offset), and with the rule and a lesion offset b
  chosen together on val (lesion probabilities × e^b before the argmax, b in
  `models.base.LESION_OFFSETS`, as `train --decision auto` now chooses them, here for the
  epoch the run chose without it): whether a model's lesion extent is miscalibrated in a way
  its val slices can correct;
- StitchNet: the lesion share of the lung field under the `prior` (softmax π) and `posterior`
  (r ∝ π·Beta(x)) rules; the mean lesion probability π_GGO + π_CON and r_GGO + r_CON by decile
  of the standardised intensity x inside the lung field (deciles of the first contender's
  pixels); the per-image style means E[Beta_k] and concentrations κ_k, averaged over slices.
Writes `<results>/unlabelled_bias.json` (one entry per dataset/protocol/fold/seed, merged with
earlier entries) and `.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from accuracy import DATA, DATASETS, RESULTS, fold_file  # also puts the repository on sys.path

from stitchnet_tf.models.base import LESION_OFFSETS as OFFSETS  # what `train` searches

PAIR = ("stitchnet-image", "stitchnet-semi")
DECILES = 10


def lesion_extent(scorer, model, decision: str | None) -> dict[str, float]:
    """Pooled predicted and true lesion pixels of the scorer's slices (original geometry)."""
    from stitchnet_tf.data.classes import CON, GGO, LESION, NO_LESION

    counts = {"predicted": 0, "true": 0, "overlap": 0}

    def add(_id: str, labels: np.ndarray, truth: np.ndarray) -> None:
        predicted = (labels == GGO) | (labels == CON)
        true = ((truth & LESION) > 0) & ((truth & NO_LESION) == 0)
        counts["predicted"] += int(np.count_nonzero(predicted))
        counts["true"] += int(np.count_nonzero(true))
        counts["overlap"] += int(np.count_nonzero(predicted & true))

    scorer.table(model, decision=decision, on_slice=add)
    return {
        **counts,
        "predicted_over_true": counts["predicted"] / max(counts["true"], 1),
        "pooled_lesion_dice": 2 * counts["overlap"] / max(counts["predicted"] + counts["true"], 1),
    }


def calibration(scorers: dict, model) -> dict:
    """Test mean lesion Dice with `prior`, the val-chosen rule and the val-chosen rule and
    offset (`SliceScorer.choose_calibration`, as `train` chooses them); plus the lesion extent
    of the model's own rule on test."""
    chosen = scorers["val"].choose_calibration(model)
    rule, rules = chosen["plain_decision"], list(chosen["plain"])
    test = {
        r: scorers["test"].offset_scores(model, (0.0, chosen["lesion_offset"]), decision=r)
        for r in rules
    }
    extent = lesion_extent(scorers["test"], model, getattr(model, "decision", None))
    return {
        **extent,
        "test_prior": test[rules[0]][0]["mean_lesion_dice"],
        "val_chosen_rule": rule,
        "test_val_chosen": test[rule][0]["mean_lesion_dice"],
        "val_chosen_offset": {"rule": chosen["decision"], "b": chosen["lesion_offset"]},
        "test_val_chosen_offset": test[chosen["decision"]][1]["mean_lesion_dice"],
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


def analyse(args) -> dict:
    from stitchnet_tf.data.classes import CON, GGO
    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.lung_unet import default_segmenter
    from stitchnet_tf.data.splits import Split
    from stitchnet_tf.evaluation import SliceScorer
    from stitchnet_tf.inference import load_model

    spec = DATASETS[args.dataset]
    dataset = discover(args.data / spec["folder"], require_labels=True, **spec["read"])
    split = Split.load(fold_file(args.dataset, args.fold))
    segmenter = default_segmenter()
    scorers = {
        part: SliceScorer(
            dataset.subset(getattr(split, part)), args.size, segmenter, intensity="standardise"
        )
        for part in ("val", "test")
    }
    entry: dict = {"test_slices": len(split.test), "val_slices": len(split.val), "models": {}}
    edges = None
    for contender in args.contenders:
        run = args.runs / f"{contender}-f{args.fold}-s{args.seed}"
        model = load_model(run).model
        m = {"run": str(run), **calibration(scorers, model)}
        if getattr(model, "decision", None) is not None:  # StitchNet: π, r and the styles
            px = lung_pixels(scorers["test"], model)
            if edges is None:
                edges = np.quantile(px["x"], np.linspace(0.0, 1.0, DECILES + 1))
                entry["decile_centres"] = [float(v) for v in (edges[:-1] + edges[1:]) / 2]
            m |= {
                "lesion_share_prior": float(np.isin(px["pi"].argmax(-1), (GGO, CON)).mean()),
                "lesion_share_posterior": float(np.isin(px["r"].argmax(-1), (GGO, CON)).mean()),
                **by_decile(px, edges),
                "style_mean": [float(v) for v in px["mean"].mean(0)],
                "style_kappa": [float(v) for v in px["kappa"].mean(0)],
            }
        entry["models"][contender] = m
        print(contender, json.dumps(m), flush=True)
    return entry


def mean_se(values: list[float]) -> str:
    """ "+0.012 (0.004)": the mean and its standard error (nan for one value)."""
    se = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else math.nan
    return f"{np.mean(values):+.3f} ({se:.3f})"


def summary(entries: list[dict]) -> list[str]:
    """Paired rows over `entries` (one protocol): each contender's gain from the val-chosen rule
    and offset, and + unlabelled − labelled only under each rule."""
    rows = []
    contenders = sorted({c for e in entries for c in e["models"]})
    for c in contenders:
        ms = [e["models"][c] for e in entries if c in e["models"]]
        for key, base, name in (
            ("test_val_chosen", "test_prior", "val-chosen rule − `prior`"),
            ("test_val_chosen_offset", "test_val_chosen", "+ offset − val-chosen rule"),
        ):
            rows.append(f"| {c} | {name} | {mean_se([m[key] - m[base] for m in ms])} | {len(ms)} |")
        ratio = [m["predicted_over_true"] for m in ms]
        rows.append(f"| {c} | pred/true (mean) | {np.mean(ratio):.2f} | {len(ms)} |")
    both = [e["models"] for e in entries if all(c in e["models"] for c in PAIR)]
    for key, name in (
        ("test_prior", "`prior`"),
        ("test_val_chosen", "val-chosen rule"),
        ("test_val_chosen_offset", "val-chosen rule + offset"),
    ):
        if both:
            d = [m[PAIR[1]][key] - m[PAIR[0]][key] for m in both]
            rows.append(f"| {PAIR[1]} − {PAIR[0]} | {name} | {mean_se(d)} | {len(d)} |")
    return rows


def report(out: dict) -> str:
    lines = [
        "# What the unlabelled slices do to StitchNet's segmentation",
        "",
        "Each run on its fold's test slices in inference mode with the label-free lung field. "
        "pred/true: pooled predicted over true lesion pixels with the model's own rule (above 1: "
        "over-segmentation). Test mean lesion Dice with `prior`, with the rule chosen on val "
        "(what `train --decision auto` gave before the offset) and with the rule and a lesion "
        "offset b chosen together on val (lesion probabilities × e^b before the argmax, b in "
        f"{', '.join(f'{b:g}' for b in OFFSETS)}; what `train --decision auto` now does, ties "
        "to the smaller |b|; for the epoch each run chose without it). StitchNet also: the "
        "lesion share of the "
        "lung-field pixels at the model size under `prior` (π) and `posterior` (r ∝ π·Beta(x)); "
        "the per-image style means / concentrations κ (healthy, GGO, CON); the mean lesion "
        "probability (GGO + CON) under π and r by decile of the standardised intensity inside "
        "the lung field.",
        "",
    ]
    groups: dict[str, list[dict]] = {}
    for key, e in sorted(out["entries"].items()):
        groups.setdefault(key.split(" fold ")[0], []).append(e)
    for group, entries in groups.items():
        lines += [
            f"## Summary: {group} (paired over its {len(entries)} fold × seed entries below)",
            "",
            "| contender | metric | mean (SE) | runs |",
            "|---|---|---|---|",
            *summary(entries),
            "",
        ]
    for key, e in sorted(out["entries"].items()):
        lines += [
            f"## {key} ({e['val_slices']} val / {e['test_slices']} test slices)",
            "",
            "| model | pred/true | `prior` | val-chosen rule | + offset (rule, b) "
            "| lesion share π / r | style means | κ |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, m in e["models"].items():
            chosen = m["val_chosen_offset"]
            cells = [
                name,
                f"{m['predicted_over_true']:.2f}",
                f"{m['test_prior']:.3f}",
                f"{m['test_val_chosen']:.3f} ({m['val_chosen_rule'] or '-'})",
                f"{m['test_val_chosen_offset']:.3f} ({chosen['rule'] or '-'}, {chosen['b']:g})",
            ]
            if "style_mean" in m:
                cells += [
                    f"{m['lesion_share_prior']:.3f} / {m['lesion_share_posterior']:.3f}",
                    " / ".join(f"{v:.2f}" for v in m["style_mean"][1:]),
                    " / ".join(f"{v:.1f}" for v in m["style_kappa"][1:]),
                ]
            else:
                cells += ["-", "-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
        if "decile_centres" in e:
            centres = " ".join(f"{v:.2f}" for v in e["decile_centres"])
            lines += ["", f"Intensity decile centres: {centres}", ""]
            lines += ["| model | rule | lesion probability by intensity decile |", "|---|---|---|"]
            for name, m in e["models"].items():
                if "pi_lesion" in m:
                    for rule, k in (("π", "pi_lesion"), ("r", "r_lesion")):
                        lines.append(f"| {name} | {rule} | {' '.join(f'{v:.2f}' for v in m[k])} |")
        lines += ["", f"{e['machine']['cpu']}, {e['machine']['cores']} cores; {e['date']}.", ""]
    lines += [f"Command: `python benchmarks/unlabelled_bias.py {out['command']}`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="medseg")
    parser.add_argument("--protocol", help="e.g. short+std+n10 (a label only)")
    parser.add_argument("--fold", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, help="folder with the runs")
    parser.add_argument("--contenders", nargs="+", default=list(PAIR))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="only rebuild the .md")
    args = parser.parse_args()
    path = args.results / "unlabelled_bias.json"
    if args.report:
        from stitchnet_tf.fileio import atomic_write_text

        atomic_write_text(path.with_suffix(".md"), report(json.loads(path.read_text())))
        return 0
    if args.protocol is None or args.fold is None or args.runs is None:
        parser.error("give --protocol, --fold and --runs (or --report)")
    for contender in args.contenders:
        run = args.runs / f"{contender}-f{args.fold}-s{args.seed}"
        if not run.is_dir():
            print(f"error: {run}: run folder not found", file=sys.stderr)
            return 2
    from pipeline_throughput import machine

    from stitchnet_tf.fileio import atomic_write_text

    out = json.loads(path.read_text()) if path.is_file() else {"entries": {}}
    entry = analyse(args)
    entry["machine"] = machine()
    entry["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    key = f"{args.dataset} {args.protocol} fold {args.fold} seed {args.seed}"
    before = out["entries"].get(key, {"models": {}})  # runs of the key scored earlier stay
    out["entries"][key] = before | entry | {"models": before["models"] | entry["models"]}
    out["command"] = "--dataset D --protocol P --fold K --seed S --runs DIR [--contenders ...]"
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")
    atomic_write_text(path.with_suffix(".md"), report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
