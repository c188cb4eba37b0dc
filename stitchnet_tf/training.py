"""Training runs: data, split, model, callbacks, and a run folder (`run.Run`) that can be
resumed: rerunning the same command on the same folder continues from the last completed epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from stitchnet_tf import __version__
from stitchnet_tf.data.classes import CON, GGO, bits
from stitchnet_tf.data.datasets import Dataset
from stitchnet_tf.data.intensity import INTENSITY_MODES
from stitchnet_tf.data.pipeline import (
    SliceLoader,
    pipeline_errors,
    slice_dataset,
    training_batches,
)
from stitchnet_tf.data.preprocess import check_model_size, check_samples
from stitchnet_tf.data.splits import Split, split_dataset, withhold_labels
from stitchnet_tf.errors import DataError, TrainingError
from stitchnet_tf.fileio import (
    check_apart,
    check_parents,
    save_figure,
    sweep_leftovers,
    temp_prefix,
)
from stitchnet_tf.options import (
    LR_SCHEDULES,
    MODELS,
    OPTIMIZERS,
    PRESETS,
    model_options,
)
from stitchnet_tf.run import Run, TrainConfig, run_inputs  # noqa: F401 (TrainConfig re-exported)

#: Tests only: the process kills itself (SIGKILL) right after saving this epoch's checkpoint.
KILL_AFTER_EPOCH_ENV = "STITCHNET_TF_TEST_KILL_AFTER_EPOCH"

#: Train steps timed for the duration estimate, after the first (which traces the graph).
ESTIMATE_STEPS = 5


def build_model(
    name: str,
    options: dict,
    clipnorm=None,
    clipvalue=None,
    seed: int = 0,
    global_clipnorm=None,
    intensity: str = "none",
):
    """A fresh, uncompiled model by name: `stitchnet`, `unet` or `segnet`; `intensity`: the
    preprocessing it is trained with (kept in its config)."""
    options = options | {"intensity": intensity}
    if name == "stitchnet":
        from stitchnet_tf.models.stitchnet import StitchNet

        if global_clipnorm is not None:
            options = options | {"global_clipnorm": global_clipnorm or None}
        return StitchNet(clipnorm=clipnorm, clipvalue=clipvalue, seed=seed, **options)
    if name in ("unet", "segnet"):
        from stitchnet_tf.models import baselines

        cls = baselines.UNet if name == "unet" else baselines.SegNet
        if global_clipnorm is not None:
            options = options | {"global_clipnorm": global_clipnorm or None}
        return cls(clipnorm=clipnorm, clipvalue=clipvalue, seed=seed, **options)
    raise DataError(None, f"unknown model {name!r}: use one of {', '.join(MODELS)}")


def resolve_preset(name: str | None = None) -> tuple[str, str]:
    """(preset, why): `name` if given, else `paper` with a GPU and `cpu` without."""
    if name not in (None, "auto"):
        if name not in PRESETS:
            raise DataError(None, f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
        return name, "asked for"
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "paper", "a GPU was found"
    return "cpu", "no GPU was found"


def preset_options(name: str, model: str) -> tuple[dict, dict]:
    """A preset as (TrainConfig fields, model options) for `model`."""
    values = dict(PRESETS[name])
    widths = {k: values.pop(k) for k in ("width", "backbone_alpha") if k in values}
    return values, model_options(model, widths)


def learning_rate_schedule(config: TrainConfig):
    """The learning rate: constant, or a linear warm-up to `learning_rate` over
    `warmup_steps` (default 5% of the budget) and a cosine decay to 0 at the last step."""
    import keras

    if config.lr_schedule not in LR_SCHEDULES:
        raise DataError(None, f"unknown learning-rate schedule {config.lr_schedule!r}")
    if config.lr_schedule == "constant":
        return config.learning_rate
    total = config.epochs * config.steps_per_epoch
    warmup = config.warmup_steps if config.warmup_steps is not None else total // 20
    warmup = min(max(0, warmup), total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else config.learning_rate,
        decay_steps=total - warmup,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


#: An epoch with a larger share of steps skipped for non-finite gradients stops training.
MAX_SKIPPED = 0.5


def make_optimizer(config: TrainConfig):
    """The run's optimizer: AdamW (default) or Adam, fused (`models.optimizers`), on
    `learning_rate_schedule(config)`, with an EMA of the weights when `config.ema` is set
    (used for validation and the checkpoints)."""
    from stitchnet_tf.models.optimizers import FusedAdam, FusedAdamW

    if config.optimizer not in OPTIMIZERS:
        raise DataError(None, f"unknown optimizer {config.optimizer!r}: use adamw or adam")
    if config.weight_decay < 0:
        raise DataError(None, f"--weight-decay must be >= 0, got {config.weight_decay}")
    if config.ema is not None and not 0 < config.ema < 1:
        raise DataError(None, f"--ema must be in (0, 1), got {config.ema}")
    ema = dict(use_ema=config.ema is not None, ema_momentum=config.ema or 0.99)
    if config.optimizer == "adam":
        return FusedAdam(learning_rate_schedule(config), **ema)
    optimizer = FusedAdamW(learning_rate_schedule(config), weight_decay=config.weight_decay, **ema)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "gain"])
    return optimizer


class _EMASwap:
    """Puts the optimizer's EMA weights into the model (and back), if it keeps them."""

    def __init__(self, model):
        import keras

        optimizer = getattr(model, "optimizer", None)
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        self.on = bool(getattr(optimizer, "use_ema", False))
        if self.on:
            self.swapper = keras.callbacks.SwapEMAWeights()
            self.swapper.set_model(model)

    def __enter__(self):
        if self.on:
            self.swapper._swap_variables()
        return self

    def __exit__(self, *exc):
        if self.on:
            self.swapper._swap_variables()


