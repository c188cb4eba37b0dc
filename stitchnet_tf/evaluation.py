"""Evaluating a trained model on a labelled folder: the paper's Table 1, per image and class.

Predictions are mapped back through the preprocessing onto each original slice, and scored
against the stored masks there. Masks that tell GGO from consolidation are scored per class
(GGO, consolidation, background = no lesion); binary lesion masks as lesion vs no lesion.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from stitchnet_tf.data.classes import CON, GGO, bits
from stitchnet_tf.data.datasets import Dataset, discover
from stitchnet_tf.data.preprocess import read_sample
from stitchnet_tf.data.splits import Split
from stitchnet_tf.errors import DataError
from stitchnet_tf.fileio import atomic_write_text
from stitchnet_tf.inference import Predictor, load_model
from stitchnet_tf.metrics import Table1


def scheme_for(dataset: Dataset) -> str:
    """`multiclass` when the masks distinguish GGO and consolidation, else `lesion`."""
    values = set(dataset.mask_map.mapping.values())
    return "multiclass" if {bits(GGO), bits(CON)} & values else "lesion"


def select(dataset: Dataset, split: Split | None, part: str | None) -> Dataset:
    """The samples of a split's part (all of them without a split)."""
    if split is None:
        return dataset
    split.check(dataset)
    return dataset.subset(split.part(part or "test"))


def evaluate(
    model_path: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    *,
    split: str | os.PathLike | None = None,
    part: str | None = None,
    size: int | None = None,
    absent: str = "exclude",
    batch_size: int = 8,
    samples: int = 0,
    decision: str | None = None,
    mask_values: str | None = None,
    patient_pattern: str | None = None,
    masks_subdir: str = "masks",
    lungs_subdir: str = "lungs",
    progress=None,
    log=print,
) -> dict:
    """Score a model on the labelled slices of `data`; write the reports into `output`.

    With a run folder as the model and no `split`, its own split.json is used when the run
    was trained on the same folder (its test part, or `part`). Returns the summary dict.
    """
    dataset = discover(
        data,
        mask_values=mask_values,
        patient_pattern=patient_pattern,
        masks_subdir=masks_subdir,
        lungs_subdir=lungs_subdir,
        require_labels=True,
    )
    loaded = load_model(model_path)
    size = size or loaded.size
    if size is None:
        raise DataError(model_path, "model size unknown (no config.json beside it): pass --size")
    chosen = None
    if split is not None:
        chosen = Split.load(split)
    elif loaded.run is not None and (loaded.run / "split.json").is_file():
        config = json.loads((loaded.run / "config.json").read_text())
        if Path(config.get("labelled", "")).resolve() == Path(data).resolve():
            chosen = Split.load(loaded.run / "split.json")
            part = part or ("test" if chosen.test else "val")
            log(f"using the run's split: its {part} part")
    subset = select(dataset, chosen, part)
    if not len(subset):
        raise DataError(data, f"no slices to evaluate in the split's {part!r} part")
    scheme = scheme_for(dataset)
    table = Table1(scheme=scheme, absent=absent)
    predictor = Predictor(loaded.model, size, samples=samples, decision=decision)
    start = time.time()
    samples_list = subset.samples
    for i in range(0, len(samples_list), batch_size):
        chunk = samples_list[i : i + batch_size]
        raws = [read_sample(s, dataset.mask_map) for s in chunk]
        for sample, raw, pred in zip(
            chunk,
            raws,
            predictor.predict(raws, already_cropped=dataset.prepared_size is not None),
            strict=True,
        ):
            table.add(sample.id, pred.labels, raw.allowed)
        if progress:
            progress(len(chunk))
    seconds = time.time() - start
    name = type(loaded.model).__name__
    paths = table.write(output, stem="metrics", model_name=name)
    summary = table.summary()
    info = {
        "model": str(loaded.path),
        "model_class": name,
        "data": str(data),
        "split": None if chosen is None else (str(split) if split else "run split.json"),
        "part": part if chosen is not None else "all",
        "slices": len(subset),
        "size": size,
        "scheme": scheme,
        "absent": absent,
        "geometry": "preprocessed slices" if dataset.prepared_size else "original slices",
        "seconds": seconds,
    }
    atomic_write_text(
        Path(output) / "evaluation.json", json.dumps(info | {"summary": summary}, indent=1) + "\n"
    )
    return info | {"summary": summary, "files": {k: str(v) for k, v in paths.items()}}
