"""The `stitchnet-tf` command line: thin wrappers that parse options and call the library."""

from __future__ import annotations

import functools
import math
import re
import signal
import sys
import threading
from pathlib import Path

import click

from stitchnet_tf import __version__
from stitchnet_tf.errors import DataError, Terminated, TrainingError, on_sigterm
from stitchnet_tf.models.options import (
    DEFAULT_GLOBAL_CLIPNORM,
    DEFAULT_HEAD_SKIPS,
    NORMS,
    RECALIBRATION_STEPS,
    SAMPLE_TEMPERATURE,
    SUPERVISED,
)


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


class _Group(click.Group):
    """Turns `DataError`s and bad options into a one-line `error: ...` and exit code 2, an
    interrupt into exit 130, and any other exception into one `error: internal error: ...`
    line and exit 1 (the traceback only with `--debug`)."""

    def invoke(self, ctx: click.Context):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
        try:
            return super().invoke(ctx)
        except (DataError, TrainingError) as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except Terminated:
            click.echo("error: terminated", err=True)
            ctx.exit(143)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except click.UsageError as e:  # a bad option: one line naming it, before any work
            click.echo(f"error: {e.format_message()}", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            message = " ".join(str(e).split()) or "(no message)"
            if len(message) > 300:
                message = message[:297] + "..."
            click.echo(
                f"error: internal error: {type(e).__name__}: {message} "
                "(rerun with --debug for the traceback)",
                err=True,
            )
            ctx.exit(1)


def intensity_option(f):
    """`--intensity`, shared by `preprocess` and `train`."""
    return click.option(
        "--intensity",
        type=click.Choice(["none", "standardise"]),
        default="none",
        show_default=True,
        help="standardise: map each slice so that its aerated lung and the soft tissue around "
        "the lung field land on fixed values (other windows and scanners then look alike).",
    )(f)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stitchnet-tf")
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error.")
def cli(debug: bool) -> None:
    """StitchNet: semi-supervised COVID-19 lung CT segmentation (Keras 3 / TensorFlow).

    Classes: background (outside the lung field), healthy lung, ground-glass opacity (GGO),
    consolidation. Run `stitchnet-tf COMMAND --help` for each command.
    """


tta_option = click.option(
    "--tta", is_flag=True, help="Average the probabilities over the four flips of each slice."
)


def _patient_pattern(ctx, param, value: str | None) -> str | None:
    """A regex with at least one group (the patient id), checked before any file is read."""
    if value is None:
        return None
    try:
        compiled = re.compile(value)
    except re.error as e:
        raise click.BadParameter(f"not a regular expression ({e})") from None
    if compiled.groups < 1:
        raise click.BadParameter("needs a group for the patient id, e.g. 'P(\\d+)_'")
    return value


def _model_size(ctx, param, value: int | None) -> int | None:
    """A model size: a positive multiple of 32 (five stride-2 levels), or None."""
    if value is not None and (value < 32 or value % 32):
        raise click.BadParameter(f"{value} is not a positive multiple of 32")
    return value


#: Seeds of NumPy, TensorFlow and Keras must fit in 32 bits.
SEED = click.IntRange(0, 2**32 - 1)


def data_options(f):
    """Options saying how to read a dataset folder."""

    @click.option(
        "--mask-values",
        default=None,
        metavar="SPEC",
        help="What stored mask values mean: a preset (medseg, binary, fourclass, bits) or "
        "pairs like 0:none,1:ggo,2:con (classes: background, healthy, ggo, con, lesion, lung, "
        "none, unknown). Default: the folder's dataset.json, else medseg.",
    )
    @click.option(
        "--patient-pattern",
        default=None,
        metavar="REGEX",
        callback=_patient_pattern,
        help="Regex on file names whose first group is the patient id (when there is no "
        "manifest column or patients.csv), e.g. 'Data-1_(.+)_\\d+\\.jpg'.",
    )
    @click.option(
        "--masks-subdir", default="masks", show_default=True, help="Folder of lesion masks."
    )
    @click.option(
        "--lungs-subdir", default="lungs", show_default=True, help="Folder of lung masks."
    )
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def _discover(path, mask_values, patient_pattern, masks_subdir, lungs_subdir, skip_bad=False):
    from stitchnet_tf.data.datasets import discover

    return discover(
        path,
        mask_values=mask_values,
        patient_pattern=patient_pattern,
        masks_subdir=masks_subdir,
        lungs_subdir=lungs_subdir,
        skip_bad=skip_bad,
        warn=_warn,
    )


@cli.command("demo-data")
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write (must not exist or be empty).",
)
@click.option("--labelled-patients", default=6, show_default=True, type=click.IntRange(1))
@click.option("--unlabelled-patients", default=4, show_default=True, type=click.IntRange(0))
@click.option(
    "--slices", default=8, show_default=True, type=click.IntRange(1), help="Slices per patient."
)
@click.option(
    "--size",
    default=128,
    show_default=True,
    type=click.IntRange(32),
    help="Side of the generated slices in pixels.",
)
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def demo_data(output, labelled_patients, unlabelled_patients, slices, size, seed, overwrite):
    """Write the embedded synthetic CT dataset (labelled/ and unlabelled/ parts).

    Example: stitchnet-tf demo-data --output data/demo
    """
    from stitchnet_tf.data.synthetic import write_demo_dataset

    total = (labelled_patients + unlabelled_patients) * slices
    with click.progressbar(length=total, label="demo-data", file=sys.stderr) as bar:
        write_demo_dataset(
            output,
            labelled_patients=labelled_patients,
            unlabelled_patients=unlabelled_patients,
            slices_per_patient=slices,
            size=size,
            seed=seed,
            overwrite=overwrite,
            progress=bar.update,
        )
    parts = [
        p for p, n in (("labelled/", labelled_patients), ("unlabelled/", unlabelled_patients)) if n
    ]
    click.echo(f"wrote {total} synthetic slices to {output} ({', '.join(parts)})")


