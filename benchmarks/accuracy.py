"""Cross-validated accuracy: every contender on the same committed folds, seeds and budget.

Usage (from the repository root):
    python benchmarks/accuracy.py                         # MedSeg, short budget, all folds, seed 0
    python benchmarks/accuracy.py --seeds 0 1 --folds 0 1 # a subset (finished runs are skipped)
    python benchmarks/accuracy.py --budget full --contenders stitchnet unet
    python benchmarks/accuracy.py --dataset zenodo        # zenodo20, by patient, lesion vs none
    python benchmarks/accuracy.py --report                # only rebuild the report
    python benchmarks/accuracy.py --add-decision          # runs also scored with the decision
                                                          # rule (StitchNet) and with the rule and
                                                          # lesion offset chosen on val (as
                                                          # `train --decision auto` does)
    python benchmarks/accuracy.py --add-lesion            # older MedSeg runs also scored by
                                                          # binary lesion Dice (lesion vs none)
    python benchmarks/accuracy.py --lung-models DIR       # each fold scored with its own lung
                                                          # model (DIR/medseg_cv5_fold<k>.keras)
    python benchmarks/accuracy.py --intensity standardise # models and rule on standardised x
    python benchmarks/accuracy.py --labelled 10 --contenders threshold unet unet-cons \
        stitchnet-image stitchnet-semi stitchnet-semi-cons   # label efficiency (issue 12)
    python benchmarks/accuracy.py --dataset zenodo --labelled-patients 1 --contenders \
        threshold unet stitchnet-image stitchnet-semi   # label efficiency by patient
    python benchmarks/accuracy.py --labelled 10 --ema 0.99 ...   # checkpoints, validation and
                                                          # scoring on an EMA of the weights

Folds: `benchmarks/splits/<dataset>_cv5_fold<k>.json` (`stitchnet_tf.data.splits.kfold_splits`,
k = 5, seed 0; MedSeg by slice: 30 train / 10 val / 10 test per fold, every labelled slice
tested once; zenodo20 by patient). Contenders, all at 128 px on the same train slices:
- `threshold`: the two-threshold rule fitted on the fold's train slices (no learning; seeds
  do not change it);
- `reference`: the plain reference U-Net of `benchmarks/reference_unet.py` (whole slice, CE +
  soft Dice, Adam cosine, flips and crop-scale; MedSeg only: it needs GGO/CON labels), scored
  by that script's own evaluation (the same Table-1 Dice and label-free lung field);
- `unet`, `segnet`, `stitchnet`: the project's models through `stitchnet_tf.training.train` at
  the cpu preset's size and widths with the default recipe, labelled slices only; the epoch
  with the best validation mean lesion Dice is scored.
- label efficiency (`--labelled N`: N labelled train slices per fold, chosen by the seed as
  `train --max-labelled N` does; the other train slices are withheld and, for the semi-supervised
  contenders, join the 1600 unlabelled MedSeg slices; the rule is fitted on the N slices):
  `unet-cons` (U-Net + weak-to-strong consistency), `stitchnet-image` (StitchNet with the
  informative stitch likelihood: one Beta per class per image, ordered means; labelled only),
  `stitchnet-semi` (the same + unlabelled slices through the stitch likelihood),
  `stitchnet-semi-in` (the same with the withheld train slices alone as unlabelled slices:
  from the labelled collection, as zenodo20's are), `stitchnet-semi-cons` (+ consistency),
  `unet-cons-tex` and `stitchnet-semi-cons-tex` (the same with a strong view that keeps each
  pixel's attenuation: noise and blur, no brightness, contrast or gamma; `train
  --consistency-strong texture`), `unet-cons-tex-da` (and the teacher's probabilities aligned
  to the labelled pixels' class distribution before the pseudo-labels: `--consistency-align`),
  `unet-cons-tex-da-cb` (and class-balanced thresholds: about half the pixels the teacher gives
  each class become pseudo-labels, however rare the class: `--consistency-balance 0.5`),
  `unet-cons-in` (`unet-cons` with the withheld train slices alone as unlabelled slices).
  Every run sees 8 labelled slices per step; the semi runs add 8 unlabelled ones
  (`--unlabelled-per-batch`). `--labelled-patients N` (zenodo20): every slice of N seed-chosen
  train patients keeps its labels, the other train patients' slices are the unlabelled ones
  (the derived split is saved beside the runs, `split-f<k>-s<seed>.json`).
Budgets: `short` (3 x 100 steps of 8, about 10 min a StitchNet run alone on a 2-core CPU)
compares contenders cheaply; `full` is the cpu preset (12 x 100 steps of 8). The reference
U-Net gets the same number of steps and batch size.

Scoring: `evaluation.SliceScorer` (what `stitchnet-tf evaluate` reports): the lung field from
the image alone (with `--lung-models DIR`, by the fold's own lung model, trained without the
fold's test slices: the shipped lung model has seen every MedSeg lesion), probabilities mapped
back to the slice before the argmax, per-image Table-1 Dice (F1) and the pooled Dice over the
fold's test slices; on MedSeg also the binary lesion Dice (GGO and CON merged, lesion vs no
lesion: what the models find without the GGO/CON split). Each run writes
`<results>/cv/<dataset>/<protocol>/<contender>-f<k>-s<seed>.json`; finished runs are skipped, so
the benchmark resumes where it was cut off. `<results>/accuracy_cv.md` / `.json` are rebuilt
after every run: mean ± std over folds x seeds, the standard error of the mean, and the mean
paired difference to the threshold rule on the same folds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
#: The informative stitch likelihood (issue 12) and the consistency term of the semi contenders.
STYLES = {"style_mode": "image", "ordered_styles": True}
CONSISTENCY = {"consistency_weight": 1.0, "consistency_rampup": 100}
#: The same with the strong view's noise and blur only (no brightness, contrast, gamma).
TEXTURE = CONSISTENCY | {"consistency_strong": "texture"}
#: ... and the teacher's probabilities aligned to the labelled class distribution.
ALIGNED = TEXTURE | {"consistency_align": True}
#: ... and class-balanced thresholds (each class keeps about half its pseudo-labels).
BALANCED = ALIGNED | {"consistency_balance": 0.5}
#: project contender -> (model, model options, unlabelled slices it trains on: False none,
#: "all" the withheld train slices and the dataset's unlabelled folder, "withheld" the withheld
#: train slices alone, which come from the same collection as the labelled ones)
PROJECT = {
    "unet": ("unet", {}, False),
    "segnet": ("segnet", {}, False),
    "stitchnet": ("stitchnet", {}, False),
    "unet-cons": ("unet", CONSISTENCY, "all"),
    "unet-cons-tex": ("unet", TEXTURE, "all"),
    "unet-cons-tex-da": ("unet", ALIGNED, "all"),
    "unet-cons-tex-da-cb": ("unet", BALANCED, "all"),
    "unet-cons-in": ("unet", CONSISTENCY, "withheld"),
    "stitchnet-image": ("stitchnet", STYLES, False),
    "stitchnet-semi": ("stitchnet", STYLES, "all"),
    "stitchnet-semi-in": ("stitchnet", STYLES, "withheld"),
    "stitchnet-semi-cons": ("stitchnet", STYLES | CONSISTENCY, "all"),
    "stitchnet-semi-cons-tex": ("stitchnet", STYLES | TEXTURE, "all"),
}
CONTENDERS = ("threshold", "reference", *PROJECT)
#: The contender each one is paired with in the report's Δ base column: the labelled-only
#: model for a semi-supervised one, the project's U-Net for StitchNet.
PAIRED_BASE = {
    "stitchnet": "unet",
    "unet-cons": "unet",
    "unet-cons-tex": "unet",
    "unet-cons-tex-da": "unet",
    "unet-cons-tex-da-cb": "unet",
    "unet-cons-in": "unet",
    "stitchnet-semi": "stitchnet-image",
    "stitchnet-semi-in": "stitchnet-image",
    "stitchnet-semi-cons": "stitchnet-image",
    "stitchnet-semi-cons-tex": "stitchnet-image",
    "stitchnet-image": "stitchnet",
}
PROJECT_MODELS = tuple(PROJECT)
#: scored variants of a finished run (`--add-tta`, `--add-decision`): result key -> row suffix
VARIANTS = {
    "tta": " + TTA",
    "auto": " (val-chosen rule)",
    "calibrated": " (val-chosen rule + offset)",
}
BUDGETS = {"short": (3, 100), "full": (12, 100)}  # epochs x steps, batch 8
BATCH = 8
DATASETS = {
    "medseg": dict(
        folder="medseg-covid/labelled",
        read={},
        classes=("ggo", "con"),
        unlabelled=("medseg-covid/unlabelled", r"Data-1_(.+)_\d+\.jpg"),
    ),
    "zenodo": dict(
        folder="zenodo20-lungs",
        # its radiologists' lung masks are labels: the lung field comes from the image alone
        read={"mask_values": "binary", "masks_subdir": "infection", "lungs_subdir": None},
        classes=("lesion",),
    ),
}


def fold_file(dataset: str, fold: int) -> Path:
    return ROOT / "benchmarks" / "splits" / f"{dataset}_cv5_fold{fold}.json"


def protocol(args) -> str:
    """The folder name of a set of comparable runs: the budget, `+foldlung` when each fold has
    its own lung model, `+std` with intensity standardisation, `+nN` / `+pN` with N labelled
    slices / patients, `+ema` with an EMA of the weights, `+uK` with K unlabelled slices."""
    name = args.budget
    if args.lung_models is not None:
        name += "+foldlung"
    if args.intensity != "none":
        name += "+std"
    if args.labelled is not None:
        name += f"+n{args.labelled}"
    if args.labelled_patients is not None:
        name += f"+p{args.labelled_patients}"
    if args.ema is not None:
        name += "+ema"
    if args.unlabelled_slices is not None:
        name += f"+u{args.unlabelled_slices}"
    return name


def run_identity(args, contender: str, fold: int, seed: int) -> dict:
    """What names one run in its result file."""
    return {
        "dataset": args.dataset,
        "budget": args.budget,
        "protocol": protocol(args),
        "contender": contender,
        "fold": fold,
        "seed": seed,
    }


def use_lung_model(args, fold: int) -> str:
    """Point the package's lung segmenter at the fold's own lung model (`--lung-models DIR`:
    `DIR/<dataset>_cv5_fold<k>.keras`, trained without the fold's test slices by
    `benchmarks/train_lung_unet.py --medseg-exclude`), else the shipped one. Returns its name."""
    from stitchnet_tf.data.lung_unet import LUNG_MODEL_ENV

    if args.lung_models is None:
        os.environ.pop(LUNG_MODEL_ENV, None)
        return "shipped"
    path = args.lung_models / f"{args.dataset}_cv5_fold{fold}.keras"
    os.environ[LUNG_MODEL_ENV] = str(path)
    return path.name


def scores(table, classes) -> dict:
    """Per-image mean Dice and pooled Dice per lesion class from a filled `Table1`."""
    from reference_unet import pooled_dice

    summary, pooled = table.summary(), pooled_dice(table)
    out = {}
    for c in classes:
        out[f"dice_{c}"] = summary["classes"][c]["f1"]["mean"]
        out[f"pooled_{c}"] = pooled.get(c)
    values = [out[f"dice_{c}"] for c in classes if out[f"dice_{c}"] is not None]
    out["mean_lesion_dice"] = sum(values) / len(values) if values else None
    return out


#: what `scored` adds to a GGO/CON run: the binary lesion Dice, per image and pooled
BINARY = ("dice_lesion", "pooled_lesion")


def scored(scorer, model, classes, **table_options) -> dict:
    """`scores` of `model` on `scorer`'s slices (`SliceScorer.table` options: `decision`,
    `tta`); where the classes are GGO and CON, also the binary lesion Dice (`dice_lesion`,
    `pooled_lesion`: lesion vs no lesion, the two merged, as zenodo20 is scored) from the same
    predictions."""
    from stitchnet_tf.metrics import Table1

    if classes == ("lesion",):
        return scores(scorer.table(model, **table_options), classes)
    binary = Table1("lesion", scorer.absent)
    out = scores(scorer.table(model, on_slice=binary.add, **table_options), classes)
    merged = scores(binary, ("lesion",))
    return out | {k: merged[k] for k in BINARY}


def run_config(args, contender: str, fold: int, seed: int, labelled: Path, size: int, withheld):
    """The `TrainConfig` of one project-model run: which slices it learns from and how.
    `withheld`: the fold's split with the run's labels withheld (`withheld_split`); with
    `--labelled-patients` it is written beside the runs, where `train` reads it."""
    from stitchnet_tf.training import TrainConfig, preset_options

    epochs, steps = BUDGETS[args.budget]
    model, extra, semi = PROJECT[contender]
    budget, options = preset_options("cpu", model)
    unlabelled = DATASETS[args.dataset].get("unlabelled") if semi == "all" else None
    split = fold_file(args.dataset, fold)
    if args.labelled_patients is not None:  # train reads the withheld slices from the split
        split = args.runs / args.dataset / protocol(args) / f"split-f{fold}-s{seed}.json"
        split.parent.mkdir(parents=True, exist_ok=True)
        withheld.save(split)
    return TrainConfig(
        labelled=str(labelled),
        unlabelled=str(args.data / unlabelled[0]) if unlabelled else None,
        unlabelled_patient_pattern=unlabelled[1] if unlabelled else None,
        unlabelled_per_batch=None if semi else 0,
        max_labelled=args.labelled,
        output=str(args.runs / args.dataset / protocol(args) / f"{contender}-f{fold}-s{seed}"),
        intensity=args.intensity,
        model=model,
        size=size,
        epochs=epochs,
        steps_per_epoch=steps,
        batch_size=BATCH,
        seed=seed,
        split=str(split),
        model_options=options | extra,
        preset="cpu",
        choose_decision=False,  # StitchNet's `prior` rule in every fold (runs made before auto)
        ema=args.ema,
        **DATASETS[args.dataset]["read"],
    )


def train_project_model(
    args, contender: str, fold: int, seed: int, labelled: Path, size: int, withheld
):
    """Train StitchNet / U-Net / SegNet on the fold (resumable); returns (model, info)."""
    from stitchnet_tf.inference import load_model
    from stitchnet_tf.training import train

    config = run_config(args, contender, fold, seed, labelled, size, withheld)
    epochs = config.epochs
    run = Path(config.output)
    state = run / "state.json"
    done = json.loads(state.read_text())["epochs_done"] if state.is_file() else 0
    if done < epochs:
        train(config, verbose=args.verbose, log=lambda m: print("   " + m, flush=True))
    state = json.loads(state.read_text())
    info = {
        "train_seconds": state.get("train_seconds"),
        "best_epoch": state.get("best_epoch"),
        "best_val_mean_lesion_dice": state.get("best_score"),
        "config": json.loads((run / "config.json").read_text()),
    }
    return load_model(run).model, info


def withheld_split(args, split, dataset, seed: int):
    """The fold's split with the labels of all but the run's labelled train slices withheld
    (listed in `unlabelled`): `--labelled N` the same N slices as `train --max-labelled N`,
    `--labelled-patients N` every slice of N seed-chosen train patients."""
    from stitchnet_tf.data.splits import withhold_labels, withhold_patients

    if args.labelled_patients is not None:
        withheld = withhold_patients(split, dataset, args.labelled_patients, seed=seed)
        if args.unlabelled_slices is not None:
            withheld = keep_unlabelled(withheld, args.unlabelled_slices, seed)
        return withheld
    if args.labelled is not None:
        return withhold_labels(split, dataset, args.labelled, seed=seed)
    return split


def keep_unlabelled(split, k: int, seed: int):
    """`split` with `k` seed-chosen slices of its `unlabelled` list kept; the other withheld
    slices leave the train part (neither labelled nor unlabelled): how much the unlabelled
    gain depends on the number of unlabelled slices, all else equal."""
    import numpy as np

    if not 1 <= k <= len(split.unlabelled):
        raise ValueError(f"unlabelled slices must be 1 to {len(split.unlabelled)}, got {k}")
    order = np.random.default_rng(seed).permutation(len(split.unlabelled))
    kept = sorted(split.unlabelled[i] for i in order[:k])
    dropped = set(split.unlabelled) - set(kept)
    return replace(split, train=[i for i in split.train if i not in dropped], unlabelled=kept)


def run_one(args, contender: str, fold: int, seed: int) -> dict:
    """Train (or fit) one contender on one fold and score it on the fold's test slices."""
    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.lung_unet import default_segmenter
    from stitchnet_tf.data.splits import Split
    from stitchnet_tf.evaluation import SliceScorer

    spec = DATASETS[args.dataset]
    labelled = args.data / spec["folder"]
    dataset = discover(labelled, require_labels=True, **spec["read"])
    split = Split.load(fold_file(args.dataset, fold))
    split.check(dataset)
    withheld = withheld_split(args, split, dataset, seed)
    unlabelled = set(withheld.unlabelled)
    fit_ids = [i for i in withheld.train if i not in unlabelled]
    lung_model = use_lung_model(args, fold)
    segmenter = default_segmenter()
    test = SliceScorer(dataset.subset(split.test), args.size, segmenter, intensity=args.intensity)
    start = time.time()
    info: dict = {"lung_model": lung_model, "intensity": args.intensity}
    if contender == "threshold":
        from stitchnet_tf.threshold_fit import fit_threshold_rule

        model = fit_threshold_rule(
            dataset.subset(fit_ids), args.size, segmenter, intensity=args.intensity
        )
        info |= {"low": model.low, "high": model.high}
    elif contender == "reference":
        import reference_unet as ref

        from stitchnet_tf.data.preprocess import read_sample

        epochs, steps = BUDGETS[args.budget]
        by_id = {s.id: s for s in dataset.samples}
        raws = [read_sample(by_id[i], dataset.mask_map) for i in fit_ids]
        images = [r.image for r in raws]
        labels = [ref.lesion_index(r.allowed) for r in raws]
        net, seconds, loss = ref.train(
            images, labels, args.size, epochs * steps, BATCH, ref.DEFAULT_WIDTH, seed
        )
        # scored by its own script: whole slice in, probabilities resized back, argmax, then
        # background outside the same label-free lung field
        tests = {i: read_sample(by_id[i], dataset.mask_map) for i in split.test}
        lungs = {i: segmenter(r.image).astype(bool) for i, r in tests.items()}
        evaluated = ref.evaluate(net, tests, lungs, args.size)["lung_field"]
        measured = {}
        for c in spec["classes"]:
            measured[f"dice_{c}"] = evaluated[c]["dice_mean"]
            measured[f"pooled_{c}"] = evaluated[c]["dice_pooled"]
        values = [measured[f"dice_{c}"] for c in spec["classes"]]
        measured["mean_lesion_dice"] = sum(values) / len(values)
        info |= {"train_seconds": seconds, "steps": epochs * steps, "final_loss": loss}
    else:
        model, trained = train_project_model(
            args, contender, fold, seed, labelled, args.size, withheld
        )
        info |= trained
    if contender != "reference":
        measured = scored(test, model, spec["classes"])
    if contender in PROJECT_MODELS:  # and with flip test-time augmentation (`--tta`)
        info["tta"] = scored(test, model, spec["classes"], tta=True)
    return {
        **run_identity(args, contender, fold, seed),
        "split": os.path.relpath(fold_file(args.dataset, fold), ROOT),
        "test_slices": len(split.test),
        "size": args.size,
        **measured,
        "seconds": time.time() - start,
        **info,
    }


