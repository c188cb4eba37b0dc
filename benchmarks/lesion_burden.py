"""Does the lesion burden of a run's labelled slices explain its unlabelled gain?

Usage (from the repository root; a minute or two, no training):
    python benchmarks/lesion_burden.py [--data ../shared/data] [--protocol short+std+p1]
    python benchmarks/lesion_burden.py --dataset medseg --protocol short+std+n10

For every (fold, seed) run of a label-efficiency protocol in results/cv/<dataset>/ it finds
the labelled train slices the seed picked (zenodo20 `--labelled-patients N`:
`withhold_patients`; MedSeg `--labelled N`: `withhold_labels`, as `accuracy.py` does) and
measures the lesion burden, lesion pixels / lung pixels at full resolution, of the labelled,
val and test slices. zenodo20's lung pixels are its radiologists' lung masks; MedSeg has none,
so there they are the shipped lung field joined with the lesion mask (a different ruler). It
then joins the committed scores of each contender (`prior`, i.e. as trained, and as shipped,
i.e. rule and lesion offset chosen on val; runs without the latter count only for `prior`),
splits the runs by the labelled burden at --split (a cut chosen after looking at the zenodo20
one-patient burdens) and gives the rank correlation of labelled burden with the unlabelled
gain. Writes benchmarks/results/lesion_burden_<p|n><N>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import stats  # noqa: E402

CONTENDERS = ("threshold", "unet", "stitchnet-image", "stitchnet-semi")
#: dataset -> (folder, `discover` options, protocol suffix of its label-efficiency runs)
DATA = {
    "zenodo": ("zenodo20-lungs", {"mask_values": "binary", "masks_subdir": "infection"}, "+p"),
    "medseg": ("medseg-covid/labelled", {}, "+n"),
}


def burden(ids, lesion: dict, lung: dict) -> float:
    """Pooled lesion pixels / lung pixels over the slices `ids`."""
    return sum(lesion[i] for i in ids) / max(sum(lung[i] for i in ids), 1)


def pixel_counts(dataset) -> tuple[dict, dict]:
    """{slice id: lesion pixels}, {slice id: lung pixels}: the lung mask file where the
    dataset has one, else the shipped lung field of the image joined with the lesion mask."""
    from stitchnet_tf.data.io import read_image, read_lung, read_mask
    from stitchnet_tf.data.lung_unet import default_segmenter

    lesion, lung, unmasked = {}, {}, []
    for s in dataset.samples:
        mask = read_mask(s.mask, s.slice) > 0
        lesion[s.id] = int(mask.sum())
        if s.lung is not None:
            lung[s.id] = int((read_lung(s.lung, s.slice) > 0).sum())
        else:
            unmasked.append((s, mask))
    if unmasked:  # one batched pass of the lung model
        images = [read_image(s.image, s.slice) for s, _ in unmasked]
        fields = default_segmenter().predict_batch(images)
        for (s, mask), field in zip(unmasked, fields, strict=True):
            lung[s.id] = int((field | mask).sum())
    return lesion, lung


def scores(folder: Path) -> dict:
    """{(contender, fold, seed): (prior, as shipped)} mean lesion Dice from committed results;
    as shipped is None for a learned model whose run was never scored with the val-chosen rule
    and offset (the rule has no such variant: its two scores are the same)."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        prior = r["mean_lesion_dice"]
        shipped = prior if r["contender"] == "threshold" else None
        shipped = r.get("calibrated", {}).get("mean_lesion_dice", shipped)
        out[r["contender"], r["fold"], r["seed"]] = (prior, shipped)
    return out


def rank_correlation(x: list[float], y: list[float]) -> tuple[float, float] | None:
    """Spearman's rho and its two-sided p-value (None with fewer than 4 pairs)."""
    from scipy.stats import spearmanr

    if len(x) < 4:
        return None
    r = spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


def paired(rows: list[dict], base: str, c: str, k: int) -> list[tuple[dict, float]]:
    """(row, score of `c` - score of `base`) for the rows where both have score k
    (0: `prior`, 1: as shipped)."""
    return [
        (r, r[c][k] - r[base][k])
        for r in rows
        if all(m in r and r[m][k] is not None for m in (base, c))
    ]


