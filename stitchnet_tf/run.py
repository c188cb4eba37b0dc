"""A run folder and the configuration that made it: one owner for both.

A run folder holds
- `config.json`: the full `TrainConfig` (enough to reproduce the run);
- `versions.json`: the library versions it was trained with;
- `split.json`: the split used (made on the fly, by patient, unless one was given);
- `last.keras` / `best.keras`: the model after the last good epoch and at the best validation
  mean lesion Dice (full `.keras` files: weights, optimizer state, config);
- `state.json`: completed epochs and the best score, for resuming;
- `log.csv`, `tensorboard/`, `curves.png`.

`Run` is the only code that knows these names and parses config.json and state.json;
`training`, `inference`, `evaluation` and `export` go through it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from stitchnet_tf.data.datasets import DatasetSpec
from stitchnet_tf.errors import DataError
from stitchnet_tf.fileio import atomic_write_text
from stitchnet_tf.options import PAPER_SIZE, RECALIBRATION_STEPS, TRAIN_DEFAULTS

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
    # unlabelled slices added to each batch of `batch_size` labelled ones (default: as many;
    # 0: none, labelled only): a run with unlabelled data sees as many labelled slices per step
    unlabelled_per_batch: int | None = None
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
    lungs_subdir: str | None = "lungs"
    # model options (see StitchNet / UNet / SegNet)
    model_options: dict = field(default_factory=dict)
    preset: str | None = None  # the preset that filled size, widths and budget (see PRESETS)
    # choose on the val slices, with the epoch, the decision rule (StitchNet: prior / posterior)
    # and the lesion offset (every model; `models.base.calibrate_lesion`)
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


def run_inputs(config: TrainConfig) -> dict:
    """What a run reads, by option name (for `fileio.check_apart`)."""
    return {
        "--labelled": config.labelled,
        "--unlabelled": config.unlabelled,
        "--split": config.split,
    }


class Run:
    """A run folder (it need not exist yet): its files, parsed config and state, checkpoints."""

    CONFIG, STATE, SPLIT, VERSIONS = "config.json", "state.json", "split.json", "versions.json"
    BEST, LAST = "best.keras", "last.keras"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"Run({str(self.folder)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.folder / name

    @property
    def best(self) -> Path:
        return self.folder / self.BEST

    @property
    def last(self) -> Path:
        return self.folder / self.LAST

    @property
    def split_path(self) -> Path:
        return self.folder / self.SPLIT

    def is_run(self) -> bool:
        """A folder counts as a run once it holds config.json and state.json."""
        return (self / self.CONFIG).is_file() and (self / self.STATE).is_file()

    def finished(self) -> bool:
        """Whether the run trained every epoch of its config and holds its chosen model (a run
        still training has a best.keras from an early epoch); unreadable files: not finished."""
        try:
            state, config = self.state(), self.config_dict()
        except DataError:
            return False
        if not (state and config and self.best.is_file()):
            return False
        return state.get("epochs_done", 0) >= config.get("epochs", float("inf"))

    def checkpoint(self) -> Path | None:
        """The model the run stands for: best.keras, else last.keras (None if neither)."""
        return next((p for p in (self.best, self.last) if p.is_file()), None)

    def _read_json(self, name: str) -> dict | None:
        path = self / name
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(path, f"not a valid {name} ({type(e).__name__}: {e})") from None
        if not isinstance(value, dict):
            raise DataError(path, f"not a valid {name} (not a JSON object)")
        return value

    def config_dict(self) -> dict | None:
        """config.json as written (None when there is none); a bad file is a `DataError`."""
        return self._read_json(self.CONFIG)

    def config(self) -> TrainConfig | None:
        """The run's `TrainConfig` (None when there is no config.json)."""
        values = self.config_dict()
        if values is None:
            return None
        try:
            return TrainConfig.from_dict(values)
        except TypeError as e:
            raise DataError(self / self.CONFIG, f"not a valid config.json ({e})") from None

    def size(self) -> int | None:
        """The model size the run was trained at (None if unknown)."""
        values = self.config_dict() if (self / self.CONFIG).is_file() else None
        try:
            return int(values["size"]) if values else None
        except (KeyError, ValueError, TypeError):
            return None

    def state(self) -> dict | None:
        """state.json (None when there is none); a bad file is a `DataError`."""
        return self._read_json(self.STATE)

    def write_config(self, config: TrainConfig) -> None:
        atomic_write_text(self / self.CONFIG, config.to_json() + "\n")

    def write_state(self, state: dict) -> None:
        atomic_write_text(self / self.STATE, json.dumps(state, indent=1) + "\n")

    def write_versions(self, versions: dict) -> None:
        atomic_write_text(self / self.VERSIONS, json.dumps(versions, indent=1) + "\n")