def add_variants(args, tta: bool, decision: bool, lesion: bool = False) -> None:
    """Score variants of finished project-model runs that lack them, from their run folders'
    best.keras: `tta` (flip test-time augmentation); for StitchNet `auto` (the decision rule
    that scores best on the fold's val slices); for every model `calibrated` (the rule and
    lesion offset chosen together on val, `SliceScorer.choose_calibration`: what `train
    --decision auto` ships). Both are chosen here for the epoch that `prior` chose. `lesion`
    (GGO/CON datasets): the binary lesion Dice of runs made before it was recorded, for the
    run and every variant it has, with the variant's recorded rule and offset; the threshold
    rule is fitted again. A run folder whose model no longer gives the recorded class Dice is
    skipped, so the binary score always belongs to the recorded run."""
    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.data.lung_unet import default_segmenter
    from stitchnet_tf.data.splits import Split
    from stitchnet_tf.evaluation import SliceScorer
    from stitchnet_tf.fileio import atomic_write_text
    from stitchnet_tf.inference import load_model
    from stitchnet_tf.run import Run

    spec = DATASETS[args.dataset]
    lesion = lesion and spec["classes"] != ("lesion",)
    dataset = discover(args.data / spec["folder"], require_labels=True, **spec["read"])
    for path in sorted((args.results / "cv" / args.dataset / protocol(args)).glob("*.json")):
        result = json.loads(path.read_text())
        if "failed" in result:
            continue
        want_lesion = lesion and "dice_lesion" not in result
        if result["contender"] == "threshold" and want_lesion:
            again = run_one(args, "threshold", result["fold"], result["seed"])
            if not same_scores(result, again, spec["classes"]):
                print(f"{path.name}: the rule fitted again scores differently; skipped")
                continue
            result |= {k: again[k] for k in BINARY}
            atomic_write_text(path, json.dumps(result, indent=1) + "\n")
            print(f"{path.name}: binary lesion Dice {result['dice_lesion']:.4f}", flush=True)
            continue
        if result["contender"] not in PROJECT_MODELS:
            continue
        stitchnet = PROJECT[result["contender"]][0] == "stitchnet"
        want_tta = tta and "tta" not in result
        want_auto = decision and stitchnet and "auto" not in result
        want_calibrated = decision and "calibrated" not in result
        if not (want_tta or want_auto or want_calibrated or want_lesion):
            continue
        run = args.runs / args.dataset / protocol(args) / path.stem
        if not Run(run).finished():
            print(f"{path.name}: no finished run folder at {run}; skipped")
            continue
        split = Split.load(fold_file(args.dataset, result["fold"]))
        use_lung_model(args, result["fold"])
        model = load_model(run).model

        def scorer(ids, result=result):
            return SliceScorer(
                dataset.subset(ids),
                result["size"],
                default_segmenter(),
                intensity=result.get("intensity", "none"),
            )

        test = scorer(split.test)
        if want_lesion:  # before the new variants, which record it themselves
            own_offset = model.lesion_offset
            again = scored(test, model, spec["classes"])
            if not same_scores(result, again, spec["classes"]):
                print(f"{path.name}: {run} does not give the recorded scores; skipped")
                continue
            result |= {k: again[k] for k in BINARY}
            for key in ("tta", "auto", "calibrated"):
                if key in result:
                    variant = result[key]
                    model.lesion_offset = variant.get("lesion_offset", own_offset)
                    again = scored(
                        test,
                        model,
                        spec["classes"],
                        tta=key == "tta",
                        decision=variant.get("decision"),
                    )
                    if not same_scores(variant, again, spec["classes"]):
                        print(f"{path.name}: {key} not reproduced; its binary Dice left out")
                        continue
                    variant |= {k: again[k] for k in BINARY}
            model.lesion_offset = own_offset
            print(f"{path.name}: binary lesion Dice {result['dice_lesion']:.4f}", flush=True)
        if want_tta:
            result["tta"] = scored(test, model, spec["classes"], tta=True)
            print(f"{path.name}: with TTA {result['tta']['mean_lesion_dice']:.4f}", flush=True)
        chosen = (
            scorer(split.val).choose_calibration(model) if want_auto or want_calibrated else None
        )
        if want_auto:
            rule = chosen["plain_decision"]
            on_val = {r: s["mean_lesion_dice"] for r, s in chosen["plain"].items()}
            result["auto"] = scored(test, model, spec["classes"], decision=rule) | {
                "decision": rule,
                "val_mean_lesion_dice": on_val,
            }
            print(
                f"{path.name}: val-chosen rule {rule} {result['auto']['mean_lesion_dice']:.4f}",
                flush=True,
            )
        if want_calibrated:
            rule, b = chosen["decision"], chosen["lesion_offset"]
            model.lesion_offset = b  # applied by `segment`, as in the shipped model
            result["calibrated"] = scored(test, model, spec["classes"], decision=rule) | {
                "decision": rule,
                "lesion_offset": b,
                "val_mean_lesion_dice": chosen["scores"]["mean_lesion_dice"],
            }
            print(
                f"{path.name}: val-chosen rule {rule} + offset {b:g} "
                f"{result['calibrated']['mean_lesion_dice']:.4f}",
                flush=True,
            )
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def same_scores(recorded: dict, again: dict, classes, tol: float = 1e-6) -> bool:
    """Whether a run scored again gives its recorded per-class Dice (within `tol`)."""
    for c in classes:
        a, b = recorded.get(f"dice_{c}"), again.get(f"dice_{c}")
        if (a is None) != (b is None) or (a is not None and abs(a - b) > tol):
            return False
    return True


