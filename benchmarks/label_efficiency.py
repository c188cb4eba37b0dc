"""Label-efficiency curves: U-Net vs StitchNet (labelled only, semi-supervised).

Its committed results (benchmarks/results/accuracy.md) predate the StitchNet repair and the
recipe; `benchmarks/accuracy.py` is the cross-validated accuracy protocol.

Usage (from the repository root):
    python benchmarks/label_efficiency.py                # MedSeg, seed 0: 9 runs, N = 30, 10, 25
    python benchmarks/label_efficiency.py --seeds 0 1    # adds seed 1 (finished runs are skipped)
    python benchmarks/label_efficiency.py --dataset zenodo # zenodo20 infection masks: 3 runs
    python benchmarks/label_efficiency.py --only 'unet-*' 'stitchnet-semi-n10-*'   # select runs
    python benchmarks/label_efficiency.py --list         # the planned runs and their CLI lines
    python benchmarks/label_efficiency.py --report       # only rebuild the reports

Contenders, all with the same budget (steps, batch size, image size, widths):
- `unet`: U-Net (MobileNetV2 encoder), labelled slices only;
- `stitchnet-lab`: StitchNet on the same labelled slices only (no unlabelled image at all);
- `stitchnet-semi`: StitchNet with the same labelled slices plus, added to each batch
  (`--unlabelled-per-batch`; runs before 2026-12-03 swapped them in with `--labelled-per-batch`),
  as unlabelled images, the train slices whose labels were withheld and the 1600 unlabelled
  MedSeg slices.

MedSeg: the committed split benchmarks/splits/medseg_seed0.json (30 train / 10 val / 10 test, by
slice: no patient ids). The N labelled slices are `withhold_labels(split, N, seed)`: nested over
N (the 10 lie inside the 25) and identical for every contender of a seed. Each run's split file
is written beside its results; the labelled-only contenders get a split whose train part holds
only the N kept slices. zenodo20 (`--dataset zenodo`): split by patient (patients.csv, seed 0,
benchmarks/splits/zenodo_seed0.json: the lung U-Net's split), binary infection masks scored as
lesion vs no lesion, all train labels by default. Its `stitchnet-semi` uses the MedSeg unlabelled
slices, which come from the same 20 Zenodo volumes, test patients' volumes included: a
transductive setting (their images, never their labels, are seen in training).

Each run trains with `stitchnet_tf.training.train` (run folder under `--runs`, resumable), picks
the epoch with the best validation mean lesion Dice, and scores it with
`stitchnet_tf.evaluation.evaluate` on the test part. Results per run go to
`<results>/accuracy/<dataset>/<contender>-n<N>-s<seed>/` (metrics.md/.csv/.json, split.json,
result.json with train seconds, best epoch and the equivalent `stitchnet-tf` command lines); a run
with a result.json is skipped. After each run `<results>/accuracy.md`, `accuracy.json` and
`label_efficiency.png` (test mean lesion Dice against labelled slices; mean over seeds with
min/max bars) are rebuilt from every finished run.

Time on this 2-core CPU with the defaults (128 px, width 0.5, 8 epochs x 100 steps of 8), alone
on the machine: StitchNet about 10-12 min per run (0.64 s/step measured, plus graph tracing,
per-epoch BatchNorm re-estimation and validation, test scoring), U-Net about 4-6 min; MedSeg with
one seed (9 runs) about 1.3-1.6 h, each further seed as much again; zenodo (3 runs, larger
validation and test parts) about 35-45 min. Roughly twice as long while another training job
shares the CPU (StitchNet then ran ~3 min per epoch).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data"
UNLABELLED_PATTERN = r"Data-1_(.+)_\d+\.jpg"
CONTENDERS = ("unet", "stitchnet-lab", "stitchnet-semi")


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one benchmark dataset and which split and label counts it uses."""

    folder: str  # under --data
    split: str  # committed split, relative to the repository root
    labels: tuple[str, ...]  # default label counts, in run order ("all" = every train slice)
    read: tuple[tuple[str, str], ...] = ()  # TrainConfig / evaluate reading options
    title: str = ""
    note: str = ""  # printed under the dataset's heading in accuracy.md


