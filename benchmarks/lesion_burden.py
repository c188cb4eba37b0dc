"""Does the labelled patient's lesion burden explain the zenodo20 one-patient results?

Usage (from the repository root; under a minute, no training):
    python benchmarks/lesion_burden.py [--data ../shared/data] [--protocol short+std+p1]

For every (fold, seed) run of a `--labelled-patients` protocol in results/cv/zenodo/ it finds
the labelled train patient(s) the seed picked (`withhold_patients`, as `accuracy.py` does) and
measures the lesion burden, lesion pixels / radiologist lung pixels at full resolution, of the
labelled patient(s), the val patients and the test patients. It then joins the committed
scores of each contender (`prior`, i.e. as trained, and as shipped, i.e. rule and lesion offset
chosen on val) and splits the runs by the labelled patient's burden at --split (a cut chosen
after looking at the burdens: read it as a hypothesis, not a test). Writes
benchmarks/results/lesion_burden_p<N>.md and .json.
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


def burden(ids, lesion: dict, lung: dict) -> float:
    """Pooled lesion pixels / lung pixels over the slices `ids`."""
    return sum(lesion[i] for i in ids) / max(sum(lung[i] for i in ids), 1)


def pixel_counts(dataset) -> tuple[dict, dict]:
    """{slice id: lesion pixels}, {slice id: lung pixels} from the label files."""
    from stitchnet_tf.data.io import read_mask

    lesion, lung = {}, {}
    for s in dataset.samples:
        for path, out in ((s.mask, lesion), (s.lung, lung)):
            out[s.id] = int((read_mask(path) > 0).sum())
    return lesion, lung


def scores(folder: Path) -> dict:
    """{(contender, fold, seed): (prior, as shipped)} mean lesion Dice from committed results."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        shipped = r.get("calibrated", {}).get("mean_lesion_dice", r["mean_lesion_dice"])
        out[r["contender"], r["fold"], r["seed"]] = (r["mean_lesion_dice"], shipped)
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    s = stats(values)
    return s["mean"], s["sem"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--protocol", default="short+std+p1")
    parser.add_argument("--split", type=float, default=0.1, help="low / high burden cut")
    parser.add_argument(
        "--test-seeds", type=int, nargs="*", default=[2], help="seeds kept out of low / high"
    )
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.splits import Split, withhold_patients

    folder = args.data / "zenodo20-lungs"
    if not folder.is_dir():
        raise SystemExit(f"error: {folder}: no such folder (the zenodo20 data)")
    dataset = discover(folder, require_labels=True, mask_values="binary", masks_subdir="infection")
    suffix = args.protocol.rsplit("+p", 1)[-1]
    if "+p" not in args.protocol or not suffix.isdigit():
        raise SystemExit(f"error: --protocol {args.protocol}: not a --labelled-patients protocol")
    n_patients = int(suffix)
    lesion, lung = pixel_counts(dataset)
    patient = {s.id: s.patient for s in dataset.samples}
    table = scores(args.results / "cv" / "zenodo" / args.protocol)
    if not table:
        raise SystemExit(f"error: {args.results / 'cv' / 'zenodo' / args.protocol}: no results")
    runs = []
    for fold, seed in sorted({(f, s) for _, f, s in table}):
        split = Split.load(ROOT / "benchmarks" / "splits" / f"zenodo_cv5_fold{fold}.json")
        withheld = set(withhold_patients(split, dataset, n_patients, seed=seed).unlabelled)
        labelled = [i for i in split.train if i not in withheld]
        row = {
            "fold": fold,
            "seed": seed,
            "labelled_patients": sorted({patient[i] for i in labelled}),
            "labelled_slices": len(labelled),
            "burden_labelled": burden(labelled, lesion, lung),
            "burden_val": burden(split.val, lesion, lung),
            "burden_test": burden(split.test, lesion, lung),
        }
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
                both = [r for r in rows if base in r and c in r]
                key = f"gain, {tag}" if base != "threshold" else f"{c} - rule, {tag}"
                if both:  # the rule has no calibrated variant: its two scores are the same
                    g[key] = mean_se([r[c][k] - r[base][k] for r in both])
                    g[key + " runs"] = len(both)
        groups[name] = g

    out = {
        "protocol": args.protocol,
        "split": args.split,
        "runs": runs,
        "groups": groups,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    stem = f"lesion_burden_p{n_patients}"
    (args.results / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        f"# Labelled patient's lesion burden, zenodo20 `{args.protocol}`",
        "",
        "Burden = lesion pixels / radiologist lung pixels (full resolution, pooled over slices).",
        "Scores: mean lesion Dice `prior` / as shipped (rule and offset chosen on val).",
        "",
        "| fold | seed | labelled (slices) | burden labelled / val / test | rule | U-Net "
        "| StitchNet labelled only | StitchNet + unlabelled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        cells = [" / ".join(f"{v:.3f}" for v in r[c]) if c in r else "-" for c in CONTENDERS]
        cells[0] = f"{r['threshold'][0]:.3f}" if "threshold" in r else "-"
        lines.append(
            f"| {r['fold']} | {r['seed']} | {', '.join(r['labelled_patients'])} "
            f"({r['labelled_slices']}) | {r['burden_labelled']:.3f} / {r['burden_val']:.3f} / "
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
    lines += ["", f"{out['date']}; `python benchmarks/lesion_burden.py --protocol {args.protocol}`"]
    (args.results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