def result_path(args, contender: str, fold: int, seed: int) -> Path:
    folder = args.results / "cv" / args.dataset / protocol(args)
    return folder / f"{contender}-f{fold}-s{seed}.json"


def stats(values: list[float]) -> dict:
    n = len(values)
    if not n:
        return {"n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"n": n, "mean": mean, "std": std, "sem": std / math.sqrt(n)}


def distinct(runs: list[dict]) -> list[dict]:
    """`runs` without repeats: a deterministic contender (the threshold rule fitted on the same
    training slices) gives the same scores under every seed, and counts as one observation."""
    seen, out = set(), []
    for r in runs:
        scores = sorted((k, v) for k, v in r.items() if k.startswith(("dice_", "pooled_")))
        key = (r["contender"], r["fold"], tuple(scores), r.get("low"), r.get("high"))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def paired_rule(runs: list[dict], rules: list[dict], metric: str) -> dict:
    """`stats` of the paired difference in `metric` between a report row's runs and the
    threshold rule's runs (`rules`) on the same fold and seed; a rule fitted without
    `--labelled` does not depend on the seed, so a fold without the run's seed pairs with any
    seed of the fold."""
    rule = {r["fold"]: r[metric] for r in rules if r.get(metric) is not None}
    rule |= {(r["fold"], r["seed"]): r[metric] for r in rules if r.get(metric) is not None}
    return stats(
        [
            r[metric] - rule.get((r["fold"], r["seed"]), rule[r["fold"]])
            for r in runs
            if r.get(metric) is not None and r["fold"] in rule
        ]
    )


def paired_base(
    contender: str, runs: list[dict], by_run: dict, metric: str
) -> tuple[dict, str | None]:
    """`stats` of the paired difference in `metric` between a report row's runs and the same
    folds and seeds of its base (`PAIRED_BASE`; a variant row is paired with the base's same
    variant, a `calibrated` row falls back to its own `auto`, then plain, runs), and the name
    of the row it was paired with."""
    key, own = next(
        ((k, contender.removesuffix(x)) for k, x in VARIANTS.items() if contender.endswith(x)),
        (None, contender),
    )
    if key == "auto":  # paired with the same runs, plain
        candidates = [(own, None)]
    elif key == "calibrated":  # the unlabelled gain as shipped, else the same runs
        candidates = [(PAIRED_BASE.get(own), key), (own, "auto"), (own, None)]
    else:  # TTA with TTA
        candidates = [(PAIRED_BASE.get(own), key)]
    pairs: list[float] = []
    for base, key in candidates:
        pairs = [
            r[metric] - got
            for r in runs
            if r.get(metric) is not None
            and (b := by_run.get((base, r["fold"], r["seed"])))
            and (not key or key in b)
            and (got := (b | b[key] if key else b).get(metric)) is not None
        ]
        if pairs:
            break
    return stats(pairs), (base + VARIANTS[key] if key and base else base)


def binary_table(
    variants: list[tuple[str, list[dict]]], rules: list[dict], by_run: dict, entries: dict
) -> list:
    """Report lines for the binary lesion Dice (lesion vs no lesion) of the rows whose runs
    all record it (MedSeg runs since it was added, or given it by `--add-lesion`); `rules`:
    the threshold rule's runs; fills each row's `entries[row]["lesion_binary"]`. No lines when
    no row has it."""
    lines = []
    for contender, runs in variants:
        if not runs or any("dice_lesion" not in r for r in runs):
            continue
        m = stats([r["dice_lesion"] for r in runs if r["dice_lesion"] is not None])
        p = stats([r["pooled_lesion"] for r in runs if r["pooled_lesion"] is not None])
        d = paired_rule(runs, rules, "dice_lesion")
        b, against = paired_base(contender, runs, by_run, "dice_lesion")
        entries[contender]["lesion_binary"] = {
            "dice": m,
            "pooled": p,
            "delta_rule": d,
            "delta_base": b | {"base": against},
        }
        delta = f"{d['mean']:+.3f} ({d['sem']:.3f})" if d["n"] else "n/a"
        delta_base = f"{b['mean']:+.3f} ({b['sem']:.3f}) vs {against}" if b["n"] else "-"
        lines.append(
            f"| {contender} | {m['n']} | {m['mean']:.3f} ± {m['std']:.3f} ({m['sem']:.3f}) | "
            f"{p['mean']:.3f} | {delta} | {delta_base} |"
        )
    if not lines:
        return []
    return [
        "Binary lesion Dice (GGO and CON merged: lesion vs no lesion), the rows whose runs "
        "record it:",
        "",
        "| contender | runs | lesion Dice | pooled | Δ rule (paired) | Δ base (paired) |",
        "|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def report(results: Path) -> None:
    """Rebuild accuracy_cv.md / .json from every finished run under `results/cv/`."""
    from pipeline_throughput import machine

    from stitchnet_tf.fileio import atomic_write_text

    found = [json.loads(p.read_text()) for p in sorted((results / "cv").glob("*/*/*.json"))]
    rows = [r for r in found if "failed" not in r]
    failures = [r for r in found if "failed" in r]
    table: dict = {}
    lines = [
        "# Cross-validated accuracy (benchmarks/accuracy.py)",
        "",
        "Per-image Dice (Table 1 F1, lung field from the image alone), mean ± std over folds x "
        "seeds (n runs), standard error in brackets; pooled Dice over each fold's test slices, "
        "mean over runs; Δ rule: mean paired difference in mean lesion Dice to the threshold "
        "rule on the same folds. A contender that scores the same under every seed (the "
        "threshold rule on the same training slices) counts once a fold. "
        "Folds: benchmarks/splits/<dataset>_cv5_fold<k>.json.",
        "",
    ]
    for dataset in sorted({r["dataset"] for r in rows}):
        classes = DATASETS[dataset]["classes"]
        protocols = sorted(
            {r.get("protocol", r["budget"]) for r in rows if r["dataset"] == dataset}
        )
        for name in protocols:
            group = [
                r
                for r in rows
                if r["dataset"] == dataset and r.get("protocol", r["budget"]) == name
            ]
            budget = group[0]["budget"]
            rules = [r for r in group if r["contender"] == "threshold"]
            by_run = {(r["contender"], r["fold"], r["seed"]): r for r in group}
            epochs, steps = BUDGETS[budget]
            if "+foldlung" in name:
                lung = "each fold's own lung model"
            elif all("lung_model" in r for r in group):
                lung = "the shipped lung model"
            else:  # runs made before the lung model recorded itself
                lung = "the v1 lung model (zenodo only, `lung_unet_v1.keras`)"
            std = ", intensity standardised" if "+std" in name else ""
            lines += [
                f"## {dataset}, {name}: {budget} budget ({epochs} x {steps} steps of {BATCH}, "
                f"128 px), lung field by {lung}{std}",
                "",
                "| contender | runs | folds | "
                + " | ".join(f"{c.upper()} Dice | {c.upper()} pooled" for c in classes)
                + " | mean lesion Dice | Δ rule (paired) | Δ base (paired) | train min |",
                "|---" * (7 + 2 * len(classes)) + "|",
            ]
            variants = []
            for contender in CONTENDERS:
                runs = distinct([r for r in group if r["contender"] == contender])
                variants.append((contender, runs))
                for key, suffix in VARIANTS.items():
                    extra = [r | r[key] for r in runs if key in r]
                    if extra:
                        variants.append((contender + suffix, extra))
            for contender, runs in variants:
                if not runs:
                    continue
                entry = {"runs": len(runs), "folds": sorted({r["fold"] for r in runs})}
                cells = []
                for c in classes:
                    s = stats([r[f"dice_{c}"] for r in runs if r[f"dice_{c}"] is not None])
                    p = stats([r[f"pooled_{c}"] for r in runs if r[f"pooled_{c}"] is not None])
                    entry[f"dice_{c}"], entry[f"pooled_{c}"] = s, p
                    cells.append(f"{s['mean']:.3f} ± {s['std']:.3f} ({s['sem']:.3f})")
                    cells.append(f"{p['mean']:.3f}")
                m = stats([r["mean_lesion_dice"] for r in runs])
                entry["mean_lesion_dice"] = m
                d = paired_rule(runs, rules, "mean_lesion_dice")
                entry["delta_rule"] = d
                delta = f"{d['mean']:+.3f} ({d['sem']:.3f})" if d["n"] else "n/a"
                b, against = paired_base(contender, runs, by_run, "mean_lesion_dice")
                entry["delta_base"] = b | {"base": against}
                delta_base = f"{b['mean']:+.3f} ({b['sem']:.3f}) vs {against}" if b["n"] else "-"
                minutes = [r["train_seconds"] / 60 for r in runs if r.get("train_seconds")]
                train = f"{sum(minutes) / len(minutes):.1f}" if minutes else "-"
                lines.append(
                    f"| {contender} | {len(runs)} | {len(entry['folds'])} | "
                    + " | ".join(cells)
                    + f" | {m['mean']:.3f} ± {m['std']:.3f} ({m['sem']:.3f}) | {delta} | "
                    f"{delta_base} | {train} |"
                )
                table.setdefault(dataset, {}).setdefault(name, {})[contender] = entry
            lines.append("")
            if classes != ("lesion",):  # else the table above is the binary one
                lines += binary_table(variants, rules, by_run, table[dataset][name])
    gains = unlabelled_gains(rows)
    lines += gain_lines(gains)
    for r in failures:
        lines.append(
            f"- **failed run**: {r['dataset']} {r.get('protocol', r['budget'])} {r['contender']} "
            f"fold {r['fold']} "
            f"seed {r['seed']}: {r['failed']}"
        )
    curves = label_efficiency(table)
    if curves:
        plot_label_efficiency(curves, results / "accuracy_label_efficiency.png")
        lines += [
            "Label efficiency (mean lesion Dice ± standard error over folds x seeds against "
            "labelled training slices): accuracy_label_efficiency.png.",
        ]
    lines += ["", f"Machine: {json.dumps(machine())}"]
    atomic_write_text(results / "accuracy_cv.md", "\n".join(lines) + "\n")
    atomic_write_text(
        results / "accuracy_cv.json",
        json.dumps(
            {"table": table, "unlabelled_gain": gains, "runs": rows, "failed": failures},
            indent=1,
        )
        + "\n",
    )


#: The semi-supervised StitchNet contenders, each paired with `stitchnet-image`.
SEMI = tuple(c for c, base in PAIRED_BASE.items() if base == "stitchnet-image")
#: The unlabelled gain's columns: label -> (scoring variant, None for the plain one; metric).
GAIN_COLUMNS = {
    "prior": (None, "mean_lesion_dice"),
    "val-chosen rule": ("auto", "mean_lesion_dice"),
    "as shipped": ("calibrated", "mean_lesion_dice"),
    "binary, prior": (None, "dice_lesion"),
    "binary, as shipped": ("calibrated", "dice_lesion"),
}


def unlabelled_gains(rows: list[dict]) -> list[dict]:
    """The unlabelled gain of every protocol: StitchNet + unlabelled (`SEMI`) minus
    labelled-only StitchNet (`stitchnet-image`) on the same fold and seed, for each column of
    `GAIN_COLUMNS` (a scoring variant paired with the same variant). A protocol `<p>+uK` (fewer
    unlabelled slices, the same labelled ones) pairs with the labelled-only runs of `<p>`.
    One row a (dataset, protocol, contender) with runs: {"dataset", "protocol", "contender",
    column: `stats`}."""
    import re

    groups: dict = {}  # (dataset, protocol, contender) -> {(fold, seed): run}
    for r in rows:
        key = (r["dataset"], r.get("protocol", r["budget"]), r["contender"])
        groups.setdefault(key, {})[(r["fold"], r["seed"])] = r
    gains = []
    for (dataset, name, contender), runs in sorted(groups.items()):
        if contender not in SEMI:
            continue
        base = groups.get((dataset, re.sub(r"\+u\d+$", "", name), "stitchnet-image"), {})
        row = {}
        for column, (variant, metric) in GAIN_COLUMNS.items():
            if metric == "dice_lesion" and DATASETS[dataset]["classes"] == ("lesion",):
                continue  # the class is the lesion: the same as the mean lesion Dice
            pairs = []
            for fold_seed, r in runs.items():
                if (b := base.get(fold_seed)) is None:
                    continue  # no labelled-only run to pair with
                x, y = (r, b) if variant is None else (r.get(variant, {}), b.get(variant, {}))
                if x.get(metric) is not None and y.get(metric) is not None:
                    pairs.append(x[metric] - y[metric])
            if pairs:
                row[column] = stats(pairs)
        if row:
            gains.append({"dataset": dataset, "protocol": name, "contender": contender} | row)
    return gains


def gain_lines(gains: list[dict]) -> list[str]:
    """The report's table of `unlabelled_gains`: mean (standard error, pairs)."""
    if not gains:
        return []

    def cell(s: dict | None) -> str:
        if not s:
            return "-"
        return f"{s['mean']:+.3f} " + (f"({s['sem']:.3f}, {s['n']})" if s["n"] > 1 else "(1 pair)")

    return [
        "## The unlabelled gain in every protocol",
        "",
        "StitchNet + unlabelled minus StitchNet labelled only (`stitchnet-image`), paired by fold "
        "and seed: mean (standard error, pairs). `prior`: the plain decision; val-chosen rule: "
        "`--add-decision`'s rule chosen on val; as shipped: rule and lesion offset chosen on val "
        "(`train --decision auto`), each paired with the same scoring of the labelled-only run; "
        "binary: lesion vs no lesion (GGO and CON merged; zenodo20's class is the lesion "
        "already, so its binary cells are left empty). A protocol `+uK` (K unlabelled slices) "
        "pairs with the labelled-only runs of the protocol without it.",
        "",
        "| dataset | protocol | contender | " + " | ".join(GAIN_COLUMNS) + " |",
        "|---" * (3 + len(GAIN_COLUMNS)) + "|",
        *(
            f"| {g['dataset']} | {g['protocol']} | {g['contender']} | "
            + " | ".join(cell(g.get(c)) for c in GAIN_COLUMNS)
            + " |"
            for g in gains
        ),
        "",
    ]


def label_efficiency(table: dict) -> dict:
    """{(dataset, protocol without +nN / +pN, unit): {contender: {N: mean_lesion_dice stats}}}
    for every protocol that has `--labelled N` (unit "slices") or `--labelled-patients N`
    ("patients") runs; the all-labels point is the protocol without the suffix, at N = fold 0's
    train slices or train patients. TTA rows are left out, val-chosen rows kept. A protocol
    with a suffix after +nN (`+ema`) is a table only."""
    import re

    units = {"n": "slices", "p": "patients"}
    curves: dict = {}
    for dataset, protocols in table.items():
        fold0 = json.loads(fold_file(dataset, 0).read_text())
        all_labels = {
            "slices": len(fold0["train"]),
            "patients": len(fold0.get("patients", {}).get("train", [])),  # none when by slice
        }
        for name, contenders in protocols.items():
            match = re.search(r"\+([np])(\d+)$", name)
            base = name[: match.start()] if match else name
            for unit in [units[match.group(1)]] if match else units.values():
                n = int(match.group(2)) if match else all_labels[unit]
                for contender, entry in contenders.items():
                    if contender.endswith(VARIANTS["tta"]):
                        continue  # the plot shows what `train --decision auto` users get, no TTA
                    curves.setdefault((dataset, base, unit), {}).setdefault(contender, {})[n] = (
                        entry["mean_lesion_dice"]
                    )
    with_n = {
        (dataset, name[: m.start()], units[m.group(1)])
        for dataset, protocols in table.items()
        for name in protocols
        if (m := re.search(r"\+([np])(\d+)$", name))
    }
    return {key: per for key, per in curves.items() if key in with_n}


def plot_label_efficiency(curves: dict, output: Path) -> None:
    """Mean lesion Dice ± SE against labelled slices or patients: a panel per (dataset,
    protocol, unit); solid lines for what `train` ships (val-chosen rule + offset) and the
    threshold rule, faint dotted lines for the other variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stitchnet_tf.fileio import save_figure

    fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 7), squeeze=False)
    for ax, ((dataset, base, unit), per) in zip(axes[0], sorted(curves.items()), strict=True):
        for contender, points in sorted(per.items()):
            ns = sorted(points)
            shipped = contender.endswith(VARIANTS["calibrated"]) or contender == "threshold"
            ax.errorbar(
                ns,
                [points[n]["mean"] for n in ns],
                yerr=[points[n]["sem"] for n in ns],
                marker="o",
                capsize=3,
                linestyle="-" if shipped else ":",  # solid: what `train` ships, and the rule
                alpha=1.0 if shipped else 0.5,
                label=f"{contender} (runs {'/'.join(str(points[n]['n']) for n in ns)})",
            )
        ax.set(
            title=f"{dataset}, {base}",
            xlabel=f"labelled training {unit}",
            ylabel="test mean lesion Dice (± SE)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    save_figure(fig, output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="medseg")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="short")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--runs", type=Path, default=ROOT.parent / "runs" / "cv")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--verbose", type=int, default=2)
    parser.add_argument(
        "--lung-models",
        type=Path,
        default=None,
        help="folder of per-fold lung models <dataset>_cv5_fold<k>.keras (default: the shipped)",
    )
    parser.add_argument("--intensity", choices=("none", "standardise"), default="none")
    parser.add_argument(
        "--labelled",
        type=int,
        default=None,
        help="labelled train slices per fold (label efficiency; default: all)",
    )
    parser.add_argument(
        "--labelled-patients",
        type=int,
        default=None,
        help="labelled train patients per fold, the other train patients' slices unlabelled "
        "(label efficiency by patient, zenodo20)",
    )
    parser.add_argument(
        "--ema",
        type=float,
        default=None,
        help="train with an EMA of the weights of this momentum, used for validation, the "
        "chosen checkpoint and scoring (`train --ema`; protocol suffix +ema)",
    )
    parser.add_argument(
        "--unlabelled-slices",
        type=int,
        default=None,
        help="with --labelled-patients: keep this many seed-chosen unlabelled slices, drop the "
        "rest from training (protocol suffix +uK)",
    )
    parser.add_argument("--report", action="store_true", help="only rebuild the report")
    parser.add_argument(
        "--add-tta", action="store_true", help="score finished runs with flip TTA, then report"
    )
    parser.add_argument(
        "--add-decision",
        action="store_true",
        help="score finished runs with the decision rule (StitchNet) and with the rule and "
        "lesion offset chosen on val (what `train --decision auto` does), then report",
    )
    parser.add_argument(
        "--add-lesion",
        action="store_true",
        help="score finished GGO/CON runs (and their variants) by binary lesion Dice, lesion "
        "vs no lesion, where they lack it, then report",
    )
    args = parser.parse_args(argv)
    if args.labelled is not None and args.labelled_patients is not None:
        parser.error("give --labelled or --labelled-patients, not both")
    if args.unlabelled_slices is not None and args.labelled_patients is None:
        parser.error("--unlabelled-slices needs --labelled-patients")
    if args.add_tta or args.add_decision or args.add_lesion:
        add_variants(args, args.add_tta, args.add_decision, args.add_lesion)
    if args.report or args.add_tta or args.add_decision or args.add_lesion:
        report(args.results)
        return 0
    if not (args.data / DATASETS[args.dataset]["folder"]).is_dir():
        print(f"error: {args.data / DATASETS[args.dataset]['folder']}: not found", file=sys.stderr)
        return 2
    from pipeline_throughput import machine

    from stitchnet_tf.fileio import atomic_write_text
    from stitchnet_tf.training import TrainingError

    contenders = [c for c in args.contenders if not (c == "reference" and args.dataset != "medseg")]
    for seed in args.seeds:
        for fold in args.folds:
            for contender in contenders:
                if contender == "threshold" and seed != args.seeds[0] and args.labelled is None:
                    continue  # no randomness: one run per fold (with --labelled the seed
                    # chooses the N slices it is fitted on)
                path = result_path(args, contender, fold, seed)
                if path.is_file():
                    continue
                print(f"== {args.dataset} {args.budget} {contender} fold {fold} seed {seed}")
                try:
                    result = run_one(args, contender, fold, seed)
                except TrainingError as e:  # e.g. a NaN loss: a result too, reported as such
                    print(f"   failed: {e}", flush=True)
                    result = run_identity(args, contender, fold, seed) | {"failed": str(e)}
                result["machine"] = machine()
                result["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(result, indent=1) + "\n")
                if "failed" not in result:
                    print(
                        f"   mean lesion Dice {result['mean_lesion_dice']:.4f} "
                        f"({result['seconds'] / 60:.1f} min)",
                        flush=True,
                    )
                report(args.results)
    report(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