DATASETS = {
    "medseg": DatasetSpec(
        "medseg-covid/labelled",
        "benchmarks/splits/medseg_seed0.json",
        ("30", "10", "25"),
        title="MedSeg (GGO / consolidation, split by slice)",
        note="Split benchmarks/splits/medseg_seed0.json (30 train / 10 val / 10 test slices; "
        "by slice, no patient ids). stitchnet-semi's unlabelled images: the withheld train "
        "slices and the 1600 unlabelled MedSeg slices (other volumes).",
    ),
    "zenodo": DatasetSpec(
        "zenodo20-lungs",
        "benchmarks/splits/zenodo_seed0.json",
        ("all",),
        (("mask_values", "binary"), ("masks_subdir", "infection")),
        title="zenodo20 (binary infection masks, split by patient)",
        note="Split benchmarks/splits/zenodo_seed0.json (by patient, seed 0: the lung U-Net's). "
        "stitchnet-semi's extra unlabelled images are the 1600 MedSeg unlabelled slices, which "
        "come from the same 20 Zenodo volumes, test patients' included: transductive (their "
        "images, never their labels, are seen in training).",
    ),
}


@dataclass(frozen=True)
class Run:
    dataset: str
    contender: str
    n: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.contender}-n{self.n}-s{self.seed}"


def shown(path: str | Path) -> str:
    """A path as written in command lines: relative to the repository root when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def train_config(args, run: Run, split_file: Path):
    """The run's `TrainConfig`, with the options `stitchnet-tf train` would give it."""
    from stitchnet_tf.training import TrainConfig

    spec = DATASETS[run.dataset]
    semi = run.contender == "stitchnet-semi"
    if run.contender == "unet":
        model, options = "unet", dict(width=args.width, alpha=args.alpha, focal_gamma=2.0)
    else:
        model = "stitchnet"
        options = dict(
            width=args.width,
            backbone_alpha=args.alpha,
            likelihood="exact",
            kl="analytic",
            supervised_weight=100.0,
            focal_gamma=2.0,
            kl_warmup_steps=0,
            free_bits=0.0,
            decision="prior",
            style_pool=1,
        )
    return TrainConfig(
        labelled=str(args.data / spec.folder),
        output=str(args.runs / run.dataset / run.name),
        unlabelled=str(args.unlabelled) if semi else None,
        model=model,
        size=args.size,
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        batch_size=args.batch,
        unlabelled_per_batch=args.unlabelled_per_batch if semi else 0,
        seed=run.seed,
        split=str(split_file),
        unlabelled_patient_pattern=UNLABELLED_PATTERN if semi else None,
        model_options=options,
        **dict(spec.read),
    )


def cli_lines(config, split_file: Path, output: Path, read: dict) -> dict[str, str]:
    """The equivalent `stitchnet-tf train` and `stitchnet-tf evaluate` command lines."""
    o = config.model_options
    reading = []
    if read.get("mask_values"):
        reading += ["--mask-values", read["mask_values"]]
    if read.get("masks_subdir"):
        reading += ["--masks-subdir", read["masks_subdir"]]
    train = ["stitchnet-tf", "train", "--labelled", shown(config.labelled)]
    if config.unlabelled:
        train += ["--unlabelled", shown(config.unlabelled)]
        train += ["--unlabelled-patient-pattern", config.unlabelled_patient_pattern]
    train += ["--model", config.model, "--output", shown(config.output)]
    train += ["--split", shown(split_file), "--size", config.size, "--epochs", config.epochs]
    train += ["--steps-per-epoch", config.steps_per_epoch, "--batch-size", config.batch_size]
    if config.unlabelled_per_batch is not None:
        train += ["--unlabelled-per-batch", config.unlabelled_per_batch]
    alpha = o["alpha"] if config.model == "unet" else o["backbone_alpha"]
    train += ["--width", o["width"], "--backbone-alpha", alpha, "--seed", config.seed, *reading]
    evaluate = ["stitchnet-tf", "evaluate", "--model", shown(config.output)]
    evaluate += ["--data", shown(config.labelled), "--split", shown(split_file)]
    evaluate += ["--part", "test", "--output", shown(output), *reading]
    return {k: shlex.join(str(a) for a in v) for k, v in (("train", train), ("evaluate", evaluate))}