def mean_se(values: list[float]) -> tuple[float, float]:
    s = stats(values)
    return s["mean"], s["sem"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--dataset", choices=sorted(DATA), default="zenodo")
    parser.add_argument("--protocol", default="short+std+p1")
    parser.add_argument("--split", type=float, default=0.1, help="low / high burden cut")
    parser.add_argument(
        "--test-seeds", type=int, nargs="*", default=[2], help="seeds kept out of low / high"
    )
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.splits import Split, withhold_labels, withhold_patients

    subdir, options, mark = DATA[args.dataset]
    folder = args.data / subdir
    if not folder.is_dir():
        raise SystemExit(f"error: {folder}: no such folder (the {args.dataset} data)")
    suffix = args.protocol.rsplit(mark, 1)[-1]
    if mark not in args.protocol or not suffix.isdigit():
        kind = "--labelled-patients" if mark == "+p" else "--labelled"
        raise SystemExit(f"error: --protocol {args.protocol}: not a {args.dataset} {kind} protocol")
    n = int(suffix)
    results = args.results / "cv" / args.dataset / args.protocol
    table = scores(results)
    if not table:
        raise SystemExit(f"error: {results}: no results")
    dataset = discover(folder, require_labels=True, **options)
    lesion, lung = pixel_counts(dataset)
    patient = {s.id: s.patient for s in dataset.samples}
    withhold = withhold_patients if mark == "+p" else withhold_labels
    runs = []
    for fold, seed in sorted({(f, s) for _, f, s in table}):
        split = Split.load(ROOT / "benchmarks" / "splits" / f"{args.dataset}_cv5_fold{fold}.json")
        withheld = set(withhold(split, dataset, n, seed=seed).unlabelled)
        labelled = [i for i in split.train if i not in withheld]
        row = {
            "fold": fold,
            "seed": seed,
            "labelled_patients": sorted({str(patient[i]) for i in labelled}),
            "labelled_slices": len(labelled),
            "burden_labelled": burden(labelled, lesion, lung),
            "burden_val": burden(split.val, lesion, lung),
            "burden_test": burden(split.test, lesion, lung),
        }
        if mark == "+n":  # MedSeg slices have no patient: list them
            row["labelled"] = sorted(labelled)
        for c in CONTENDERS:
            if (c, fold, seed) in table:
                row[c] = table[c, fold, seed]
        runs.append(row)

    groups = {}
    test = set(args.test_seeds)
    for name, keep in (
        ("low", lambda r: r["seed"] not in test and r["burden_labelled"] < args.split),
        ("high", lambda r: r["seed"] not in test and r["burden_labelled"] >= args.split),
        (f"seeds {sorted(test)} (registered test)", lambda r: r["seed"] in test),
    ):
        rows = [r for r in runs if keep(r)]
        if not rows:
            continue
        g = {"runs": len(rows)}
        for k, tag in enumerate(("prior", "shipped")):
            pairs = [("threshold", c) for c in CONTENDERS[1:]]
            pairs.append(("stitchnet-image", "stitchnet-semi"))
            for base, c in pairs:
                diffs = [d for _, d in paired(rows, base, c, k)]
                key = f"gain, {tag}" if base != "threshold" else f"{c} - rule, {tag}"
                if diffs:
                    g[key] = mean_se(diffs)
                    g[key + " runs"] = len(diffs)
        groups[name] = g

    correlation = {}
    for k, tag in enumerate(("prior", "shipped")):
        both = paired(runs, "stitchnet-image", "stitchnet-semi", k)
        rho = rank_correlation([r["burden_labelled"] for r, _ in both], [d for _, d in both])
        correlation[tag] = {
            "rho": None if rho is None else rho[0],
            "p": None if rho is None else rho[1],
            "runs": len(both),
        }

    out = {
        "protocol": args.protocol,
        "split": args.split,
        "runs": runs,
        "groups": groups,
        "burden_gain_rank_correlation": correlation,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    stem = f"lesion_burden_{mark[1]}{n}"
    (args.results / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        f"# Lesion burden of the labelled slices, {args.dataset} `{args.protocol}`",
        "",
        "Burden = lesion pixels / "
        + (
            "radiologist lung pixels"
            if mark == "+p"
            else "(shipped lung field | lesion mask) pixels"
        )
        + " (full resolution, pooled over slices).",
        "Scores: mean lesion Dice `prior` / as shipped (rule and offset chosen on val).",
        "",
        "| fold | seed | labelled (slices) | burden labelled / val / test | rule | U-Net "
        "| StitchNet labelled only | StitchNet + unlabelled |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    def who(r: dict) -> str:  # MedSeg slices carry no patient id worth printing
        return ", ".join(r["labelled_patients"]) if mark == "+p" else "slices"

    for r in runs:
        cells = [" / ".join(cell(v) for v in r[c]) if c in r else "-" for c in CONTENDERS]
        cells[0] = f"{r['threshold'][0]:.3f}" if "threshold" in r else "-"
        lines.append(
            f"| {r['fold']} | {r['seed']} | {who(r)} ({r['labelled_slices']}) | "
            f"{r['burden_labelled']:.3f} / {r['burden_val']:.3f} / "
            f"{r['burden_test']:.3f} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        f"Runs split at labelled burden {args.split}, the test seeds apart "
        "(mean (SE, runs) over runs):",
        "",
    ]
    lines += ["| quantity | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    keys = []
    for g in groups.values():
        keys += [k for k in g if k != "runs" and not k.endswith(" runs") and k not in keys]
    lines.append("| runs | " + " | ".join(str(g["runs"]) for g in groups.values()) + " |")
    for k in keys:
        cells = [
            f"{g[k][0]:+.3f} ({g[k][1]:.3f}, {g[k + ' runs']})" if k in g else "-"
            for g in groups.values()
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Spearman rank correlation of the labelled burden with the unlabelled gain, all runs:",
    ]
    for tag, c in correlation.items():
        rho = "-" if c["rho"] is None else f"{c['rho']:+.2f} (p {c['p']:.2f})"
        lines.append(f"- {tag}: rho {rho}, {c['runs']} runs")
    lines += [
        "",
        f"{out['date']}; `python benchmarks/lesion_burden.py --dataset {args.dataset} "
        f"--protocol {args.protocol}`",
    ]
    (args.results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
