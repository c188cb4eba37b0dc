"""Looking inside the generative model: style images (paper Fig. 6b) and samples from the prior."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stitchnet_tf.data import io
from stitchnet_tf.errors import DataError
from stitchnet_tf.fileio import atomic_dir, check_model_output
from stitchnet_tf.inference import LoadedModel, load_model, model_class
from stitchnet_tf.options import SAMPLE_TEMPERATURE
from stitchnet_tf.predict import LABEL_PALETTE, _inputs
from stitchnet_tf.progress import Progress, expect, step

#: files that mark the folders written by `styles` and `sample` (what --overwrite may replace)
STYLES_MARKER = "reconstruction.json"
SAMPLES_MARKER = "samples.png"

STYLE_TITLES = (
    "input x",
    "background",
    "healthy",
    "GGO",
    "consolidation",
    "stitched",
    "segmentation",
)


def _colour(labels: np.ndarray) -> np.ndarray:
    palette = np.asarray(LABEL_PALETTE, np.uint8).reshape(-1, 3)
    return palette[labels]


def _check_stitchnet(model_path) -> None:
    """Refuse a model without styles before anything slow happens (loading takes seconds)."""
    kind = model_class(model_path)
    if kind is not None and kind != "StitchNet":
        what = "an exported model" if kind == "exported" else f"a {kind}"
        raise DataError(model_path, f"{what} has no styles: a StitchNet .keras model is needed")


def _stitchnet(model_path, loaded: LoadedModel | None = None) -> LoadedModel:
    loaded = loaded or load_model(model_path)
    if not hasattr(loaded.model, "styles"):
        raise DataError(
            model_path, f"{type(loaded.model).__name__} has no styles: a StitchNet model is needed"
        )
    return loaded


def _save_grid(rows: list[list[np.ndarray]], titles, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(rows[0])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.8 * n_cols, 1.9 * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            ax = axes[r][c]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1) if image.ndim == 2 else ax.imshow(image)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def styles_figures(
    model_path,
    input_path,
    output,
    *,
    size: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    loaded: LoadedModel | None = None,
) -> dict:
    """For each input slice: x, the four style images E[Beta_k], the stitched reconstruction and
    the segmentation side by side (`<name>_styles.png`), as the paper's Fig. 6b. `progress`:
    see `stitchnet_tf.progress` (one unit a figure); `loaded`: the model at `model_path`,
    already loaded (`inference.load_model`; a StitchNet load costs seconds)."""
    from stitchnet_tf.data.preprocess import RawSlice, prepare

    inputs = {"--input": input_path}
    check_model_output(output, model_path, inputs, overwrite=overwrite, marker=STYLES_MARKER)
    _check_stitchnet(model_path)
    images = []  # (path, slice, image): all read before the model loads (seconds)
    for path in _inputs(Path(input_path)):
        n = io.slice_count(path)
        for k in [None] if n is None else [n // 2]:  # volumes: the middle slice
            images.append((path, k, io.read_image(path, k)))
            io.check_size(images[-1][2].shape, path)
    loaded = _stitchnet(model_path, loaded)
    size = loaded.input_size(size)
    from stitchnet_tf.data.classes import ALL
    from stitchnet_tf.data.lung_unet import default_segmenter

    segmenter = default_segmenter()
    written, errors = 0, {}
    expect(progress, len(images))
    with atomic_dir(output, overwrite, marker=STYLES_MARKER) as tmp:
        for path, k, image in images:
            p = prepare(RawSlice(image, np.full(image.shape, ALL, np.uint8), None), size, segmenter)
            x = p.x[None, ..., None].astype(np.float32)
            lung = p.lung[None, ..., None].astype(np.float32)
            out = {k2: np.asarray(v)[0] for k2, v in loaded.model.styles(x, lung).items()}
            row = [
                p.x,
                *[out["styles"][..., c] for c in range(4)],
                out["stitched"][..., 0],
                _colour(out["labels"].astype(np.int64)),
            ]
            name = io.stem_of(path) + ("" if k is None else f"_{k:04d}")
            inside = p.lung.astype(bool)
            if inside.any():  # how well the stitch rebuilds the CT, inside the lung field
                errors[name] = float(np.abs(out["stitched"][..., 0] - p.x)[inside].mean())
            titles = list(STYLE_TITLES)
            if name in errors:
                titles[5] = f"stitched (MAE {errors[name]:.3f})"
            _save_grid([row], titles, tmp / f"{name}_styles.png")
            written += 1
            step(progress)
        mean = float(np.mean(list(errors.values()))) if errors else None
        summary = {"figures": written, "lung_mae_mean": mean, "lung_mae": errors}
        (tmp / STYLES_MARKER).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def sample_figure(
    model_path,
    output,
    *,
    n: int = 8,
    size: int | None = None,
    seed: int = 0,
    temperature: float = SAMPLE_TEMPERATURE,
    overwrite: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    loaded: LoadedModel | None = None,
) -> dict:
    """Draw n slices with their segmentations from the prior, every prior σ scaled by
    `temperature`: `samples.png` and per-sample `sample_<i>.png` / `sample_<i>_labels.png`
    (indexed, the label palette). `log` hears the drawing (one call for all n), `progress`
    (`stitchnet_tf.progress`) one unit per sample written; `loaded` as for `styles_figures`."""
    import keras

    if not 0 < temperature <= 2:
        raise ValueError(f"temperature must be in (0, 2], got {temperature}")
    check_model_output(output, model_path, overwrite=overwrite, marker=SAMPLES_MARKER)
    _check_stitchnet(model_path)
    loaded = _stitchnet(model_path, loaded)
    size = loaded.input_size(size)
    keras.utils.set_random_seed(seed)
    if log is not None:
        log(f"drawing {n} samples of {size} px from the prior")
    generated = loaded.model.generate(n, size, temperature=temperature)
    expect(progress, n)
    gen = {k: np.asarray(v) for k, v in generated.items()}
    with atomic_dir(output, overwrite, marker=SAMPLES_MARKER) as tmp:
        rows = []
        for i in range(n):
            io.write_png(tmp / f"sample_{i}.png", np.rint(gen["x"][i, ..., 0] * 255))
            io.write_png(tmp / f"sample_{i}_labels.png", gen["labels"][i], LABEL_PALETTE)
            rows.append([gen["x"][i, ..., 0], _colour(gen["labels"][i])])
            step(progress)
        _save_grid(rows, ("sample x", "its segmentation"), tmp / SAMPLES_MARKER)
    return {"samples": n}