@cli.command()
@click.option(
    "--input",
    "-i",
    "input_",
    required=True,
    type=click.Path(path_type=Path),
    help="Dataset folder to read.",
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write the preprocessed copy to.",
)
@click.option(
    "--size",
    default=352,
    show_default=True,
    type=int,
    callback=_model_size,
    help="Model size (a multiple of 32).",
)
@click.option(
    "--window-level",
    default=-600.0,
    show_default=True,
    help="CT window level (HU) for Hounsfield data.",
)
@click.option(
    "--window-width",
    default=1500.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="CT window width (HU) for Hounsfield data.",
)
@click.option(
    "--margin",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Crop margin around the lung field, as a fraction of its size.",
)
@intensity_option
@click.option("--skip-bad", is_flag=True, help="Warn and skip bad files instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@data_options
def preprocess(
    input_,
    output,
    size,
    window_level,
    window_width,
    margin,
    intensity,
    skip_bad,
    overwrite,
    mask_values,
    patient_pattern,
    masks_subdir,
    lungs_subdir,
):
    """Crop a dataset to the lung field at model size and write it with a manifest.

    Example: stitchnet-tf preprocess -i data/demo/labelled -o data/demo-prep/labelled --size 128
    """
    from stitchnet_tf.data.io import Window
    from stitchnet_tf.data.preprocess import preprocess_dataset

    dataset = _discover(input_, mask_values, patient_pattern, masks_subdir, lungs_subdir, skip_bad)
    with click.progressbar(length=len(dataset), label="preprocess", file=sys.stderr) as bar:
        summary = preprocess_dataset(
            dataset,
            output,
            size=size,
            window=Window(window_level, window_width),
            margin=margin,
            intensity=intensity,
            overwrite=overwrite,
            skip_bad=skip_bad,
            warn=_warn,
            progress=bar.update,
        )
    skipped = f", skipped {summary['skipped']} bad slices" if summary["skipped"] else ""
    click.echo(
        f"wrote {summary['count']} slices ({summary['labelled']} labelled) at "
        f"{size}x{size} to {output}{skipped}"
    )


def _fractions(ctx, param, value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("expected three numbers like 0.6,0.2,0.2") from None
    if len(parts) != 3:
        raise click.BadParameter("expected three numbers like 0.6,0.2,0.2")
    if not all(math.isfinite(v) and v >= 0 for v in parts) or sum(parts) <= 0:
        raise click.BadParameter("the three fractions must be finite, >= 0 and not all 0")
    return parts


@cli.command()
@click.option(
    "--data", "-d", required=True, type=click.Path(path_type=Path), help="Dataset folder to split."
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Split file (JSON) to write.",
)
@click.option(
    "--fractions",
    default="0.6,0.2,0.2",
    show_default=True,
    callback=_fractions,
    help="Train, val, test fractions of patients.",
)
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option(
    "--max-labelled",
    default=None,
    type=click.IntRange(0),
    help="Keep labels on at most N train slices; the rest train unlabelled.",
)
@click.option(
    "--label-fraction",
    default=None,
    type=click.FloatRange(0, 1),
    help="Keep labels on this fraction of the train slices; the rest train unlabelled.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing split file.")
@data_options
def split(
    data,
    output,
    fractions,
    seed,
    max_labelled,
    label_fraction,
    overwrite,
    mask_values,
    patient_pattern,
    masks_subdir,
    lungs_subdir,
):
    """Split a dataset train/val/test by patient (by slice, with a warning, without ids).

    Example: stitchnet-tf split -d data/demo/labelled -o data/demo/split.json --seed 0
    """
    from stitchnet_tf.data.preprocess import check_samples
    from stitchnet_tf.data.splits import check_split_output, split_dataset, withhold_labels

    check_split_output(output, data, overwrite)
    dataset = _discover(data, mask_values, patient_pattern, masks_subdir, lungs_subdir)
    check_samples(dataset, dataset.samples)  # a corrupt slice is named now, not at training
    result = split_dataset(dataset, fractions, seed, warn=_warn)
    if max_labelled is not None or label_fraction is not None:
        result = withhold_labels(result, dataset, max_labelled, label_fraction, seed)
    result.save(output)
    counts = ", ".join(f"{p} {len(result.part(p))}" for p in ("train", "val", "test"))
    unlabelled = f" ({len(result.unlabelled)} train slices unlabelled)" if result.unlabelled else ""
    click.echo(f"split by {result.by}: {counts}{unlabelled} -> {output}")


@cli.command()
@click.option(
    "--labelled",
    "-l",
    required=True,
    type=click.Path(path_type=Path),
    help="Labelled dataset folder (images/ + masks/).",
)
@click.option(
    "--unlabelled",
    "-u",
    default=None,
    type=click.Path(path_type=Path),
    help="Unlabelled dataset folder (StitchNet only).",
)
@click.option(
    "--model",
    "model_name",
    default="stitchnet",
    show_default=True,
    type=click.Choice(["stitchnet", "unet", "segnet"]),
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder; rerun the same command on it to resume.",
)
@click.option(
    "--preset",
    type=click.Choice(["auto", "cpu", "paper"]),
    default="auto",
    show_default=True,
    help="Size, widths and budget: cpu (128 px, backbone α 0.5, 12 x 100 steps of 8, about an "
    "hour on 2 CPU cores), paper (352 px, the paper's widths, 80 x 100 steps); auto: paper "
    "with a GPU, else cpu. Options given explicitly override it.",
)
@click.option(
    "--size", default=None, type=int, callback=_model_size, help="Model size (multiple of 32)."
)
@click.option("--epochs", default=None, type=click.IntRange(1))
@click.option("--steps-per-epoch", default=None, type=click.IntRange(1))
@click.option("--batch-size", default=None, type=click.IntRange(1))
@click.option(
    "--labelled-per-batch",
    default=None,
    type=click.IntRange(1),
    help="Labelled slices in each batch (default: half when unlabelled data is given).",
)
@click.option(
    "--learning-rate",
    default=1e-3,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Peak learning rate.",
)
@click.option(
    "--optimizer",
    "optimizer_name",
    type=click.Choice(["adamw", "adam"]),
    default="adamw",
    show_default=True,
    help="AdamW (decoupled weight decay, not on biases and norms) or Adam.",
)
@click.option(
    "--weight-decay",
    default=1e-2,
    show_default=True,
    type=click.FloatRange(0),
    help="AdamW's weight decay.",
)
@click.option(
    "--ema",
    default=None,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Keep an exponential moving average of the weights with this momentum (e.g. 0.99); "
    "validation and best.keras use it.",
)
@click.option(
    "--lr-schedule",
    default="cosine",
    show_default=True,
    type=click.Choice(["cosine", "constant"]),
    help="cosine: 5% linear warm-up, then cosine decay to 0 at the last step.",
)
@click.option(
    "--global-clipnorm",
    default=None,
    type=click.FloatRange(0),
    help=f"StitchNet: clip the global gradient norm (0 = off; default {DEFAULT_GLOBAL_CLIPNORM}).",
)
@click.option(
    "--clipnorm",
    default=0.0,
    show_default=True,
    help="Per-variable gradient norm clip (0 = off; the paper: 1.0).",
)
@click.option(
    "--clipvalue", default=0.0, show_default=True, help="Gradient value clip (0 = off; paper: 0.5)."
)
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option(
    "--split",
    "split_file",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Split file from `split` (default: split on the fly).",
)
@click.option(
    "--fractions",
    default="0.6,0.2,0.2",
    show_default=True,
    callback=_fractions,
    help="Train/val/test fractions when splitting on the fly.",
)
@click.option(
    "--max-labelled",
    default=None,
    type=click.IntRange(0),
    help="Keep labels on at most N train slices; the rest train unlabelled.",
)
@click.option(
    "--label-fraction",
    default=None,
    type=click.FloatRange(0, 1),
    help="Keep labels on this fraction of the train slices.",
)
@click.option(
    "--mixed-precision",
    is_flag=True,
    help="mixed_float16 on GPU, mixed_bfloat16 on CPU (heads stay float32).",
)
@click.option("--cache", is_flag=True, help="Cache preprocessed slices in memory.")
@click.option(
    "--augmentation",
    type=click.Choice(["recipe", "paper", "none"]),
    default="recipe",
    show_default=True,
    help="recipe: flips, 90° turns, scale 0.85-1.25, ±15°, zooms onto lesions, intensity; "
    "paper: the paper's crops, flips and 90° turns.",
)
@click.option("--no-augment", is_flag=True, help="No augmentation (as --augmentation none).")
@intensity_option
@click.option(
    "--width",
    default=None,
    type=click.FloatRange(0, min_open=True),
    help="Model width multiplier (default: the preset's, else StitchNet 0.5, U-Net and "
    "SegNet 1.0).",
)
@click.option(
    "--backbone-alpha",
    default=None,
    type=click.FloatRange(0, min_open=True),
    help="MobileNetV2 width multiplier (StitchNet, U-Net; default: the preset's).",
)
@click.option(
    "--likelihood",
    default="exact",
    show_default=True,
    type=click.Choice(["exact", "jensen"]),
    help="StitchNet reconstruction term.",
)
@click.option("--kl", default="analytic", show_default=True, type=click.Choice(["analytic", "mc"]))
@click.option(
    "--supervised",
    default=SUPERVISED[0],
    show_default=True,
    type=click.Choice(SUPERVISED),
    help="Supervised term of every model: set cross-entropy + soft Dice, or focal (the paper's).",
)
@click.option(
    "--supervised-weight",
    default=1.0,
    show_default=True,
    help="StitchNet: weight of the supervised term (the authors: 100 with --supervised focal).",
)
@click.option(
    "--generative-weight",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="StitchNet with head skips: weight of the z-only p(y | z) term that makes samples "
    "follow z (docs/DESIGN.md 7.15; 0: off, the default).",
)
@click.option("--focal-gamma", default=2.0, show_default=True, help="Focal loss gamma.")
@click.option(
    "--head-skips",
    default=None,
    type=click.IntRange(0),
    help="StitchNet: channels of the deterministic backbone skip into the head "
    f"(0 = none, the paper; default {DEFAULT_HEAD_SKIPS}).",
)
@click.option(
    "--norm",
    default=NORMS[0],
    show_default=True,
    type=click.Choice(NORMS),
    help="StitchNet: normalisation in the ladder and head (batch: the paper's).",
)
@click.option("--kl-warmup-steps", default=0, show_default=True, type=click.IntRange(0))
@click.option("--free-bits", default=0.0, show_default=True, help="Per-level free bits (nats).")
@click.option(
    "--decision",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "posterior", "prior"]),
    help="StitchNet decision rule (prior: softmax of pi; posterior: pi_k Beta_k(x)); auto: the "
    "better of the two on the val slices, chosen with the best epoch.",
)
@click.option(
    "--style-pool",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Predict StitchNet styles at 1/N resolution.",
)
@click.option(
    "--unlabelled-patient-pattern",
    default=None,
    metavar="REGEX",
    help="Patient regex for the unlabelled folder.",
)
@click.option("--overwrite", is_flag=True, help="Start over in a non-empty run folder.")
@click.option(
    "--eager",
    is_flag=True,
    help="Run the train step eagerly (no graph tracing; for debugging and tiny runs).",
)
@click.option(
    "--strategy",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "one-device", "mirrored", "multi-worker"]),
    help="tf.distribute strategy; --batch-size is the global batch (see docs/DISTRIBUTED.md).",
)
@click.option(
    "--per-replica-batchnorm",
    is_flag=True,
    help="With several replicas, normalise with each replica's batch statistics (faster).",
)
@click.option(
    "--recalibration-steps",
    type=click.IntRange(min=0),
    default=RECALIBRATION_STEPS,
    show_default=True,
    help="Batches over which BatchNorm statistics are re-estimated before each validation "
    "(0: keep the moving averages).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@data_options
def train(
    labelled,
    unlabelled,
    model_name,
    output,
    preset,
    size,
    epochs,
    steps_per_epoch,
    batch_size,
    labelled_per_batch,
    learning_rate,
    optimizer_name,
    weight_decay,
    ema,
    lr_schedule,
    global_clipnorm,
    clipnorm,
    clipvalue,
    seed,
    split_file,
    fractions,
    max_labelled,
    label_fraction,
    mixed_precision,
    cache,
    augmentation,
    no_augment,
    intensity,
    width,
    backbone_alpha,
    likelihood,
    kl,
    supervised,
    supervised_weight,
    generative_weight,
    focal_gamma,
    head_skips,
    norm,
    kl_warmup_steps,
    free_bits,
    decision,
    style_pool,
    unlabelled_patient_pattern,
    overwrite,
    eager,
    strategy,
    per_replica_batchnorm,
    recalibration_steps,
    quiet,
    mask_values,
    patient_pattern,
    masks_subdir,
    lungs_subdir,
):
    """Train StitchNet (labelled + unlabelled) or a baseline (labelled only).

    Writes a run folder: config.json, split.json, best.keras and last.keras, state.json,
    log.csv, tensorboard/, curves.png. The best epoch is chosen by the mean lesion Dice on the
    split's validation part. Rerunning the same command resumes after the last finished epoch.

    Example: stitchnet-tf train --labelled data/demo/labelled --unlabelled data/demo/unlabelled
    --size 128 --epochs 5 --output runs/demo
    """
    from stitchnet_tf.training import TrainConfig, TrainingError, preset_options, resolve_preset
    from stitchnet_tf.training import train as run_training

    preset, why = resolve_preset(preset)
    budget, preset_model = preset_options(preset, model_name)
    size = budget["size"] if size is None else size
    epochs = budget["epochs"] if epochs is None else epochs
    steps_per_epoch = budget["steps_per_epoch"] if steps_per_epoch is None else steps_per_epoch
    batch_size = budget["batch_size"] if batch_size is None else batch_size
    given = {"width": width}
    given["backbone_alpha" if model_name == "stitchnet" else "alpha"] = backbone_alpha
    given = {k: v for k, v in given.items() if v is not None}
    click.echo(
        f"preset {preset} ({why}): {size} px, {epochs} x {steps_per_epoch} steps of "
        f"{batch_size}" + "".join(f", {k} {v}" for k, v in (preset_model | given).items())
    )

    if model_name == "stitchnet":
        options = dict(
            likelihood=likelihood,
            kl=kl,
            supervised=supervised,
            supervised_weight=supervised_weight,
            generative_weight=generative_weight,
            focal_gamma=focal_gamma,
            kl_warmup_steps=kl_warmup_steps,
            free_bits=free_bits,
            decision="prior" if decision == "auto" else decision,
            style_pool=style_pool,
            norm=norm,
        )
        if head_skips is not None:
            options["head_skips"] = head_skips
    else:
        options = dict(loss=supervised, focal_gamma=focal_gamma)
    options |= preset_model | given
    config = TrainConfig(
        labelled=str(labelled),
        unlabelled=None if unlabelled is None else str(unlabelled),
        output=str(output),
        model=model_name,
        size=size,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        labelled_per_batch=labelled_per_batch,
        learning_rate=learning_rate,
        optimizer=optimizer_name,
        weight_decay=weight_decay,
        ema=ema,
        lr_schedule=lr_schedule,
        global_clipnorm=global_clipnorm,
        clipnorm=clipnorm or None,
        clipvalue=clipvalue or None,
        seed=seed,
        split=None if split_file is None else str(split_file),
        fractions=fractions,
        max_labelled=max_labelled,
        label_fraction=label_fraction,
        mixed_precision=mixed_precision,
        augment=not no_augment,
        augmentation=augmentation,
        intensity=intensity,
        cache=cache,
        mask_values=mask_values,
        patient_pattern=patient_pattern,
        unlabelled_patient_pattern=unlabelled_patient_pattern,
        masks_subdir=masks_subdir,
        lungs_subdir=lungs_subdir,
        model_options=options,
        preset=preset,
        choose_decision=decision == "auto",
        run_eagerly=eager,
        recalibration_steps=recalibration_steps,
        strategy=strategy,
        sync_batchnorm=not per_replica_batchnorm,
    )
    try:
        summary = run_training(
            config, overwrite=overwrite, verbose=0 if quiet else "auto", log=click.echo, warn=_warn
        )
    except TrainingError as e:
        raise DataError(output, str(e)) from None
    if summary["run"] is None:  # a multi-worker run's non-chief worker
        click.echo(f"worker done: {summary['epochs_done']} epochs (the chief wrote the run)")
        return
    best = summary["best_val_mean_lesion_dice"]
    click.echo(
        f"trained {summary['epochs_done']} epochs in {summary['seconds'] / 60:.1f} min; best "
        f"epoch {summary['best_epoch']} (val mean lesion Dice {best:.4f}) -> {summary['run']}"
    )


def _model_options(f):
    @click.option(
        "--model",
        "-m",
        "model_path",
        required=True,
        type=click.Path(path_type=Path),
        help="Run folder (uses best.keras), a .keras file, or an export (SavedModel folder, "
        ".tflite file).",
    )
    @click.option(
        "--size",
        default=None,
        type=int,
        callback=_model_size,
        help="Model size (default: the run's config.json).",
    )
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


@cli.command()
@_model_options
@click.option(
    "--data", "-d", required=True, type=click.Path(path_type=Path), help="Labelled dataset folder."
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for metrics.md/.csv/.json and metrics_per_image.csv.",
)
@click.option(
    "--split",
    "split_file",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Split file; default: all slices (or the run's own split "
    "when the run was trained on --data).",
)
@click.option(
    "--part",
    default=None,
    type=click.Choice(["train", "val", "test"]),
    help="Part of the split to score (default test).",
)
@click.option(
    "--absent",
    default="exclude",
    show_default=True,
    type=click.Choice(["exclude", "zero", "one"]),
    help="Images where a class is absent from the truth: left out of that class's "
    "mean, scored 0 (authors' code), or 1 when nothing is predicted either.",
)
@click.option(
    "--samples",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="StitchNet: average this many posterior samples (0 = posterior mean).",
)
@click.option(
    "--decision",
    default=None,
    type=click.Choice(["posterior", "prior"]),
    help="StitchNet decision rule (default: the model's).",
)
@tta_option
@click.option(
    "--overwrite", is_flag=True, help="Replace an earlier evaluation in the output folder."
)
@data_options
def evaluate(
    model_path,
    size,
    data,
    output,
    split_file,
    part,
    absent,
    samples,
    decision,
    tta,
    overwrite,
    mask_values,
    patient_pattern,
    masks_subdir,
    lungs_subdir,
):
    """Score a model on labelled slices: IoU, F1 (Dice), recall, precision per class (Table 1).

    Predictions are mapped back onto each original slice; binary lesion masks are scored as
    lesion vs no lesion.

    Example: stitchnet-tf evaluate --model runs/demo --data data/demo/labelled -o runs/demo/eval
    """
    from stitchnet_tf.evaluation import evaluate as run_evaluation

    result = run_evaluation(
        model_path,
        data,
        output,
        split=split_file,
        part=part,
        size=size,
        absent=absent,
        samples=samples,
        decision=decision,
        tta=tta,
        mask_values=mask_values,
        patient_pattern=patient_pattern,
        masks_subdir=masks_subdir,
        lungs_subdir=lungs_subdir,
        overwrite=overwrite,
        log=click.echo,
    )
    click.echo((Path(output) / "metrics.md").read_text())
    click.echo(f"scored {result['slices']} slices ({result['scheme']}) -> {output}")


@cli.command()
@_model_options
@click.option(
    "--input",
    "-i",
    "input_",
    required=True,
    type=click.Path(path_type=Path),
    help="A slice, a NIfTI volume, a DICOM file or series folder, or a folder of them.",
)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--uncertainty", is_flag=True, help="Also write predictive-entropy maps.")
@click.option(
    "--samples",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="StitchNet: average this many posterior samples (0 = posterior mean).",
)
@click.option("--decision", default=None, type=click.Choice(["posterior", "prior"]))
@tta_option
@click.option("--window-level", default=-600.0, show_default=True)
@click.option(
    "--window-width", default=1500.0, show_default=True, type=click.FloatRange(0, min_open=True)
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def predict(
    model_path,
    size,
    input_,
    output,
    uncertainty,
    samples,
    decision,
    tta,
    window_level,
    window_width,
    overwrite,
):
    """Segment new slices or volumes: label masks in the input's geometry, overlays, burden CSV.

    Example: stitchnet-tf predict --model runs/demo --input data/demo/unlabelled -o preds
    """
    from stitchnet_tf.data.io import Window
    from stitchnet_tf.predict import predict_path

    result = predict_path(
        model_path,
        input_,
        output,
        size=size,
        samples=samples,
        decision=decision,
        tta=tta,
        uncertainty=uncertainty,
        window=Window(window_level, window_width),
        overwrite=overwrite,
    )
    click.echo(
        f"segmented {result['slices']} slices ({result['volumes']} volumes) -> {output}; "
        f"lesion burden in {result['burden']}"
    )


@cli.command()
@_model_options
@click.option("--input", "-i", "input_", required=True, type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True)
def styles(model_path, size, input_, output, overwrite):
    """Show StitchNet's four style images and the stitched reconstruction (paper Fig. 6b).

    Example: stitchnet-tf styles --model runs/demo --input data/demo/labelled/images -o styles
    """
    from stitchnet_tf.figures import styles_figures

    result = styles_figures(model_path, input_, output, size=size, overwrite=overwrite)
    mae = result["lung_mae_mean"]
    error = "" if mae is None else f"; stitched reconstruction MAE inside the lung {mae:.3f}"
    click.echo(f"wrote {result['figures']} style figures -> {output}{error}")


@cli.command()
@_model_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", default=8, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option(
    "--temperature",
    default=SAMPLE_TEMPERATURE,
    show_default=True,
    type=click.FloatRange(0, 2, min_open=True),
    help="Scale of every prior σ (below 1: more typical, less varied slices).",
)
@click.option("--overwrite", is_flag=True)
def sample(model_path, size, output, n, seed, temperature, overwrite):
    """Draw new slices with their segmentations from StitchNet's prior.

    Example: stitchnet-tf sample --model runs/demo --n 8 -o samples
    """
    from stitchnet_tf.figures import sample_figure

    sample_figure(
        model_path, output, n=n, size=size, seed=seed, temperature=temperature, overwrite=overwrite
    )
    click.echo(f"drew {n} samples at temperature {temperature:g} -> {output}")


@cli.command()
@click.option(
    "--output",
    "-o",
    default="demo",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option(
    "--size",
    default=64,
    show_default=True,
    callback=_model_size,
    help="Model size (multiple of 32).",
)
@click.option("--epochs", default=6, show_default=True, type=click.IntRange(1))
@click.option("--steps-per-epoch", default=40, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--overwrite", is_flag=True)
def demo(output, size, epochs, steps_per_epoch, seed, overwrite):
    """The main job on the embedded default: synthetic CT, StitchNet vs U-Net, Table 1.

    Generates data, trains StitchNet (labelled + unlabelled) and the U-Net (labelled only)
    briefly, evaluates both on held-out patients and draws StitchNet's styles and samples.

    Example: stitchnet-tf demo --output demo
    """
    from stitchnet_tf.demo import run_demo

    result = run_demo(
        output,
        size=size,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
        overwrite=overwrite,
        log=click.echo,
    )
    click.echo((Path(result["report"])).read_text())
    click.echo(f"demo finished in {result['seconds'] / 60:.1f} min; report: {result['report']}")


@cli.command()
@_model_options
@click.option(
    "--format",
    "fmt",
    default="savedmodel",
    show_default=True,
    type=click.Choice(["savedmodel", "tflite"]),
)
@click.option(
    "--quantize",
    default="none",
    show_default=True,
    type=click.Choice(["none", "float16", "dynamic", "int8"]),
    help="TFLite weights/activations (int8 calibrates on --data or the run's training data).",
)
@click.option(
    "--output",
    "-o",
    default=None,
    type=click.Path(path_type=Path),
    help="SavedModel: the model's base folder (default saved_models/<run>); "
    "TFLite: the .tflite file (default saved_models/<run>-<quantize>.tflite).",
)
@click.option(
    "--version",
    "version_",
    default=None,
    type=click.IntRange(1),
    help="SavedModel version folder (default: the next free number).",
)
@click.option(
    "--data",
    "-d",
    default=None,
    type=click.Path(path_type=Path),
    help="Dataset folder of representative slices for int8.",
)
@click.option(
    "--count",
    default=100,
    show_default=True,
    type=click.IntRange(1),
    help="Representative slices for int8.",
)
@click.option("--decision", default=None, type=click.Choice(["posterior", "prior"]))
@click.option("--no-bytes", is_flag=True, help="SavedModel: no encoded-image signature.")
@click.option("--overwrite", is_flag=True, help="Replace an existing version or file.")
@tta_option
def export(
    model_path,
    size,
    fmt,
    quantize,
    output,
    version_,
    data,
    count,
    decision,
    no_bytes,
    overwrite,
    tta,
):
    """Export the segmentation path: SavedModel (TensorFlow Serving layout) or TFLite.

    SavedModel signatures: serving_default (image [B,S,S,1] in [0,1], preprocessed),
    serving_lung (image + lung field) and serving_bytes (encoded PNG/JPEG, preprocessing
    in the graph). Written atomically.

    Example: stitchnet-tf export --model runs/demo --format tflite --quantize float16
    """
    from stitchnet_tf.export import export as run_export

    result = run_export(
        model_path,
        fmt,
        quantize=quantize,
        output=output,
        version=version_,
        size=size,
        data=data,
        count=count,
        decision=decision,
        bytes_signature=not no_bytes,
        overwrite=overwrite,
        tta=tta,
    )
    click.echo(
        f"exported {fmt}{'' if fmt == 'savedmodel' else ' (' + quantize + ')'} at "
        f"{result['size']} px -> {result['path']} ({result['bytes'] / 1e6:.1f} MB)"
    )


def main() -> None:
    """Console entry point."""
    cli(prog_name="stitchnet-tf")


if __name__ == "__main__":
    main()
