"""The `stitchnet-tf` command line: thin wrappers that parse options and call the library."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from stitchnet_tf import __version__
from stitchnet_tf.errors import DataError


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


class _Group(click.Group):
    """Turns `DataError`s into a one-line `error: ...` and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DataError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stitchnet-tf")
def cli() -> None:
    """StitchNet: semi-supervised COVID-19 lung CT segmentation (Keras 3 / TensorFlow).

    Classes: background (outside the lung field), healthy lung, ground-glass opacity (GGO),
    consolidation. Run `stitchnet-tf COMMAND --help` for each command.
    """


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
@click.option("--seed", default=0, show_default=True, type=int)
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
    click.echo(f"wrote {total} synthetic slices to {output} (labelled/, unlabelled/)")


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
    "--size", default=352, show_default=True, type=int, help="Model size (a multiple of 32)."
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
    help="CT window width (HU) for Hounsfield data.",
)
@click.option(
    "--margin",
    default=0.05,
    show_default=True,
    help="Crop margin around the lung field, as a fraction of its size.",
)
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

    if window_width <= 0:
        raise click.BadParameter("must be positive", param_hint="--window-width")
    dataset = _discover(input_, mask_values, patient_pattern, masks_subdir, lungs_subdir, skip_bad)
    with click.progressbar(length=len(dataset), label="preprocess", file=sys.stderr) as bar:
        summary = preprocess_dataset(
            dataset,
            output,
            size=size,
            window=Window(window_level, window_width),
            margin=margin,
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
@click.option("--seed", default=0, show_default=True, type=int)
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
@data_options
def split(
    data,
    output,
    fractions,
    seed,
    max_labelled,
    label_fraction,
    mask_values,
    patient_pattern,
    masks_subdir,
    lungs_subdir,
):
    """Split a dataset train/val/test by patient (by slice, with a warning, without ids).

    Example: stitchnet-tf split -d data/demo/labelled -o data/demo/split.json --seed 0
    """
    from stitchnet_tf.data.splits import split_dataset, withhold_labels

    dataset = _discover(data, mask_values, patient_pattern, masks_subdir, lungs_subdir)
    result = split_dataset(dataset, fractions, seed, warn=_warn)
    if max_labelled is not None or label_fraction is not None:
        result = withhold_labels(result, dataset, max_labelled, label_fraction, seed)
    result.save(output)
    counts = ", ".join(f"{p} {len(result.part(p))}" for p in ("train", "val", "test"))
    unlabelled = f" ({len(result.unlabelled)} train slices unlabelled)" if result.unlabelled else ""
    click.echo(f"split by {result.by}: {counts}{unlabelled} -> {output}")


def main() -> None:
    """Console entry point."""
    cli(prog_name="stitchnet-tf")


if __name__ == "__main__":
    main()
