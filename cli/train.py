"""Training commands: `train` and the end-to-end `demo`."""

from __future__ import annotations

from pathlib import Path

import click

from stitchnet_tf.errors import DataError
from stitchnet_tf.options import (
    AUGMENTATIONS,
    DECISIONS,
    DEFAULT_GLOBAL_CLIPNORM,
    DEFAULT_HEAD_SKIPS,
    KL_ESTIMATORS,
    LIKELIHOODS,
    LR_SCHEDULES,
    MODELS,
    NORMS,
    OPTIMIZERS,
    PRESETS,
    RECALIBRATION_STEPS,
    STITCHNET_DEFAULTS,
    STRATEGIES,
    STYLE_MODES,
    SUPERVISED,
    TRAIN_DEFAULTS,
    model_options,
)
from stitchnet_tf_cli import console
from stitchnet_tf_cli.options import (
    SEED,
    check_model_size,
    consistency_options,
    data_options,
    intensity_option,
    split_options,
    warn,
)


@click.command()
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
    default=MODELS[0],
    show_default=True,
    type=click.Choice(MODELS),
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
    type=click.Choice(["auto", *PRESETS]),
    default="auto",
    show_default=True,
    help="Size, widths and budget: cpu (128 px, backbone α 0.5, 12 x 100 steps of 8, about an "
    "hour on 2 CPU cores), paper (352 px, the paper's widths, 80 x 100 steps); auto: paper "
    "with a GPU, else cpu. Options given explicitly override it.",
)
@click.option(
    "--size", default=None, type=int, callback=check_model_size, help="Model size (multiple of 32)."
)
@click.option("--epochs", default=None, type=click.IntRange(1))
@click.option("--steps-per-epoch", default=None, type=click.IntRange(1))
@click.option("--batch-size", default=None, type=click.IntRange(1))
@click.option(
    "--unlabelled-per-batch",
    default=None,
    type=click.IntRange(0),
    help="Unlabelled slices added to each batch of --batch-size labelled ones (default: as "
    "many; 0: none, labelled only), so that runs with and without unlabelled data see the "
    "same labelled slices.",
)
@click.option(
    "--learning-rate",
    default=TRAIN_DEFAULTS["learning_rate"],
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Peak learning rate.",
)
@click.option(
    "--optimizer",
    "optimizer_name",
    type=click.Choice(OPTIMIZERS),
    default=TRAIN_DEFAULTS["optimizer"],
    show_default=True,
    help="AdamW (decoupled weight decay, not on biases and norms) or Adam.",
)
@click.option(
    "--weight-decay",
    default=TRAIN_DEFAULTS["weight_decay"],
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
    default=TRAIN_DEFAULTS["lr_schedule"],
    show_default=True,
    type=click.Choice(LR_SCHEDULES),
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
@split_options
@click.option(
    "--mixed-precision",
    is_flag=True,
    help="mixed_float16 on GPU, mixed_bfloat16 on CPU (heads stay float32).",
)
@click.option("--cache", is_flag=True, help="Cache preprocessed slices in memory.")
@click.option(
    "--augmentation",
    type=click.Choice(AUGMENTATIONS),
    default=TRAIN_DEFAULTS["augmentation"],
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
    default=STITCHNET_DEFAULTS["likelihood"],
    show_default=True,
    type=click.Choice(LIKELIHOODS),
    help="StitchNet reconstruction term.",
)
@click.option(
    "--kl", default=STITCHNET_DEFAULTS["kl"], show_default=True, type=click.Choice(KL_ESTIMATORS)
)
@click.option(
    "--supervised",
    default=STITCHNET_DEFAULTS["supervised"],
    show_default=True,
    type=click.Choice(SUPERVISED),
    help="Supervised term of every model: set cross-entropy + soft Dice, or focal (the paper's).",
)
@click.option(
    "--supervised-weight",
    default=STITCHNET_DEFAULTS["supervised_weight"],
    show_default=True,
    help="StitchNet: weight of the supervised term (the authors: 100 with --supervised focal).",
)
@click.option(
    "--generative-weight",
    default=STITCHNET_DEFAULTS["generative_weight"],
    show_default=True,
    type=click.FloatRange(0),
    help="StitchNet with head skips: weight of the z-only p(y | z) term that makes samples "
    "follow z (docs/DESIGN.md 7.15; 0: off, the default).",
)
@click.option(
    "--focal-gamma",
    default=STITCHNET_DEFAULTS["focal_gamma"],
    show_default=True,
    help="Focal loss gamma.",
)
@click.option(
    "--head-skips",
    default=None,
    type=click.IntRange(0),
    help="StitchNet: channels of the deterministic backbone skip into the head "
    f"(0 = none, the paper; default {DEFAULT_HEAD_SKIPS}).",
)
@click.option(
    "--norm",
    default=STITCHNET_DEFAULTS["norm"],
    show_default=True,
    type=click.Choice(NORMS),
    help="StitchNet: normalisation in the ladder and head (batch: the paper's).",
)
@click.option(
    "--kl-warmup-steps",
    default=STITCHNET_DEFAULTS["kl_warmup_steps"],
    show_default=True,
    type=click.IntRange(0),
)
@click.option(
    "--free-bits",
    default=STITCHNET_DEFAULTS["free_bits"],
    show_default=True,
    help="Per-level free bits (nats).",
)
@click.option(
    "--decision",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", *DECISIONS]),
    help="StitchNet decision rule (prior: softmax of pi; posterior: pi_k Beta_k(x)); auto: the "
    "better of the two on the val slices, chosen with the best epoch, together with a lesion "
    "offset (every model: lesion probabilities x e^b, b in -2..2, corrects under- or "
    "over-segmentation; prior/posterior: no offset).",
)
@click.option(
    "--style-pool",
    default=STITCHNET_DEFAULTS["style_pool"],
    show_default=True,
    type=click.IntRange(1),
    help="Predict StitchNet styles at 1/N resolution.",
)
@click.option(
    "--style-mode",
    default=STITCHNET_DEFAULTS["style_mode"],
    show_default=True,
    type=click.Choice(STYLE_MODES),
    help="StitchNet styles: per pixel (the paper), or one Beta per class per image (the styles "
    "cannot copy the image, so unlabelled pixels inform the segmentation).",
)
@click.option(
    "--ordered-styles",
    is_flag=True,
    help="StitchNet: style means increasing from healthy to GGO to consolidation.",
)
@consistency_options
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
    default=TRAIN_DEFAULTS["strategy"],
    show_default=True,
    type=click.Choice(STRATEGIES),
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
@click.option(
    "--quiet",
    is_flag=True,
    help="No progress bars (`stitchnet-tf -q train ...` also hides the informational lines).",
)
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
    unlabelled_per_batch,
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
    style_mode,
    ordered_styles,
    consistency,
    unlabelled_patient_pattern,
    overwrite,
    eager,
    strategy,
    per_replica_batchnorm,
    recalibration_steps,
    quiet,
    reading,
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
    given = model_options(model_name, {"width": width, "backbone_alpha": backbone_alpha})
    console.info(
        f"preset {preset} ({why}): {size} px, {epochs} x {steps_per_epoch} steps of "
        f"{batch_size}" + "".join(f", {k} {v}" for k, v in (preset_model | given).items())
    )

    options = model_options(
        model_name,
        dict(
            likelihood=likelihood,
            kl=kl,
            supervised=supervised,
            supervised_weight=supervised_weight,
            generative_weight=generative_weight,
            focal_gamma=focal_gamma,
            kl_warmup_steps=kl_warmup_steps,
            free_bits=free_bits,
            decision=None if decision == "auto" else decision,
            style_pool=style_pool,
            style_mode=style_mode,
            ordered_styles=ordered_styles or None,
            **consistency,
            norm=norm,
            head_skips=head_skips,
        ),
    )
    options |= preset_model | given
    spec = reading(labelled)
    config = TrainConfig(
        labelled=str(labelled),
        unlabelled=None if unlabelled is None else str(unlabelled),
        output=str(output),
        model=model_name,
        size=size,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        unlabelled_per_batch=unlabelled_per_batch,
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
        mask_values=spec.mask_values,
        patient_pattern=spec.patient_pattern,
        unlabelled_patient_pattern=unlabelled_patient_pattern,
        masks_subdir=spec.masks_subdir,
        lungs_subdir=spec.lungs_subdir,
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
            config,
            overwrite=overwrite,
            verbose=0 if quiet or console.is_quiet() else "auto",
            log=console.info,
            warn=warn,
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


@click.command()
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
    callback=check_model_size,
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
        log=console.info,
        verbose=0 if console.is_quiet() else 2,
    )
    click.echo((Path(result["report"])).read_text())
    click.echo(f"demo finished in {result['seconds'] / 60:.1f} min; report: {result['report']}")
