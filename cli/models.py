"""Commands on a trained model: `evaluate`, `predict`, `styles`, `sample`, `export`."""

from __future__ import annotations

from pathlib import Path

import click

from stitchnet_tf.metrics import ABSENT_POLICIES
from stitchnet_tf.options import (
    DECISIONS,
    EXPORT_FORMATS,
    PARTS,
    QUANTIZE,
    SAMPLE_TEMPERATURE,
)
from stitchnet_tf_cli import console
from stitchnet_tf_cli.options import (
    SEED,
    data_options,
    model_options,
    stitchnet_options,
    tta_option,
    window_options,
)


@click.command()
@model_options
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
    type=click.Choice(PARTS),
    help="Part of the split to score (default test).",
)
@click.option(
    "--absent",
    default="exclude",
    show_default=True,
    type=click.Choice(ABSENT_POLICIES),
    help="Images where a class is absent from the truth: left out of that class's "
    "mean, scored 0 (authors' code), or 1 when nothing is predicted either.",
)
@click.option(
    "--cases",
    default="volume",
    show_default=True,
    type=click.Choice(["volume", "patient"]),
    help="3-D metrics (volumes.csv: Dice, HD95 in mm) per volume file, or per patient (all of "
    "a patient's volumes); 2-D slices are stacked per patient either way.",
)
@stitchnet_options
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
    cases,
    samples,
    decision,
    tta,
    overwrite,
    reading,
):
    """Score a model on labelled slices: IoU, F1 (Dice), recall, precision per class (Table 1).

    Predictions are mapped back onto each original slice; binary lesion masks are scored as
    lesion vs no lesion.

    Example: stitchnet-tf evaluate --model runs/demo --data data/demo/labelled -o runs/demo/eval
    """
    from stitchnet_tf.evaluation import evaluate as run_evaluation

    with console.progress("evaluate", "slices") as bar:
        result = run_evaluation(
            model_path,
            reading(data),
            output,
            split=split_file,
            part=part,
            size=size,
            absent=absent,
            cases=cases,
            samples=samples,
            decision=decision,
            tta=tta,
            overwrite=overwrite,
            progress=bar,
            log=console.info,
        )
    click.echo((Path(output) / "metrics.md").read_text())
    click.echo(f"scored {result['slices']} slices ({result['scheme']}) -> {output}")


@click.command()
@model_options
@click.option(
    "--input",
    "-i",
    "input_",
    required=True,
    type=click.Path(path_type=Path),
    help="A slice, a NIfTI volume, a DICOM file or folder (searched recursively for its "
    "series), or a folder of them.",
)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--uncertainty", is_flag=True, help="Also write predictive-entropy maps.")
@click.option(
    "--series",
    default=None,
    metavar="UID",
    help="SeriesInstanceUID to read from a DICOM folder (default: its largest axial CT series).",
)
@click.option(
    "--lungs",
    default=None,
    type=click.Path(path_type=Path),
    metavar="DIR",
    help="Your own lung masks instead of the shipped lung U-Net: <name>.nii.gz per volume "
    "(lungmask), <name>/lung_*.nii.gz (TotalSegmentator), <name>.png per slice.",
)
@stitchnet_options
@tta_option
@window_options
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def predict(
    model_path,
    size,
    input_,
    output,
    uncertainty,
    series,
    lungs,
    samples,
    decision,
    tta,
    window_level,
    window_width,
    overwrite,
):
    """Segment new slices or volumes: label masks in the input's geometry (NIfTI, and a
    DICOM-SEG for a DICOM series), overlays, burden.csv and statistics.json (mL, HU).

    Example: stitchnet-tf predict -m medseg-stitchnet -i scan/ -o out
    """
    from stitchnet_tf.data.io import Window
    from stitchnet_tf.predict import predict_path

    with console.progress("predict", "slices") as bar:
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
            series=series,
            lungs=lungs,
            log=console.info,
            progress=bar,
        )
    click.echo(
        f"segmented {result['slices']} slices ({result['volumes']} volumes) -> {output}; "
        f"lesion burden in {result['burden']}, volumes in {result['statistics']}"
    )


@click.command()
@model_options
@click.option("--input", "-i", "input_", required=True, type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True)
def styles(model_path, size, input_, output, overwrite):
    """Show StitchNet's four style images and the stitched reconstruction (paper Fig. 6b).

    Example: stitchnet-tf styles --model runs/demo --input data/demo/labelled/images -o styles
    """
    from stitchnet_tf.figures import styles_figures

    with console.progress("styles", "figures") as bar:
        result = styles_figures(
            model_path, input_, output, size=size, overwrite=overwrite, progress=bar
        )
    mae = result["lung_mae_mean"]
    error = "" if mae is None else f"; stitched reconstruction MAE inside the lung {mae:.3f}"
    click.echo(f"wrote {result['figures']} style figures -> {output}{error}")


@click.command()
@model_options
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

    with console.progress("sample", "samples") as bar:
        sample_figure(
            model_path,
            output,
            n=n,
            size=size,
            seed=seed,
            temperature=temperature,
            overwrite=overwrite,
            progress=bar,
            log=console.info,
        )
    click.echo(f"drew {n} samples at temperature {temperature:g} -> {output}")


@click.command()
@model_options
@click.option(
    "--format",
    "fmt",
    default="savedmodel",
    show_default=True,
    type=click.Choice(EXPORT_FORMATS),
)
@click.option(
    "--quantize",
    default="none",
    show_default=True,
    type=click.Choice(QUANTIZE),
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
@click.option("--decision", default=None, type=click.Choice(DECISIONS))
@click.option("--no-bytes", is_flag=True, help="SavedModel: no encoded-image signature.")
@click.option("--overwrite", is_flag=True, help="Replace an existing version or file.")
@tta_option
@data_options
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
    reading,
):
    """Export the segmentation path: SavedModel (TensorFlow Serving layout) or TFLite.

    SavedModel signatures: serving_default (image [B,S,S,1] in [0,1], preprocessed),
    serving_lung (image + lung field) and serving_bytes (encoded PNG/JPEG, preprocessing
    in the graph). Written atomically.

    Example: stitchnet-tf export --model runs/demo --format tflite --quantize float16
    """
    from stitchnet_tf.export import export as run_export

    with console.progress("export: calibration slices", "slices") as bar:
        result = run_export(
            model_path,
            fmt,
            quantize=quantize,
            output=output,
            version=version_,
            size=size,
            data=reading(data),
            count=count,
            decision=decision,
            bytes_signature=not no_bytes,
            overwrite=overwrite,
            tta=tta,
            progress=bar,
            log=console.info,
        )
    click.echo(
        f"exported {fmt}{'' if fmt == 'savedmodel' else ' (' + quantize + ')'} at "
        f"{result['size']} px -> {result['path']} ({result['bytes'] / 1e6:.1f} MB)"
    )


@click.command("list-models")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def list_models(as_json):
    """List the shipped models that `--model NAME` accepts, and whether each is installed.

    Example: stitchnet-tf predict -m medseg-stitchnet -i scan/ -o out/
    """
    import json

    from stitchnet_tf.shipped import list_models as rows

    table = rows()
    if as_json:
        click.echo(json.dumps(table, indent=2))
        return
    for r in table:
        state = f"{r['size_mb']} MB" if r["installed"] else "NOT INSTALLED"
        click.echo(f"{r['name']:<18} {r['kind']:<7} {state:<14} {r['description']}")
        click.echo(f"{'':<18} card: {r['card']}")
