"""Options and checks shared by the commands: how a dataset folder is read, model sizes,
seeds, split fractions, warnings."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import click

from stitchnet_tf import options
from stitchnet_tf.data.intensity import INTENSITY_MODES
from stitchnet_tf.errors import DataError
from stitchnet_tf_cli import console


def warn(message: str) -> None:
    console.warn(message)


def intensity_option(f):
    """`--intensity`, shared by `preprocess` and `train`."""
    return click.option(
        "--intensity",
        type=click.Choice(INTENSITY_MODES),
        default="none",
        show_default=True,
        help="standardise: map each slice so that its aerated lung and the soft tissue around "
        "the lung field land on fixed values (other windows and scanners then look alike).",
    )(f)


tta_option = click.option(
    "--tta", is_flag=True, help="Average the probabilities over the four flips of each slice."
)


def check_patient_pattern(ctx, param, value: str | None) -> str | None:
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


def check_model_size(ctx, param, value: int | None) -> int | None:
    """A model size: a positive multiple of 32 (five stride-2 levels), or None."""
    if value is None:
        return None
    try:
        return options.check_model_size(value)
    except DataError:
        raise click.BadParameter(f"{value} is not a positive multiple of 32") from None


#: Seeds of NumPy, TensorFlow and Keras must fit in 32 bits.
SEED = click.IntRange(0, 2**32 - 1)


def data_options(f):
    """Options saying how to read a dataset folder; the command gets `reading`, which turns a
    folder into a `DatasetSpec` with them."""

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
        callback=check_patient_pattern,
        help="Regex on file names whose first group is the patient id (when there is no "
        "manifest column or patients.csv), e.g. 'Data-1_(.+)_\\d+\\.jpg'.",
    )
    @click.option(
        "--masks-subdir", default="masks", show_default=True, help="Folder of lesion masks."
    )
    @click.option(
        "--lungs-subdir",
        default="lungs",
        show_default=True,
        help="Folder of lung masks; 'none' reads none, so the lung field comes from the image.",
    )
    @functools.wraps(f)
    def wrapper(*args, mask_values, patient_pattern, masks_subdir, lungs_subdir, **kwargs):
        def reading(path):
            """The dataset folder `path` as a `DatasetSpec` with these options (None: None)."""
            from stitchnet_tf.data.datasets import DatasetSpec

            if path is None:
                return None
            lungs = None if lungs_subdir.lower() == "none" else lungs_subdir
            return DatasetSpec(path, mask_values, patient_pattern, masks_subdir, lungs)

        return f(*args, reading=reading, **kwargs)

    return wrapper


def consistency_options(f):
    """Weak-to-strong consistency on unlabelled slices, for every model (docs/DESIGN.md §7.17);
    the command gets `consistency`, a dict of the model arguments (`CONSISTENCY_DEFAULTS`)."""
    d = options.CONSISTENCY_DEFAULTS

    @click.option(
        "--consistency",
        "consistency_weight",
        default=d["consistency_weight"],
        show_default=True,
        type=click.FloatRange(0),
        help="Weight of the weak-to-strong consistency term on unlabelled pixels (0: off). "
        "Needs --unlabelled or --max-labelled.",
    )
    @click.option(
        "--consistency-threshold",
        default=d["consistency_threshold"],
        show_default=True,
        type=click.FloatRange(0, 1, max_open=True),
        help="Teacher confidence below which a pseudo-label is ignored.",
    )
    @click.option(
        "--consistency-rampup",
        default=d["consistency_rampup"],
        show_default=True,
        type=click.IntRange(0),
        help="Steps of sigmoid ramp-up of the consistency weight.",
    )
    @click.option(
        "--teacher",
        default=d["teacher"],
        show_default=True,
        type=click.Choice(options.TEACHERS),
        help="Consistency teacher: the model itself, or an EMA of its weights (mean teacher).",
    )
    @click.option(
        "--teacher-decay",
        default=d["teacher_decay"],
        show_default=True,
        type=click.FloatRange(0, 1, max_open=True),
        help="Decay per step of the EMA teacher.",
    )
    @click.option(
        "--consistency-strong",
        default=d["consistency_strong"],
        show_default=True,
        type=click.Choice(options.STRONG_VIEWS),
        help="The strong view's intensity transforms: brightness, contrast, gamma, noise and "
        "blur (intensity), or noise and blur only, keeping each pixel's attenuation (texture).",
    )
    @click.option(
        "--consistency-align/--no-consistency-align",
        default=d["consistency_align"],
        show_default=True,
        help="Distribution alignment: scale the teacher's probabilities towards the labelled "
        "pixels' class distribution before taking pseudo-labels.",
    )
    @click.option(
        "--consistency-balance",
        default=d["consistency_balance"],
        show_default=True,
        type=click.FloatRange(0, 1),
        help="Class-balanced thresholds: lower each class's threshold so that about this share "
        "of the pixels the teacher gives that class become pseudo-labels (0: one threshold).",
    )
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        consistency = {k: kwargs.pop(k) for k in d}
        return f(*args, consistency=consistency, **kwargs)

    return wrapper


def parse_fractions(ctx, param, value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("expected three numbers like 0.6,0.2,0.2") from None
    if len(parts) != 3:
        raise click.BadParameter("expected three numbers like 0.6,0.2,0.2")
    if not all(math.isfinite(v) and v >= 0 for v in parts) or sum(parts) <= 0:
        raise click.BadParameter("the three fractions must be finite, >= 0 and not all 0")
    return parts


def _shipped_model(ctx, param, value: Path | None) -> Path | None:
    """A shipped model's name becomes its installed folder (a `DataError` if missing)."""
    from stitchnet_tf.shipped import resolve

    return None if value is None else resolve(value)