def _versions() -> dict:
    import keras
    import tensorflow as tf

    return {
        "stitchnet_tf": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


def _monitor_classes(dataset: Dataset) -> str:
    """`ggo_con` when the labels tell GGO from consolidation, else `lesion`."""
    singles = {bits(GGO), bits(CON)}
    return "ggo_con" if singles & set(dataset.mask_map.mapping.values()) else "lesion"


def _make_callbacks(
    run: Path,
    state: dict,
    monitor: str,
    log: Callable[[str], None],
    batches,
    val_data,
    recalibration_steps: int,
    chief: bool = True,
    val_set: Dataset | None = None,
    size: int | None = None,
    choose_decision: bool = False,
    intensity: str = "none",
):
    """The run's callbacks. With `val_set` (the val slices) and `size`, the best epoch is the
    one with the highest per-image, lung-masked mean lesion Dice of `evaluation.SliceScorer`
    (what `evaluate` reports); without, the pooled Keras-metric Dice of `val_data`."""
    import keras
    import numpy as np

    from stitchnet_tf import distribute
    from stitchnet_tf.models.base import recalibrate_batchnorm

    scorer = None
    if val_set is not None and size is not None:
        from stitchnet_tf.evaluation import SliceScorer

        # reads and prepares the val slices once
        scorer = SliceScorer(val_set, size, intensity=intensity)

    def per_image_scores(model) -> dict[str, float]:
        """Val scores. With `choose_decision` every decision rule (StitchNet) and lesion offset
        (`models.base.LESION_OFFSETS`, any model) is scored; the best pair is kept as the
        model's `decision` and `lesion_offset` (saved with it) and logged as `val_decision`
        (0 prior, 1 posterior) and `val_lesion_offset`; ties keep the smaller offset."""
        out: dict = {}
        if choose_decision:
            scores = choose_rule_and_offset(model, out)
        else:
            scores = scorer.score(model)
        out |= {f"val_dice_{c}_image": v for c, v in scores["lesion_dice"].items()}
        out["val_mean_lesion_dice"] = scores["mean_lesion_dice"]
        return {k: float("nan") if v is None else float(v) for k, v in out.items()}

    def choose_rule_and_offset(model, out: dict) -> dict:
        """Sets the best val pair on `model`, logs it into `out`; returns its scores."""
        from stitchnet_tf.options import DECISIONS

        chosen = scorer.choose_calibration(model)
        for rule, scores in chosen["plain"].items():
            if rule is not None:
                out[f"val_mean_lesion_dice_{rule}"] = scores["mean_lesion_dice"]
        if chosen["decision"] is not None:
            model.decision = chosen["decision"]
            out["val_decision"] = float(DECISIONS.index(chosen["decision"]))
        model.lesion_offset = chosen["lesion_offset"]
        out["val_lesion_offset"] = chosen["lesion_offset"]
        return chosen["scores"]

    class RunState(keras.callbacks.Callback):
        """Each epoch: re-estimate BatchNorm statistics, validate (loss terms from `val_data`,
        the mean lesion Dice per image from the scorer) into the logs, save best.keras; NaN-safe.
        `Commit` then saves last.keras and state.json."""

        def _validate(self, logs: dict, finite: bool) -> float:
            """Validation logs and the epoch's score (what picks the best epoch)."""
            if finite:
                if recalibration_steps:
                    recalibrate_batchnorm(self.model, batches, recalibration_steps)
                    distribute.share_chief_batchnorm(self.model)
                val = self.model.evaluate(val_data, verbose=0, return_dict=True)
                logs.update({f"val_{k}": float(v) for k, v in val.items()})
            if scorer is not None:
                score = 0.0
                if finite:
                    logs.update(per_image_scores(self.model))
                    score = logs["val_mean_lesion_dice"]
                    score = 0.0 if np.isnan(score) else score
            elif monitor == "ggo_con":
                score = (logs.get("val_dice_ggo", 0.0) + logs.get("val_dice_con", 0.0)) / 2
            else:
                score = logs.get("val_dice_lesion", 0.0)
            logs.setdefault("val_mean_lesion_dice", float(score))
            return score

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            loss = logs.get("loss", float("nan"))
            # steps with non-finite gradients are skipped; most of an epoch skipped is a failure
            finite = bool(np.isfinite(loss)) and logs.get("skipped", 0.0) <= MAX_SKIPPED
            if not finite:
                self._validate(logs, finite)
                self.model.stop_training = True
                state["nan_epoch"] = epoch + 1
                return
            # validation and best.keras see the EMA weights (if kept); last.keras the raw ones
            with _EMASwap(self.model) as ema:
                score = self._validate(logs, finite)
                best = state.get("best_score")
                if best is None or score > best:
                    state["best_score"], state["best_epoch"] = float(score), epoch + 1
                    _atomic_save(self.model, Run(run).best)
                    if chief:
                        kind = " (EMA weights)" if ema.on else ""
                        note = f"epoch {epoch + 1}: best so far, val mean lesion Dice {score:.4f}"
                        log(note + kind)
            state["finished_epoch"] = epoch + 1  # committed by `Commit`, after the log row

    class Commit(keras.callbacks.Callback):
        """Last of the epoch's callbacks, after the CSV log has its row: save last.keras, then
        state.json, so that a resumed run never lacks the log row of an epoch it skips."""

        def __init__(self):
            super().__init__()
            self.on_train_begin()  # a clock also for callers that drive epochs by hand

        def on_train_begin(self, logs=None):
            self.begin, self.before = time.time(), state.get("train_seconds", 0.0)

        def on_epoch_end(self, epoch, logs=None):
            if state.pop("finished_epoch", None) != epoch + 1:
                return
            _atomic_save(self.model, Run(run).last)
            state["epochs_done"] = epoch + 1
            # with each epoch, so that a run cut off and resumed still counts all its time
            state["train_seconds"] = self.before + time.time() - self.begin
            Run(run).write_state(state)
            if os.environ.get(KILL_AFTER_EPOCH_ENV) == str(epoch + 1):  # tests: a crash here
                os.kill(os.getpid(), signal.SIGKILL)

        def on_train_batch_end(self, batch, logs=None):
            if logs and not np.all(np.isfinite(logs.get("loss", 0.0))):
                self.model.stop_training = True

    if not chief:  # a worker's own folder (thrown away) gets only the checkpoints
        return [RunState(), Commit()]
    return [
        RunState(),
        keras.callbacks.CSVLogger(str(run / "log.csv"), append=True),
        keras.callbacks.TensorBoard(str(run / "tensorboard"), write_graph=False),
        Commit(),
    ]


def duration(seconds: float) -> str:
    """`45 s`, `2.5 min`, `12 min`, `3.2 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 10 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _estimate(log: Callable[[str], None], steps_per_epoch: int, epochs_left: int):
    """A callback logging how long the run will take, timed on the run itself (no cost table):
    after the `ESTIMATE_STEPS` steps that follow the first (the first traces the graph; steps
    only), then as the next two epochs begin, from the whole of the one before (validation and
    checkpoints included; the first epoch without its one-off tracing of the train step, but
    with that of validation: the second epoch's estimate is the better one)."""
    import keras

    class Estimate(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.begin, self.first, self.per_step, self.done = time.time(), None, None, 0

        def on_epoch_begin(self, epoch, logs=None):
            now, left = time.time(), epochs_left - self.done
            if self.done in (1, 2) and left > 0 and self.first is not None:
                took = now - self.begin
                tracing = ""
                if self.done == 1:
                    traced = max(0.0, self.first - self.begin - (self.per_step or 0.0))
                    took -= traced
                    tracing = f" (and {duration(traced)} tracing the train step)"
                log(
                    f"epoch {epoch} took {duration(took)} with validation{tracing}; about "
                    f"{duration(took * left)} for the {left} epoch{'s' if left > 1 else ''} left"
                )
            self.begin = now

        def on_epoch_end(self, epoch, logs=None):
            self.done += 1

        def on_train_batch_end(self, batch, logs=None):
            if self.done:
                return
            now = time.time()
            if batch == 0:
                self.first = now
            elif batch == ESTIMATE_STEPS:
                self.per_step = (now - self.first) / ESTIMATE_STEPS
                left = steps_per_epoch * epochs_left - batch - 1
                bar = self.params.get("verbose") in (1, "auto")  # Keras' bar holds the line
                log(
                    ("\n" if bar else "")
                    + f"estimated time: about {duration(self.per_step * left)} for the {left} "
                    f"steps left ({self.per_step:.2f} s a step on steps 2-{ESTIMATE_STEPS + 1}; "
                    "validation not included)"
                )

    return Estimate()


def _replica_order(batch_size: int, replicas: int):
    """A batch map putting rows r, r + N, r + 2N, ... in replica r's share (N replicas).

    Batches hold their labelled examples first; this gives every replica its share of them.
    """
    import tensorflow as tf

    order = tf.constant([i for r in range(replicas) for i in range(r, batch_size, replicas)])
    return lambda batch: {k: tf.gather(v, order) for k, v in batch.items()}


def _atomic_save(model, path: Path) -> None:
    tmp = path.with_name(f"{temp_prefix(path.stem)}.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _number(value: str) -> float:
    """A CSV log cell as a float (Keras' CSVLogger writes "NA" for a missing value)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def plot_curves(log_csv: Path, output: Path) -> None:
    """Training curves from the CSV log (loss terms and validation Dice) as a PNG."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    keys = [k for k in rows[0] if k != "epoch"]
    losses = [
        k
        for k in keys
        if "dice" not in k
        and not k.startswith("val_kl_")
        and not k.startswith("kl_")
        and "grad_" not in k
        and "clipped" not in k
        and k != "learning_rate"
    ]
    dices = [k for k in keys if "dice" in k]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k in losses:
        axes[0].plot(epochs, [_number(r[k]) for r in rows], label=k)
    for k in dices:
        axes[1].plot(epochs, [_number(r[k]) for r in rows], label=k)
    axes[0].set(title="loss terms (per pixel)", xlabel="epoch")
    axes[1].set(title="Dice", xlabel="epoch", ylim=(0, 1))
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, output)


class _PipelineWatchdog:
    """Ends the process with the error's one line and exit code 2 when a slice failed to read
    inside `tf.data` and training has not stopped `PIPELINE_GRACE` seconds later: such a
    failure can leave `fit` waiting forever on the input pipeline, and a scheduled job must
    fail, not hang. Checkpoints are written atomically, so exiting loses at most the epoch."""

    def __init__(self):
        self._lock = threading.Lock()
        self._timer = None
        pipeline_errors.reset()
        pipeline_errors.hook = self._arm

    def _arm(self, message: str) -> None:
        with self._lock:
            if self._timer is None:
                self._timer = threading.Timer(PIPELINE_GRACE, self._exit, (message,))
                self._timer.daemon = True
                self._timer.start()

    @staticmethod
    def _exit(message: str) -> None:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        os._exit(2)

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
        pipeline_errors.reset()


#: seconds a run may take to stop by itself after a slice failed to read in `tf.data`
PIPELINE_GRACE = 60.0


def prepare_run(config: TrainConfig, overwrite: bool = False, warn=None) -> tuple[Path, dict]:
    """Create (or reopen, to resume) the run directory; returns it and its state.

    A folder counts as a run once it holds config.json and state.json; `overwrite` replaces a
    run only (never another folder), and a run that never finished an epoch (a failed start)
    is replaced without asking.
    """

    run = Path(config.output)
    folder = Run(run)
    check_apart(run, run_inputs(config))
    check_parents(run)
    if run.exists() and not run.is_dir():
        raise DataError(run, "output exists and is not a folder")
    sweep_leftovers(run)  # temporaries of a killed earlier run
    if run.exists() and any(run.iterdir()):
        if not folder.is_run():
            raise DataError(
                run, "output folder exists and is not a run of this tool (choose another --output)"
            )
        try:
            state, saved = folder.state(), folder.config()
        except DataError:
            state = saved = None
        if not (overwrite or state is not None):
            raise DataError(
                run, "the run's config.json or state.json is unreadable (use --overwrite)"
            )
        if overwrite or state.get("epochs_done", 0) <= 0:  # <= 0: a start that failed
            shutil.rmtree(run)
        else:
            if saved.to_json() != config.to_json():
                raise DataError(
                    run,
                    "run folder holds a run with another configuration "
                    "(use another --output, or --overwrite)",
                )
            if state.get("epochs_done", 0) >= config.epochs:
                raise DataError(run, "run folder holds a finished run (use --overwrite)")
            return run, state
    run.mkdir(parents=True, exist_ok=True)
    folder.write_config(config)
    folder.write_versions(_versions())
    state = {"epochs_done": 0, "best_score": None, "best_epoch": None}
    folder.write_state(state)
    return run, state


def _run_split(config: TrainConfig, run: Path, labelled, warn) -> Split:
    """The run's split: its split.json when resuming, else the given or a new one (saved)."""
    split_path = Run(run).split_path
    if split_path.is_file():
        return Split.load(split_path)
    if config.split:
        split = Split.load(config.split)
        split.check(labelled)
    else:
        split = split_dataset(labelled, config.fractions, config.seed, warn=warn)
    if (
        config.max_labelled is not None or config.label_fraction is not None
    ) and not split.unlabelled:
        split = withhold_labels(
            split, labelled, config.max_labelled, config.label_fraction, config.seed
        )
    if not split.val:
        raise DataError(
            config.labelled, "the split has no validation slices (needed to pick the best epoch)"
        )
    split.save(split_path)
    return split


def check_config(config: TrainConfig) -> None:
    """The options a run cannot start with, refused before any file is read."""
    check_model_size(config.size)
    if config.intensity not in INTENSITY_MODES:
        raise DataError(
            None, f"unknown intensity {config.intensity!r}: use one of {', '.join(INTENSITY_MODES)}"
        )
    if config.model not in MODELS:
        raise DataError(None, f"unknown model {config.model!r}: use one of {', '.join(MODELS)}")
    if config.unlabelled_per_batch is not None and config.unlabelled_per_batch < 0:
        raise DataError(None, "--unlabelled-per-batch must be at least 0")
    withheld = config.max_labelled is not None or config.label_fraction is not None
    if uses_consistency(config) and (
        not (config.unlabelled or withheld) or config.unlabelled_per_batch == 0
    ):
        raise DataError(
            None,
            "--consistency needs unlabelled slices (--unlabelled, --max-labelled or "
            "--label-fraction, and --unlabelled-per-batch > 0)",
        )


def uses_consistency(config: TrainConfig) -> bool:
    """Whether the run's model has the weak-to-strong consistency term on."""
    return float((config.model_options or {}).get("consistency_weight") or 0.0) > 0


def _read_datasets(config: TrainConfig, warn) -> tuple[Dataset, Dataset | None]:
    """The labelled dataset and, for StitchNet or a model with the consistency term, the
    unlabelled one (not with --unlabelled-per-batch 0)."""
    labelled = config.labelled_spec().discover(require_labels=True)
    unlabelled = None
    if not config.unlabelled:
        pass
    elif config.unlabelled_per_batch == 0:
        warn("--unlabelled-per-batch 0: the unlabelled data is not used")
    elif config.model == "stitchnet" or uses_consistency(config):
        unlabelled = config.unlabelled_spec().discover()
    else:
        warn(
            f"{config.model} is supervised: the unlabelled data is not used "
            "(--consistency > 0 uses it)"
        )
    return labelled, unlabelled


def _open_run(config: TrainConfig, overwrite: bool, warn, strategy) -> tuple[Path, dict, bool]:
    """(run folder, state, scratch): the chief's run folder, or a scratch folder thrown away
    for the other workers of a multi-worker run, which write identical checkpoints."""
    from stitchnet_tf import distribute

    if distribute.is_chief():
        run, state = prepare_run(config, overwrite, warn)
        scratch = False
    else:
        import tempfile

        run, scratch = Path(tempfile.mkdtemp(prefix="stitchnet-worker-")), True
        state = {"epochs_done": 0, "best_score": None, "best_epoch": None}
    if distribute.is_multi_worker(strategy):  # the chief's folder decides where to resume
        (done,) = distribute.broadcast_from_chief(strategy, [float(state["epochs_done"])])
        state["epochs_done"] = round(float(done))
    return run, state, scratch


def _checked_split(config, run: Path, labelled, unlabelled, fresh: bool, log, warn) -> Split:
    """The run's split, with every slice it reads opened once; a run folder this call created
    is removed when that fails (a run that never started is not left behind)."""
    from stitchnet_tf import distribute

    try:
        split = _run_split(config, run, labelled, warn)
        read = check_samples(labelled, labelled.subset([*split.train, *split.val]).samples)
        if unlabelled is not None:
            read += check_samples(unlabelled, unlabelled.samples)
    except BaseException:
        if fresh and distribute.is_chief():
            shutil.rmtree(run, ignore_errors=True)
        raise
    log(f"checked the {read} slices this run reads")
    return split


def pipelines(config: TrainConfig, labelled, unlabelled, split: Split, epoch: int, replicas):
    """A run's inputs, as `train` fits on them (also for benchmarks that replay a run's
    batches): (training batches, validation dataset, validation batches), seeded by the epoch
    a run starts at so that a resumed run does not replay the first epochs' batches."""
    import tensorflow as tf

    # the baselines learn from unlabelled slices only through the consistency term;
    # --unlabelled-per-batch 0 trains on the labelled slices alone
    semi = (config.model == "stitchnet" or uses_consistency(config)) and (
        config.unlabelled_per_batch != 0
    )
    batches = training_batches(
        labelled,
        unlabelled if semi else None,
        config.size,
        config.batch_size,
        train_ids=split.train,
        withheld_ids=split.unlabelled,  # never trained on as labelled (--max-labelled)
        use_withheld=semi,
        unlabelled_per_batch=config.unlabelled_per_batch,
        seed=config.seed + epoch,
        augmentation=config.augmentation if config.augment else False,
        cache=config.cache,
        intensity=config.intensity,
    )
    val = labelled.subset(split.val)
    val_loader = SliceLoader(val, val.samples, config.size, intensity=config.intensity)
    val_data = slice_dataset(val_loader, cache=config.cache).batch(config.batch_size)
    if replicas > 1:
        total = int(batches.element_spec["x"].shape[0])  # labelled + unlabelled per step
        if total % replicas:
            raise DataError(
                None, f"the batch of {total} slices must be a multiple of the {replicas} replicas"
            )
        batches = batches.map(_replica_order(total, replicas))
    # Every worker runs the same seeded pipeline and keeps its replicas' part of each batch.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return batches.with_options(options), val, val_data.with_options(options)


def new_model(config: TrainConfig):
    """A new model as `config` describes it, compiled with its optimizer: what `train` starts
    from (in the strategy's scope when there is one)."""
    model = build_model(
        config.model,
        config.model_options,
        config.clipnorm,
        config.clipvalue,
        config.seed,
        config.global_clipnorm,
        config.intensity,
    )
    model.compile(optimizer=make_optimizer(config), run_eagerly=config.run_eagerly)
    return model


def _model(config: TrainConfig, run: Path, state: dict, strategy, log):
    """The compiled model, in `strategy`'s scope: from last.keras when resuming, else new."""
    from stitchnet_tf import distribute

    replicas = distribute.num_replicas(strategy)
    with strategy.scope():
        if state["epochs_done"] > 0 and Run(run).last.is_file():
            from stitchnet_tf.inference import load_model

            model = load_model(Run(run).last).model
            log(f"resuming {run} after epoch {state['epochs_done']}")
        else:
            model = new_model(config)
        if replicas > 1:
            distribute.synchronize_batchnorm(model, config.sync_batchnorm)
        if distribute.is_multi_worker(strategy) and state["epochs_done"] > 0:
            variables = [*model.variables, *model.optimizer.variables]
            for v, value in zip(
                variables, distribute.broadcast_from_chief(strategy, variables), strict=True
            ):
                v.assign(value)
    return model


def _report(
    run: Path, state: dict, history, seconds: float, policy: str, before: float = 0.0
) -> dict:
    """Finish the run folder (curves, state) and summarise; a NaN stop is a `TrainingError`.
    `before`: the training seconds of the run's earlier (resumed-from) calls."""
    if (run / "log.csv").is_file():
        plot_curves(run / "log.csv", run / "curves.png")
    state["train_seconds"] = before + seconds
    state["policy"] = policy
    Run(run).write_state(state)
    if state.get("nan_epoch"):
        kept = Run.LAST if Run(run).last.is_file() else "no checkpoint"
        raise TrainingError(
            f"loss or gradients became NaN in epoch {state['nan_epoch']}; stopped, kept {kept} "
            f"from epoch {state['epochs_done']} in {run} (try a lower --learning-rate)"
        )
    last = {k: v[-1] for k, v in history.history.items() if v} if history.history else {}
    return {
        "run": str(run),
        "epochs_done": state["epochs_done"],
        "best_epoch": state.get("best_epoch"),
        "best_val_mean_lesion_dice": state.get("best_score"),
        "seconds": seconds,
        "last": {k: float(v) for k, v in last.items() if math.isfinite(float(v))},
    }


def train(
    config: TrainConfig,
    *,
    overwrite: bool = False,
    verbose: int | str = "auto",
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
) -> dict:
    """Train a model as `config` says; returns a summary (run folder, epochs, best score, time).

    The steps: check the options, find the data, open the run folder, check the split and
    every slice it reads, build the pipelines and the model, fit, report. Raises `DataError`
    for bad input and `TrainingError` when the loss became NaN (the last good checkpoint is
    kept).
    """
    import keras
    import tensorflow as tf

    from stitchnet_tf import distribute
    from stitchnet_tf.models.base import repeatable_graphs
    from stitchnet_tf.precision import set_precision

    warn = warn or log
    check_config(config)
    strategy = distribute.make_strategy(config.strategy)  # before any other TensorFlow work
    replicas = distribute.num_replicas(strategy)
    if config.batch_size % replicas:
        raise DataError(
            None,
            f"--batch-size {config.batch_size} (the global batch) must be a multiple of the "
            f"{replicas} replicas",
        )
    chief = distribute.is_chief()
    if distribute.is_multi_worker(strategy) and config.run_eagerly:
        raise DataError(None, "--eager does not work with a multi-worker strategy")
    labelled, unlabelled = _read_datasets(config, warn)
    fresh = not Path(config.output).exists()
    run, state, scratch = _open_run(config, overwrite, warn, strategy)
    split = _checked_split(config, run, labelled, unlabelled, fresh, log, warn)

    repeatable_graphs()
    keras.utils.set_random_seed(config.seed + state["epochs_done"])
    policy = set_precision(config.mixed_precision)
    if chief:
        log(f"device: {distribute.describe(strategy)}; precision {policy}")
    batches, val, val_data = pipelines(
        config, labelled, unlabelled, split, state["epochs_done"], replicas
    )
    watchdog = _PipelineWatchdog()
    try:
        model = _model(config, run, state, strategy, log)
        callbacks = _make_callbacks(
            run,
            state,
            _monitor_classes(labelled),
            log,
            batches,
            val_data,
            config.recalibration_steps,
            chief,
            val_set=val,
            size=config.size,
            choose_decision=config.choose_decision,
            intensity=config.intensity,
        )
        if chief:
            epochs_left = config.epochs - state["epochs_done"]
            callbacks.append(_estimate(log, config.steps_per_epoch, epochs_left))
        before, start = state.get("train_seconds", 0.0), time.time()
        history = model.fit(
            batches,
            epochs=config.epochs,
            initial_epoch=state["epochs_done"],
            steps_per_epoch=config.steps_per_epoch,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the pipeline shuffles (Keras ignores, and warns about, shuffle=True)
        )
        seconds = time.time() - start
    except tf.errors.OpError:
        if pipeline_errors.first is None:
            raise
        raise DataError(None, pipeline_errors.first) from None  # a slice failed in tf.data
    finally:
        watchdog.cancel()
        set_precision(False)
        if scratch:
            shutil.rmtree(run, ignore_errors=True)
    if not chief:
        return {"run": None, "epochs_done": state["epochs_done"], "seconds": seconds}
    return _report(run, state, history, seconds, policy, before)
