"""Training runs: data, split, model, callbacks, and a run directory that can be resumed.

A run directory holds
- `config.json`: the full `TrainConfig` (enough to reproduce the run) and library versions;
- `split.json`: the split used (made on the fly, by patient, unless one was given);
- `last.keras` / `best.keras`: the model after the last good epoch and at the best validation
  mean lesion Dice (full `.keras` files: weights, optimizer state, config);
- `state.json`: completed epochs and the best score, for resuming;
- `log.csv`, `tensorboard/`, `curves.png`.
Rerunning the same command on the same run directory continues from the last completed epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stitchnet_tf import __version__
from stitchnet_tf.data.classes import CON, GGO, bits
from stitchnet_tf.data.datasets import Dataset, DatasetSpec
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
    atomic_write_text,
    check_apart,
    check_parents,
    sweep_leftovers,
    temp_prefix,
)
from stitchnet_tf.options import (
    LR_SCHEDULES,
    MODELS,
    OPTIMIZERS,
    PAPER_SIZE,
    PRESETS,
    RECALIBRATION_STEPS,
    TRAIN_DEFAULTS,
    model_options,
)

#: Tests only: the process kills itself (SIGKILL) right after saving this epoch's checkpoint.
KILL_AFTER_EPOCH_ENV = "STITCHNET_TF_TEST_KILL_AFTER_EPOCH"


#: What runs written before these TrainConfig fields existed were trained with.
LEGACY_DEFAULTS = {"optimizer": "adam", "augmentation": "paper", "choose_decision": False}


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved as the run's `config.json`)."""

    labelled: str
    output: str
    unlabelled: str | None = None
    model: str = "stitchnet"
    size: int = PAPER_SIZE
    epochs: int = 80
    steps_per_epoch: int = 100
    batch_size: int = 8
    labelled_per_batch: int | None = None
    learning_rate: float = TRAIN_DEFAULTS["learning_rate"]
    optimizer: str = TRAIN_DEFAULTS["optimizer"]  # OPTIMIZERS
    # AdamW's decoupled decay (not on biases, norms and gains)
    weight_decay: float = TRAIN_DEFAULTS["weight_decay"]
    ema: float | None = None  # momentum of an exponential moving average of the weights
    # "cosine": linear warm-up, then cosine decay to 0; "constant"
    lr_schedule: str = TRAIN_DEFAULTS["lr_schedule"]
    warmup_steps: int | None = None  # default: 5% of the budget
    global_clipnorm: float | None = None  # None: the model's default (StitchNet: 20)
    clipnorm: float | None = None  # the paper's per-variable clipping: 1.0
    clipvalue: float | None = None  # and 0.5
    seed: int = 0
    split: str | None = None
    fractions: tuple[float, float, float] = TRAIN_DEFAULTS["fractions"]
    max_labelled: int | None = None
    label_fraction: float | None = None
    mixed_precision: bool = False
    augment: bool = True
    augmentation: str = TRAIN_DEFAULTS["augmentation"]  # recipe | paper | none (see data.pipeline)
    intensity: str = "none"  # none | standardise (data.intensity.standardise), kept by the model
    cache: bool = False
    run_eagerly: bool = False  # no graph tracing: for debugging and tiny runs
    strategy: str = TRAIN_DEFAULTS["strategy"]  # tf.distribute strategy (stitchnet_tf.distribute)
    sync_batchnorm: bool = True  # with several replicas: BatchNorm on global-batch statistics
    recalibration_steps: int = RECALIBRATION_STEPS  # BatchNorm re-estimation before validation
    # data reading
    mask_values: str | None = None
    patient_pattern: str | None = None
    unlabelled_patient_pattern: str | None = None
    masks_subdir: str = "masks"
    lungs_subdir: str = "lungs"
    # model options (see StitchNet / UNet / SegNet)
    model_options: dict = field(default_factory=dict)
    preset: str | None = None  # the preset that filled size, widths and budget (see PRESETS)
    # StitchNet: choose the decision rule (prior / posterior) on the val slices with the epoch
    choose_decision: bool = True

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    def labelled_spec(self) -> DatasetSpec:
        """How to read the labelled folder."""
        return DatasetSpec(
            Path(self.labelled),
            self.mask_values,
            self.patient_pattern,
            self.masks_subdir,
            self.lungs_subdir,
        )

    def unlabelled_spec(self) -> DatasetSpec | None:
        """How to read the unlabelled folder (its own patient pattern; no masks)."""
        if self.unlabelled is None:
            return None
        return DatasetSpec(
            Path(self.unlabelled),
            patient_pattern=self.unlabelled_patient_pattern,
            masks_subdir=self.masks_subdir,
            lungs_subdir=self.lungs_subdir,
        )

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """A config from its JSON; fields it lacks (written by an older version) take the
        values that version used, so that resuming such a run with today's defaults is
        refused rather than silently trained on with another recipe."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """As `from_json`, from the parsed dict."""
        d = LEGACY_DEFAULTS | values
        d["fractions"] = tuple(d.get("fractions", (0.6, 0.2, 0.2)))
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


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
    """The run's optimizer: AdamW (default) or Adam on `learning_rate_schedule(config)`, with
    an EMA of the weights when `config.ema` is set (used for validation and the checkpoints)."""
    import keras

    if config.optimizer not in OPTIMIZERS:
        raise DataError(None, f"unknown optimizer {config.optimizer!r}: use adamw or adam")
    if config.weight_decay < 0:
        raise DataError(None, f"--weight-decay must be >= 0, got {config.weight_decay}")
    if config.ema is not None and not 0 < config.ema < 1:
        raise DataError(None, f"--ema must be in (0, 1), got {config.ema}")
    ema = dict(use_ema=config.ema is not None, ema_momentum=config.ema or 0.99)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate_schedule(config), **ema)
    optimizer = keras.optimizers.AdamW(
        learning_rate_schedule(config), weight_decay=config.weight_decay, **ema
    )
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

    from stitchnet_tf.models.base import recalibrate_batchnorm

    scorer = None
    if val_set is not None and size is not None:
        from stitchnet_tf.evaluation import SliceScorer

        # reads and prepares the val slices once
        scorer = SliceScorer(val_set, size, intensity=intensity)

    def per_image_scores(model) -> dict[str, float]:
        """Val scores; with `choose_decision` (StitchNet) each decision rule is scored, the
        best is kept as the model's `decision` (saved with it) and logged as `val_decision`
        (0 prior, 1 posterior)."""
        rules = [None]
        if choose_decision and getattr(model, "decision", None) is not None:
            from stitchnet_tf.options import DECISIONS

            rules = list(DECISIONS)
        out, best = {}, None
        for rule in rules:
            scores = scorer.score(model, decision=rule)
            value = scores["mean_lesion_dice"]
            value = -1.0 if value is None else value
            if rule is not None:
                out[f"val_mean_lesion_dice_{rule}"] = scores["mean_lesion_dice"]
            if best is None or value > best[0]:
                best = (value, rule, scores)
        _, rule, scores = best
        if rule is not None:
            model.decision = rule
            out["val_decision"] = float(rules.index(rule))
        out |= {f"val_dice_{c}_image": v for c, v in scores["lesion_dice"].items()}
        out["val_mean_lesion_dice"] = scores["mean_lesion_dice"]
        return {k: float("nan") if v is None else float(v) for k, v in out.items()}

    class RunState(keras.callbacks.Callback):
        """Each epoch: re-estimate BatchNorm statistics, validate (loss terms from `val_data`,
        the mean lesion Dice per image from the scorer) into the logs, save best.keras; NaN-safe.
        `Commit` then saves last.keras and state.json."""

        def _validate(self, logs: dict, finite: bool) -> float:
            """Validation logs and the epoch's score (what picks the best epoch)."""
            if finite:
                if recalibration_steps:
                    recalibrate_batchnorm(self.model, batches, recalibration_steps)
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
                    _atomic_save(self.model, run / "best.keras")
                    if chief:
                        kind = " (EMA weights)" if ema.on else ""
                        note = f"epoch {epoch + 1}: best so far, val mean lesion Dice {score:.4f}"
                        log(note + kind)
            state["finished_epoch"] = epoch + 1  # committed by `Commit`, after the log row

    class Commit(keras.callbacks.Callback):
        """Last of the epoch's callbacks, after the CSV log has its row: save last.keras, then
        state.json, so that a resumed run never lacks the log row of an epoch it skips."""

        def on_epoch_end(self, epoch, logs=None):
            if state.pop("finished_epoch", None) != epoch + 1:
                return
            _atomic_save(self.model, run / "last.keras")
            state["epochs_done"] = epoch + 1
            atomic_write_text(run / "state.json", json.dumps(state, indent=1) + "\n")
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
    tmp = output.with_name(f"{temp_prefix(output.name)}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, output)


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


def run_inputs(config: TrainConfig) -> dict:
    """What a run reads, by option name (for `fileio.check_apart`)."""
    return {
        "--labelled": config.labelled,
        "--unlabelled": config.unlabelled,
        "--split": config.split,
    }


def prepare_run(config: TrainConfig, overwrite: bool = False, warn=None) -> tuple[Path, dict]:
    """Create (or reopen, to resume) the run directory; returns it and its state.

    A folder counts as a run once it holds config.json and state.json; `overwrite` replaces a
    run only (never another folder), and a run that never finished an epoch (a failed start)
    is replaced without asking.
    """

    run = Path(config.output)
    state_path = run / "state.json"
    check_apart(run, run_inputs(config))
    check_parents(run)
    if run.exists() and not run.is_dir():
        raise DataError(run, "output exists and is not a folder")
    sweep_leftovers(run)  # temporaries of a killed earlier run
    if run.exists() and any(run.iterdir()):
        if not (state_path.is_file() and (run / "config.json").is_file()):
            raise DataError(
                run, "output folder exists and is not a run of this tool (choose another --output)"
            )
        try:
            state = json.loads(state_path.read_text())
            saved = TrainConfig.from_json((run / "config.json").read_text())
            readable = isinstance(state, dict)
        except (ValueError, TypeError, KeyError):
            readable = False
        if not (overwrite or readable):
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
    atomic_write_text(run / "config.json", config.to_json() + "\n")
    atomic_write_text(run / "versions.json", json.dumps(_versions(), indent=1) + "\n")
    state = {"epochs_done": 0, "best_score": None, "best_epoch": None}
    atomic_write_text(state_path, json.dumps(state, indent=1) + "\n")
    return run, state


def _run_split(config: TrainConfig, run: Path, labelled, warn) -> Split:
    """The run's split: its split.json when resuming, else the given or a new one (saved)."""
    split_path = run / "split.json"
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


def train(
    config: TrainConfig,
    *,
    overwrite: bool = False,
    verbose: int | str = "auto",
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
) -> dict:
    """Train a model as `config` says; returns a summary (run folder, epochs, best score, time).

    Raises `DataError` for bad input and `TrainingError` when the loss became NaN (the last
    good checkpoint is kept).
    """
    import keras
    import tensorflow as tf

    from stitchnet_tf import distribute
    from stitchnet_tf.precision import set_precision

    warn = warn or log
    check_model_size(config.size)
    if config.intensity not in INTENSITY_MODES:
        raise DataError(
            None, f"unknown intensity {config.intensity!r}: use one of {', '.join(INTENSITY_MODES)}"
        )
    if config.model not in MODELS:
        raise DataError(None, f"unknown model {config.model!r}: use one of {', '.join(MODELS)}")
    if (
        config.labelled_per_batch is not None
        and not 0 < config.labelled_per_batch <= config.batch_size
    ):
        raise DataError(None, f"--labelled-per-batch must be in 1..{config.batch_size}")
    strategy = distribute.make_strategy(config.strategy)  # before any other TensorFlow work
    replicas = distribute.num_replicas(strategy)
    if config.batch_size % replicas:
        raise DataError(
            None,
            f"--batch-size {config.batch_size} (the global batch) must be a multiple of the "
            f"{replicas} replicas",
        )
    chief, multi_worker = distribute.is_chief(), distribute.is_multi_worker(strategy)
    if multi_worker and config.run_eagerly:
        raise DataError(None, "--eager does not work with a multi-worker strategy")
    labelled = config.labelled_spec().discover(require_labels=True)
    unlabelled = None
    if config.unlabelled and config.model == "stitchnet":
        unlabelled = config.unlabelled_spec().discover()
    elif config.unlabelled:
        warn(f"{config.model} is supervised: the unlabelled data is not used")

    scratch = None
    fresh = not Path(config.output).exists()
    if chief:
        run, state = prepare_run(config, overwrite, warn)
    else:  # other workers write their (identical) checkpoints to a folder thrown away
        import tempfile

        run = scratch = Path(tempfile.mkdtemp(prefix="stitchnet-worker-"))
        state = {"epochs_done": 0, "best_score": None, "best_epoch": None}
    if multi_worker:  # the chief's folder decides where a resumed run starts
        (done,) = distribute.broadcast_from_chief(strategy, [float(state["epochs_done"])])
        state["epochs_done"] = round(float(done))
    try:
        split = _run_split(config, run, labelled, warn)
        read = check_samples(labelled, labelled.subset([*split.train, *split.val]).samples)
        if unlabelled is not None:
            read += check_samples(unlabelled, unlabelled.samples)
    except BaseException:
        if fresh and chief:  # a run that never started is not left behind
            shutil.rmtree(run, ignore_errors=True)
        raise
    log(f"checked the {read} slices this run reads")

    keras.utils.set_random_seed(config.seed + state["epochs_done"])
    policy = set_precision(config.mixed_precision)
    labelled_per_batch = config.labelled_per_batch
    if config.model != "stitchnet":
        labelled_per_batch = config.batch_size
    batches = training_batches(
        labelled,
        unlabelled,
        config.size,
        config.batch_size,
        train_ids=split.train,
        withheld_ids=split.unlabelled,
        labelled_per_batch=labelled_per_batch,
        seed=config.seed + state["epochs_done"],
        augmentation=config.augmentation if config.augment else False,
        cache=config.cache,
        intensity=config.intensity,
    )
    val = labelled.subset(split.val)
    val_loader = SliceLoader(val, val.samples, config.size, intensity=config.intensity)
    val_data = slice_dataset(val_loader, cache=config.cache)
    val_data = val_data.batch(config.batch_size)
    if replicas > 1:
        batches = batches.map(_replica_order(config.batch_size, replicas))
    # Every worker runs the same seeded pipeline and keeps its replicas' part of each batch.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    batches, val_data = batches.with_options(options), val_data.with_options(options)

    watchdog = _PipelineWatchdog()
    try:
        with strategy.scope():
            if state["epochs_done"] > 0 and (run / "last.keras").is_file():
                from stitchnet_tf.inference import load_model

                model = load_model(run / "last.keras").model
                log(f"resuming {run} after epoch {state['epochs_done']}")
            else:
                model = build_model(
                    config.model,
                    config.model_options,
                    config.clipnorm,
                    config.clipvalue,
                    config.seed,
                    config.global_clipnorm,
                    config.intensity,
                )
                model.compile(
                    optimizer=make_optimizer(config),
                    run_eagerly=config.run_eagerly,
                )
            if replicas > 1:
                distribute.synchronize_batchnorm(model, config.sync_batchnorm)
            if multi_worker and state["epochs_done"] > 0:
                variables = [*model.variables, *model.optimizer.variables]
                for v, value in zip(
                    variables, distribute.broadcast_from_chief(strategy, variables), strict=True
                ):
                    v.assign(value)
        start = time.time()
        history = model.fit(
            batches,
            epochs=config.epochs,
            initial_epoch=state["epochs_done"],
            steps_per_epoch=config.steps_per_epoch,
            callbacks=_make_callbacks(
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
                choose_decision=config.choose_decision and config.model == "stitchnet",
                intensity=config.intensity,
            ),
            verbose=verbose,
        )
        seconds = time.time() - start
    except tf.errors.OpError:
        if pipeline_errors.first is None:
            raise
        raise DataError(None, pipeline_errors.first) from None  # a slice failed in tf.data
    finally:
        watchdog.cancel()
        set_precision(False)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if not chief:
        return {"run": None, "epochs_done": state["epochs_done"], "seconds": seconds}
    if (run / "log.csv").is_file():
        plot_curves(run / "log.csv", run / "curves.png")
    state["train_seconds"] = state.get("train_seconds", 0.0) + seconds
    state["policy"] = policy
    atomic_write_text(run / "state.json", json.dumps(state, indent=1) + "\n")
    if state.get("nan_epoch"):
        kept = "last.keras" if (run / "last.keras").is_file() else "no checkpoint"
        raise TrainingError(
            f"loss or gradients became NaN in epoch {state['nan_epoch']}; stopped, kept {kept} "
            f"from epoch "
            f"{state['epochs_done']} in {run} (try a lower --learning-rate)"
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