def model_options(f):
    @click.option(
        "--model",
        "-m",
        "model_path",
        required=True,
        type=click.Path(path_type=Path),
        callback=_shipped_model,
        help="A shipped model's name (see `list-models`, e.g. medseg-stitchnet), a run folder "
        "(uses best.keras), a .keras file, or an export (SavedModel folder, .tflite file).",
    )
    @click.option(
        "--size",
        default=None,
        type=int,
        callback=check_model_size,
        help="Model size (default: the run's config.json).",
    )
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def split_options(f):
    """`--fractions`, `--max-labelled`, `--label-fraction`: how `split` and `train` split a
    dataset and withhold labels."""
    for option in reversed(
        (
            click.option(
                "--fractions",
                default=",".join(str(v) for v in options.TRAIN_DEFAULTS["fractions"]),
                show_default=True,
                callback=parse_fractions,
                help="Train, val, test fractions of patients (of slices without patient ids).",
            ),
            click.option(
                "--max-labelled",
                default=None,
                type=click.IntRange(0),
                help="Keep labels on at most N train slices; the rest train unlabelled.",
            ),
            click.option(
                "--label-fraction",
                default=None,
                type=click.FloatRange(0, 1),
                help="Keep labels on this fraction of the train slices; the rest train unlabelled.",
            ),
        )
    ):
        f = option(f)
    return f


def stitchnet_options(f):
    """`--samples` and `--decision`: how StitchNet segments (other models refuse them)."""
    f = click.option(
        "--decision",
        default=None,
        type=click.Choice(options.DECISIONS),
        help="StitchNet decision rule (default: the model's own).",
    )(f)
    return click.option(
        "--samples",
        default=0,
        show_default=True,
        type=click.IntRange(0),
        help="StitchNet: average this many posterior samples (0 = posterior mean).",
    )(f)


def window_options(f):
    """`--window-level` and `--window-width`: the CT window for Hounsfield data."""
    from stitchnet_tf.data.intensity import LUNG_WINDOW_LEVEL, LUNG_WINDOW_WIDTH

    f = click.option(
        "--window-width",
        default=LUNG_WINDOW_WIDTH,
        show_default=True,
        type=click.FloatRange(0, min_open=True),
        help="CT window width (HU) for Hounsfield data.",
    )(f)
    return click.option(
        "--window-level",
        default=LUNG_WINDOW_LEVEL,
        show_default=True,
        help="CT window level (HU) for Hounsfield data.",
    )(f)
