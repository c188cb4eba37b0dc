"""Data commands: `demo-data`, `preprocess`, `split`."""

from __future__ import annotations

from pathlib import Path

import click

from stitchnet_tf.options import CROP_MARGIN, PAPER_SIZE
from stitchnet_tf_cli import console
from stitchnet_tf_cli.options import (
    SEED,
    check_model_size,
    data_options,
    intensity_option,
    split_options,
    warn,
    window_options,
)


@click.command("demo-data")
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
    with console.progress("demo-data", "slices", length=total) as bar:
        write_demo_dataset(
            output,
            labelled_patients=labelled_patients,
            unlabelled_patients=unlabelled_patients,
            slices_per_patient=slices,
            size=size,
            seed=seed,
            overwrite=overwrite,
            progress=bar,
        )
    parts = [
        p for p, n in (("labelled/", labelled_patients), ("unlabelled/", unlabelled_patients)) if n
    ]
    click.echo(f"wrote {total} synthetic slices to {output} ({', '.join(parts)})")


@click.command()
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
    default=PAPER_SIZE,
    show_default=True,
    type=int,
    callback=check_model_size,
    help="Model size (a multiple of 32).",
)
@window_options
@click.option(
    "--margin",
    default=CROP_MARGIN,
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
    reading,
):
    """Crop a dataset to the lung field at model size and write it with a manifest.

    Example: stitchnet-tf preprocess -i data/demo/labelled -o data/demo-prep/labelled --size 128
    """
    from stitchnet_tf.data.io import Window
    from stitchnet_tf.data.preprocess import preprocess_dataset

    dataset = reading(input_).discover(skip_bad=skip_bad, warn=warn)
    with console.progress("preprocess", "slices", length=len(dataset)) as bar:
        summary = preprocess_dataset(
            dataset,
            output,
            size=size,
            window=Window(window_level, window_width),
            margin=margin,
            intensity=intensity,
            overwrite=overwrite,
            skip_bad=skip_bad,
            warn=warn,
            progress=bar,
        )
    skipped = f", skipped {summary['skipped']} bad slices" if summary["skipped"] else ""
    click.echo(
        f"wrote {summary['count']} slices ({summary['labelled']} labelled) at "
        f"{size}x{size} to {output}{skipped}"
    )


@click.command()
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
@split_options
@click.option("--seed", default=0, show_default=True, type=SEED)
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
    reading,
):
    """Split a dataset train/val/test by patient (by slice, with a warning, without ids).

    Example: stitchnet-tf split -d data/demo/labelled -o data/demo/split.json --seed 0
    """
    from stitchnet_tf.data.preprocess import check_samples
    from stitchnet_tf.data.splits import check_split_output, split_dataset, withhold_labels

    check_split_output(output, data, overwrite)
    dataset = reading(data).discover(warn=warn)
    check_samples(dataset, dataset.samples)  # a corrupt slice is named now, not at training
    result = split_dataset(dataset, fractions, seed, warn=warn)
    if max_labelled is not None or label_fraction is not None:
        result = withhold_labels(result, dataset, max_labelled, label_fraction, seed)
    result.save(output)
    counts = ", ".join(f"{p} {len(result.part(p))}" for p in ("train", "val", "test"))
    unlabelled = f" ({len(result.unlabelled)} train slices unlabelled)" if result.unlabelled else ""
    click.echo(f"split by {result.by}: {counts}{unlabelled} -> {output}")