def run_split(args, run: Run):
    """The run's split: N labelled train slices (nested over N, seeded); labelled-only
    contenders keep only those in `train`, `stitchnet-semi` lists the rest as unlabelled."""
    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.splits import Split, withhold_labels

    spec = DATASETS[run.dataset]
    dataset = discover(args.data / spec.folder, require_labels=True, **dict(spec.read))
    base = Split.load(ROOT / spec.split)
    base.check(dataset)
    split = withhold_labels(base, dataset, max_labelled=run.n, seed=run.seed)
    if run.contender == "stitchnet-semi":
        return split
    withheld = set(split.unlabelled)
    kept = [i for i in split.train if i not in withheld]
    return Split(
        kept, split.val, split.test, split.by, split.seed, split.fractions, [], split.patients
    )


def label_counts(args, dataset: str) -> list[int]:
    """`--labels` as numbers ("all" = every train slice of the committed split), in order."""
    from stitchnet_tf.data.splits import Split

    total = len(Split.load(ROOT / DATASETS[dataset].split).train)
    out = []
    for text in args.labels or DATASETS[dataset].labels:
        n = total if text == "all" else int(text)
        if not 0 < n <= total:
            raise SystemExit(f"error: --labels {text}: must be 1..{total} or all for {dataset}")
        out.append(n)
    return out


def plan(args) -> list[Run]:
    """Runs in order: seed, then label count (as given), then contender; `--only` filters."""
    runs = [
        Run(args.dataset, c, n, s)
        for s in args.seeds
        for n in label_counts(args, args.dataset)
        for c in args.contenders
    ]
    if args.only:
        runs = [r for r in runs if any(fnmatch.fnmatch(r.name, p) for p in args.only)]
    return runs


def lesion_dice(summary: dict) -> float | None:
    """Mean lesion Dice: the mean of the lesion classes' mean F1 (GGO and CON, or lesion)."""
    values = [e["f1"]["mean"] for c, e in summary["classes"].items() if c != "background"]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def comparable(config: dict) -> dict:
    """A config without its paths (which depend on --data / --runs / --results)."""
    return {
        k: v for k, v in config.items() if k not in ("labelled", "unlabelled", "output", "split")
    }


def execute(args, run: Run, results: Path) -> str:
    """Train and score one run unless its result exists; returns `done`, `skipped` or `failed`."""
    from pipeline_throughput import machine

    from stitchnet_tf.errors import DataError
    from stitchnet_tf.evaluation import evaluate
    from stitchnet_tf.fileio import atomic_write_text
    from stitchnet_tf.training import TrainConfig, TrainingError, train

    out = results / "accuracy" / run.dataset / run.name
    split_file = out / "split.json"
    config = train_config(args, run, split_file)
    if (out / "result.json").is_file():
        saved = json.loads((out / "result.json").read_text())["config"]
        if comparable(saved) != comparable(json.loads(json.dumps(dataclasses.asdict(config)))):
            print(f"error: {out}: holds a result with another configuration; skipped", flush=True)
            return "failed"
        return "skipped"
    out.mkdir(parents=True, exist_ok=True)
    split = run_split(args, run)
    split.save(split_file)
    read = dict(DATASETS[run.dataset].read)
    print(
        f"== {run.dataset} {run.name}: {len(split.train) - len(split.unlabelled)} labelled",
        flush=True,
    )
    run_dir = Path(config.output)
    state_path = run_dir / "state.json"
    try:
        done = json.loads(state_path.read_text())["epochs_done"] if state_path.is_file() else 0
        if done < config.epochs:
            train(config, verbose=args.verbose)  # checks the configuration when resuming
        elif TrainConfig.from_json((run_dir / "config.json").read_text()) != config:
            raise DataError(run_dir, "holds a finished run with another configuration")
        state = json.loads(state_path.read_text())
        scored = evaluate(
            config.output,
            config.labelled,
            out,
            split=split_file,
            part="test",
            log=lambda m: None,
            overwrite=True,
            **read,
        )
    except (DataError, TrainingError) as e:
        print(f"error: {run.name}: {e}", flush=True)
        return "failed"
    summary = scored["summary"]
    unlabelled = len(split.unlabelled)
    if config.unlabelled:
        unlabelled += sum(1 for _ in (Path(config.unlabelled) / "images").iterdir())
    result = {
        "dataset": run.dataset,
        "contender": run.contender,
        "n_labelled": run.n,
        "seed": run.seed,
        "name": run.name,
        "n_unlabelled_images": unlabelled,
        "labelled_train": [i for i in split.train if i not in set(split.unlabelled)],
        "test_slices": scored["slices"],
        "test_mean_lesion_dice": lesion_dice(summary),
        "best_epoch": state.get("best_epoch"),
        "best_val_mean_lesion_dice": state.get("best_score"),
        "train_seconds": state.get("train_seconds"),
        "eval_seconds": scored["seconds"],
        "summary": summary,
        "config": dataclasses.asdict(config),
        "commands": cli_lines(config, split_file, out, read),
        "machine": machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    atomic_write_text(out / "result.json", json.dumps(result, indent=1) + "\n")
    print(
        f"   test mean lesion Dice {result['test_mean_lesion_dice']:.4f}, best epoch "
        f"{result['best_epoch']}, trained {result['train_seconds'] / 60:.1f} min",
        flush=True,
    )
    return "done"


def collect(results: Path) -> list[dict]:
    """Every finished run's result.json under `results/accuracy/`, in a stable order."""
    found = [json.loads(p.read_text()) for p in (results / "accuracy").glob("*/*/result.json")]
    order = {c: i for i, c in enumerate(CONTENDERS)}
    return sorted(
        found,
        key=lambda r: (r["dataset"], r["n_labelled"], order.get(r["contender"], 9), r["seed"]),
    )


def curves(found: list[dict]) -> dict:
    """dataset -> contender -> N -> test mean lesion Dice over seeds (mean, min, max, per seed)."""
    out: dict = {}
    for r in found:
        if r["test_mean_lesion_dice"] is None:
            continue
        cell = out.setdefault(r["dataset"], {}).setdefault(r["contender"], {})
        cell.setdefault(str(r["n_labelled"]), {})[str(r["seed"])] = r["test_mean_lesion_dice"]
    for per_contender in out.values():
        for per_n in per_contender.values():
            for n, seeds in per_n.items():
                v = list(seeds.values())
                per_n[n] = {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "seeds": seeds}
    return out


def plot(curve: dict, output: Path) -> None:
    """Test mean lesion Dice against labelled slices, a panel per dataset, a line per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curve), figsize=(5.5 * len(curve), 4), squeeze=False)
    for ax, (dataset, per_contender) in zip(axes[0], sorted(curve.items()), strict=True):
        for contender, per_n in per_contender.items():
            ns = sorted(per_n, key=int)
            mean = [per_n[n]["mean"] for n in ns]
            err = [
                [m - per_n[n]["min"] for n, m in zip(ns, mean, strict=True)],
                [per_n[n]["max"] - m for n, m in zip(ns, mean, strict=True)],
            ]
            ax.errorbar(
                [int(n) for n in ns], mean, yerr=err, marker="o", capsize=3, label=contender
            )
        ax.set(
            title=DATASETS[dataset].title,
            xlabel="labelled training slices",
            ylabel="test mean lesion Dice",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = output.with_name(f".{output.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, output)


def lung_line(results: Path) -> str:
    """The lung U-Net's test Dice from lung_unet.json, if that benchmark was run."""
    path = results / "lung_unet.json"
    if not path.is_file():
        path = ROOT / "benchmarks" / "results" / "lung_unet.json"
    if not path.is_file():
        return ""
    test = json.loads(path.read_text())["test"]
    return (
        f"Lung field (benchmarks/results/lung_unet.md, same test patients): learned lung U-Net "
        f"mean patient Dice {test['learned']['mean_patient_dice']:.3f}, classical "
        f"AutoLungMask {test['classical']['mean_patient_dice']:.3f}. zenodo20 runs crop with "
        "the supplied lung masks; MedSeg runs with the package's default segmenter (this "
        "learned lung U-Net).\n"
    )


def report(results: Path) -> None:
    """Rebuild accuracy.md, accuracy.json and label_efficiency.png from the finished runs."""
    from stitchnet_tf.fileio import atomic_write_text
    from stitchnet_tf.metrics import summaries_markdown

    found = collect(results)
    if not found:
        return
    curve = curves(found)
    atomic_write_text(
        results / "accuracy.json",
        json.dumps({"curves": curve, "runs": found}, indent=1) + "\n",
    )
    plot(curve, results / "label_efficiency.png")
    c = found[0]["config"]
    m = found[0]["machine"]
    alpha = c["model_options"].get("alpha", c["model_options"].get("backbone_alpha"))
    semi = next(
        (
            f"{r['config']['batch_size']} labelled + {r['config']['unlabelled_per_batch']} "
            "unlabelled"
            if "unlabelled_per_batch" in r["config"]
            else f"{r['config'].get('labelled_per_batch')} labelled"
            for r in found
            if r["config"]["unlabelled"]
        ),
        "-",
    )
    lines = [
        "# Accuracy on real data and label efficiency",
        "",
        f"Budget per run (every contender): {c['epochs']} epochs x {c['steps_per_epoch']} steps "
        f"of batch {c['batch_size']} at {c['size']}x{c['size']} px, width "
        f"{c['model_options']['width']}, MobileNetV2 encoder alpha {alpha}; the checkpoint with "
        "the best validation mean lesion Dice is scored on the test part. `stitchnet-semi` "
        f"batches hold {semi} slices; the other contenders see labelled slices only "
        "(the same N per seed: nested, seeded subsets of the train part). Mean lesion Dice = "
        "mean of the lesion classes' mean F1 (GGO and CON, or lesion). Machine: "
        f"{m['cpu']}, {m['cores']} cores (shared), TensorFlow {m['tensorflow']}. Command: "
        "`python benchmarks/label_efficiency.py` (see its docstring). Plot: label_efficiency.png.",
        "",
    ]
    for dataset in sorted(curve):
        runs = [r for r in found if r["dataset"] == dataset]
        per_contender = curve[dataset]
        ns = sorted({int(n) for v in per_contender.values() for n in v})
        lines += [f"## {DATASETS[dataset].title}", "", DATASETS[dataset].note, ""]
        if dataset == "zenodo":
            lines += [lung_line(results)]
        lines += [
            f"Test mean lesion Dice ({runs[0]['test_slices']} test slices; mean over seeds, "
            "[min, max] with several seeds):",
            "",
            "| contender | " + " | ".join(f"N = {n}" for n in ns) + " |",
            "| --- " * (1 + len(ns)) + "|",
        ]
        for contender, per_n in per_contender.items():
            cells = []
            for n in ns:
                v = per_n.get(str(n))
                if v is None:
                    cells.append("—")
                elif len(v["seeds"]) > 1:
                    cells.append(f"{v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]")
                else:
                    cells.append(f"{v['mean']:.3f}")
            lines.append(f"| {contender} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "| run | labelled | unlabelled images | best epoch | val lesion Dice "
            "| test lesion Dice | test Overall F1 | train min |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in runs:
            lines.append(
                f"| {r['name']} | {r['n_labelled']} | {r['n_unlabelled_images']} | "
                f"{r['best_epoch']} | {r['best_val_mean_lesion_dice']:.3f} | "
                f"{r['test_mean_lesion_dice']:.3f} | {r['summary']['overall']['f1']:.3f} | "
                f"{r['train_seconds'] / 60:.1f} |"
            )
        lines.append("")
        for n in ns:
            for seed in sorted({r["seed"] for r in runs if r["n_labelled"] == n}):
                group = {
                    r["contender"]: r["summary"]
                    for r in runs
                    if r["n_labelled"] == n and r["seed"] == seed
                }
                lines.append(summaries_markdown(group, f"{dataset}: N = {n} labelled, seed {seed}"))
        lines += ["Reproduce a run (from the repository root):", ""]
        for r in runs:
            lines += [
                f"- {r['name']}:",
                "  ```",
                f"  {r['commands']['train']}",
                f"  {r['commands']['evaluate']}",
                "  ```",
            ]
        lines.append("")
    atomic_write_text(results / "accuracy.md", "\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="medseg", choices=sorted(DATASETS))
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument(
        "--unlabelled",
        type=Path,
        default=DATA / "medseg-covid" / "unlabelled",
        help="unlabelled slices for stitchnet-semi",
    )
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument(
        "--labels",
        nargs="+",
        default=None,
        metavar="N",
        help="labelled train slices per run, in run order, or `all` "
        "(default: medseg 30 10 25, zenodo all)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="run only these run names (glob, e.g. 'stitchnet-*-n30-s0')",
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=0.5, help="MobileNetV2 encoder width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--unlabelled-per-batch", type=int, default=8, help="stitchnet-semi")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100, help="steps per epoch")
    parser.add_argument(
        "--runs",
        type=Path,
        default=ROOT.parent / "runs" / "accuracy",
        help="folder for the training run folders (checkpoints)",
    )
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity")
    parser.add_argument("--list", action="store_true", help="print the planned runs and exit")
    parser.add_argument("--report", action="store_true", help="only rebuild the reports")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args.data, args.runs, args.results = (p.resolve() for p in (args.data, args.runs, args.results))

    if args.report:
        report(args.results)
        print(f"wrote {args.results / 'accuracy.md'}")
        return 0
    runs = plan(args)
    if args.list:
        for run in runs:
            out = args.results / "accuracy" / run.dataset / run.name
            config = train_config(args, run, out / "split.json")
            state = "done" if (out / "result.json").is_file() else "to do"
            print(f"{run.dataset} {run.name} ({state})")
            for line in cli_lines(
                config, out / "split.json", out, dict(DATASETS[run.dataset].read)
            ).values():
                print(f"  {line}")
        return 0
    for need in (args.data / DATASETS[args.dataset].folder, args.unlabelled):
        if not need.is_dir():
            print(f"error: {need}: data folder not found", file=sys.stderr)
            return 2
    outcome = {}
    for i, run in enumerate(runs, 1):
        start = time.time()
        print(f"[{i}/{len(runs)}] {datetime.now():%H:%M} {run.dataset} {run.name}", flush=True)
        outcome[run.name] = execute(args, run, args.results)
        if outcome[run.name] == "done":
            report(args.results)
            print(f"   {(time.time() - start) / 60:.1f} min in all", flush=True)
    report(args.results)
    counts = {k: list(outcome.values()).count(k) for k in ("done", "skipped", "failed")}
    print(f"runs: {counts}; report: {args.results / 'accuracy.md'}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
