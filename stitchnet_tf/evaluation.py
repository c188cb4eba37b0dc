"""Evaluating a trained model on a labelled folder: the paper's Table 1, per image and class.

Each slice is preprocessed with the lung field from the image alone (a supplied lung mask, else
the lung segmenter; the label is used only for scoring), segmented, its class probabilities are
mapped back onto the original slice and the argmax is scored there against the stored mask.
Masks that tell GGO from consolidation are scored per class (GGO, consolidation, background =
no lesion); binary lesion masks as lesion vs no lesion. `SliceScorer` is that scoring, reusable
(e.g. for choosing the training epoch); `evaluate` writes its reports. Beside the per-slice
table, `evaluate` stacks the original-geometry label maps of each case (a volume, or a
patient's 2-D slices; `data.cases`) and scores them in 3-D (`volume_metrics`: Dice, HD95).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stitchnet_tf.data.cases import CASE_KINDS, CasePlan, plan_cases
from stitchnet_tf.data.classes import ALL, BACKGROUND, CON, GGO, bits
from stitchnet_tf.data.datasets import Dataset, DatasetSpec
from stitchnet_tf.data.intensity import check_intensity
from stitchnet_tf.data.preprocess import (
    DEFAULT_MARGIN,
    Prepared,
    check_model_size,
    check_prepared_intensity,
    read_sample,
)
from stitchnet_tf.data.splits import Split
from stitchnet_tf.errors import DataError
from stitchnet_tf.fileio import (
    atomic_dir,
    atomic_write_text,
    check_model_output,
)
from stitchnet_tf.inference import (
    LoadedModel,
    Predictor,
    check_stitchnet_options,
    labels_to_original,
    load_model,
    model_intensity,
    prepare_inputs,
)
from stitchnet_tf.metrics import Table1, lesion_dice, mean_lesion_dice
from stitchnet_tf.progress import expect
from stitchnet_tf.run import Run
from stitchnet_tf.volume_metrics import Block, VolumeTable, summary_markdown, volume_classes

#: the summary written last: marks a folder written by `evaluate` (what --overwrite may replace)
EVALUATION_MARKER = "evaluation.json"


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


@dataclass
class ScoredSlice:
    """A labelled slice ready to score: its id, the label-free `Prepared` input and the truth
    as allowed-set bits [H, W] uint8 in the original geometry."""

    id: str
    prepared: Prepared
    truth: np.ndarray


class SliceScorer:
    """Per-image Table-1 scores of models on labelled slices: exactly what `evaluate` reports.

    Args:
        dataset: the labelled slices to score (e.g. a split's val part).
        size: model size S.
        segmenter: lung segmenter for slices without a lung mask (default: the package's).
        absent: empty-truth policy of `Table1` (`exclude`, `zero`, `one`).
        batch_size: slices per model call.
        margin: crop margin around the lung field.
        cache: read and prepare the slices once, here (False: on every pass, for large sets).
        intensity: intensity preprocessing (`none`, `standardise`); the models scored must use
            the same (`table` checks).
    """

    def __init__(
        self,
        dataset: Dataset,
        size: int,
        segmenter=None,
        *,
        absent: str = "exclude",
        batch_size: int = 8,
        margin: float = DEFAULT_MARGIN,
        cache: bool = True,
        intensity: str = "none",
    ):
        if not dataset.samples:
            raise DataError(dataset.root, "no slices to score")
        if segmenter is None:
            from stitchnet_tf.data.lung_unet import default_segmenter

            segmenter = default_segmenter()
        self.dataset, self.size, self.segmenter = dataset, check_model_size(size), segmenter
        self.scheme, self.absent = scheme_for(dataset), absent
        self.batch_size, self.margin = max(1, int(batch_size)), margin
        self.intensity = check_intensity(intensity)
        check_prepared_intensity(dataset, intensity)
        Table1(self.scheme, absent)  # checks the options
        self._cache = [s for chunk in self._read_all() for s in chunk] if cache else None

    def __len__(self) -> int:
        return len(self.dataset.samples)

    def _read_all(self) -> Iterator[list[ScoredSlice]]:
        samples = self.dataset.samples
        cropped = self.dataset.prepared_size is not None
        for i in range(0, len(samples), self.batch_size):
            chunk = samples[i : i + self.batch_size]
            raws = [read_sample(s, self.dataset.mask_map) for s in chunk]
            prepared = prepare_inputs(
                raws, self.size, self.segmenter, self.margin, cropped, self.intensity
            )
            yield [
                ScoredSlice(s.id, p, r.allowed)
                for s, p, r in zip(chunk, prepared, raws, strict=True)
            ]

    def batches(self) -> Iterator[list[ScoredSlice]]:
        """The slices in batches of `batch_size` (from the cache when there is one)."""
        if self._cache is None:
            yield from self._read_all()
            return
        for i in range(0, len(self._cache), self.batch_size):
            yield self._cache[i : i + self.batch_size]

    def _check_intensity(self, model) -> None:
        trained = model_intensity(model)
        if trained != self.intensity:
            raise DataError(
                None,
                f"the model was trained with intensity '{trained}', "
                f"these slices are prepared with '{self.intensity}'",
            )

    def table(
        self,
        model,
        *,
        samples: int = 0,
        decision: str | None = None,
        progress: Callable[[int], None] | None = None,
        tta: bool = False,
        on_slice: Callable[[str, np.ndarray, np.ndarray], None] | None = None,
    ) -> Table1:
        """Segment every slice with `model` (its `segment(x, lung)`, inference mode; `tta`:
        averaged over flips) and score the labels in the original geometry; returns the
        filled `Table1`. `on_slice(id, labels, truth)` is called with every slice's predicted
        labels and truth bits in the original geometry (e.g. `CaseStacker.add`)."""
        self._check_intensity(model)
        predictor = Predictor(
            model, self.size, self.segmenter, samples, decision, self.margin, tta=tta
        )
        table = Table1(scheme=self.scheme, absent=self.absent)
        for chunk in self.batches():
            predictions = predictor.predict_prepared([s.prepared for s in chunk])
            for s, pred in zip(chunk, predictions, strict=True):
                table.add(s.id, pred.labels, s.truth)
                if on_slice:
                    on_slice(s.id, pred.labels, s.truth)
            if progress:
                progress(len(chunk))
        return table

    def offset_scores(
        self, model, offsets: tuple[float, ...], *, decision: str | None = None
    ) -> list[dict]:
        """`score` of a Keras `model` with each lesion offset b of `offsets` (lesion
        probabilities × e^b before the argmax, `models.base.calibrate_lesion`), from one
        prediction pass; the model's own `lesion_offset` is set aside meanwhile."""
        self._check_intensity(model)
        saved = model.lesion_offset
        cached = []
        try:
            model.lesion_offset = 0.0
            predictor = Predictor(model, self.size, self.segmenter, 0, decision, self.margin)
            for chunk in self.batches():
                predictions = predictor.predict_prepared([s.prepared for s in chunk])
                cached += [(s, p) for s, p in zip(chunk, predictions, strict=True)]
        finally:
            model.lesion_offset = saved
        from stitchnet_tf.models.base import lesion_scale

        out = []
        for b in offsets:
            scale = lesion_scale(b)
            table = Table1(scheme=self.scheme, absent=self.absent)
            for s, p in cached:
                # as `calibrate_lesion`: renormalised (the argmax follows upsampling), b = 0 as is
                scaled = p.probabilities
                if b:
                    scaled = scaled * scale
                    scaled /= np.maximum(scaled.sum(-1, keepdims=True), 1e-12)
                labels = labels_to_original(scaled, p.geometry, p.field)
                table.add(s.id, labels, s.truth)
            out.append(summarize(table))
        return out

    def choose_calibration(self, model) -> dict:
        """The decision rule (StitchNet's `options.DECISIONS`; None for a model without one) and
        lesion offset b (`models.base.LESION_OFFSETS`) that score best on these slices, as
        `train --decision auto` keeps them: ties go to the smaller |b|, then the earlier rule.
        Returns {"decision", "lesion_offset", "scores" (`score` at that pair), "plain" (rule ->
        `score` at b = 0), "plain_decision" (the rule that scores best at b = 0, ties to the
        earlier rule)}; the model is left unchanged."""
        from stitchnet_tf.models.base import LESION_OFFSETS
        from stitchnet_tf.options import DECISIONS

        rules = list(DECISIONS) if getattr(model, "decision", None) is not None else [None]
        by_rule = {r: self.offset_scores(model, LESION_OFFSETS, decision=r) for r in rules}
        plain = {r: by_offset[LESION_OFFSETS.index(0.0)] for r, by_offset in by_rule.items()}
        rule, offset = best_calibration(
            {r: [s["mean_lesion_dice"] for s in by_offset] for r, by_offset in by_rule.items()}
        )
        scores = by_rule[rule][LESION_OFFSETS.index(offset)]

        def plain_value(r: str | None) -> tuple[float, int]:
            value = plain[r]["mean_lesion_dice"]
            return (-1.0 if value is None else value, -rules.index(r))

        return {
            "decision": rule,
            "lesion_offset": offset,
            "scores": scores,
            "plain": plain,
            "plain_decision": max(rules, key=plain_value),
        }

    def score(
        self, model, *, samples: int = 0, decision: str | None = None, tta: bool = False
    ) -> dict:
        """`Table1.summary()` of `model` on the slices, plus `lesion_dice` (lesion class ->
        per-image mean F1) and `mean_lesion_dice` (their mean; None without lesions)."""
        return summarize(self.table(model, samples=samples, decision=decision, tta=tta))


def best_calibration(by_rule: dict[str | None, list[float | None]]) -> tuple[str | None, float]:
    """`train --decision auto`'s choice: the (decision rule, lesion offset b) with the best
    score, from rule -> mean lesion Dice at each b of `models.base.LESION_OFFSETS` (None: no
    lesion scored, ranked lowest); ties go to the smaller |b|, then the earlier rule, then the
    earlier offset."""
    from stitchnet_tf.models.base import LESION_OFFSETS

    best = None
    for rule, values in by_rule.items():
        for offset, value in zip(LESION_OFFSETS, values, strict=True):
            key = (-1.0 if value is None else value, -abs(offset))
            if best is None or key > best[0]:
                best = (key, rule, offset)
    return best[1], best[2]


def summarize(table: Table1) -> dict:
    """A table's summary with its per-image lesion Dice (`lesion_dice`, `mean_lesion_dice`)."""
    summary = table.summary()
    return summary | {
        "lesion_dice": lesion_dice(summary),
        "mean_lesion_dice": mean_lesion_dice(summary),
    }


class CaseStacker:
    """Stacks the scored slices of each case of a `CasePlan` and scores the case in a
    `VolumeTable` as soon as all its slices are in (only unfinished cases are held).

    A volume's slices go to their slice index; slices of the volume between them that were not
    scored are filled with unknown truth (ignored by every class) and background prediction. A
    patient's 2-D slices are stacked in order, in runs of one slice size.
    """

    def __init__(self, plan: CasePlan, table: VolumeTable):
        self.plan, self.table = plan, table
        self._open: dict[str, dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]] = {}
        self._seen: dict[str, int] = {}

    def add(self, sample_id: str, labels: np.ndarray, truth: np.ndarray) -> None:
        """One slice's predicted labels [H, W] and truth bits [H, W] (original geometry)."""
        where = self.plan.slices.get(sample_id)
        if where is None:  # in no case
            return
        block = self._open.setdefault(where.case, {}).setdefault(where.block, {})
        block[where.position] = (np.asarray(labels, np.uint8), np.asarray(truth, np.uint8))
        self._seen[where.case] = self._seen.get(where.case, 0) + 1
        if self._seen[where.case] == self.plan.counts[where.case]:
            self._score(where.case)

    def _blocks(self, block: str, slices: dict[int, tuple[np.ndarray, np.ndarray]]):
        positions = sorted(slices)
        if block in self.plan.volume_blocks:
            shape = slices[positions[0]][0].shape
            gap = (np.full(shape, BACKGROUND, np.uint8), np.full(shape, ALL, np.uint8))
            positions = range(positions[0], positions[-1] + 1)
            stack = [slices.get(k, gap) for k in positions]
        else:
            stack = [slices[k] for k in positions]
        start = 0
        for end in range(1, len(stack) + 1):  # runs of one slice size
            if end == len(stack) or stack[end][0].shape != stack[start][0].shape:
                run = stack[start:end]
                yield Block(
                    np.stack([p for p, _ in run]),
                    np.stack([t for _, t in run]),
                    self.plan.spacing[block],
                )
                start = end

    def _score(self, case: str) -> None:
        blocks = [b for key, s in self._open.pop(case).items() for b in self._blocks(key, s)]
        self.table.add(case, blocks, kind=self.plan.kinds[case], slices=self._seen[case])

    def finish(self) -> VolumeTable:
        """The table, after checking that every case was complete."""
        if self._open:
            raise RuntimeError(f"cases with missing slices: {', '.join(sorted(self._open))}")
        return self.table


def _write_volumes(folder: Path, table: VolumeTable, summary: dict, paths: dict) -> Path:
    """`volumes.csv`, and the per-volume section appended to metrics.md and metrics.json."""
    out = folder / "volumes.csv"
    atomic_write_text(out, table.to_csv())
    md = Path(paths["markdown"])
    section = summary_markdown(summary, summary["note"], title="Per-volume 3-D metrics")
    atomic_write_text(md, md.read_text() + "\n" + section)
    metrics = json.loads(Path(paths["json"]).read_text())
    atomic_write_text(
        Path(paths["json"]), json.dumps(metrics | {"volumes": summary}, indent=2) + "\n"
    )
    return out


def lung_field_source(dataset: Dataset) -> str:
    """Where evaluation takes a dataset's lung field from (never from its labels)."""
    if dataset.prepared_size is not None:
        return "the preprocessed folder's lung masks (written by preprocess)"
    supplied = sum(s.lung is not None for s in dataset.samples)
    if supplied == len(dataset.samples):
        return "supplied lung masks"
    return "lung segmenter" if not supplied else "supplied lung masks, else the lung segmenter"


def evaluate(
    model_path: str | os.PathLike,
    data: str | os.PathLike | DatasetSpec,
    output: str | os.PathLike,
    *,
    split: str | os.PathLike | None = None,
    part: str | None = None,
    size: int | None = None,
    absent: str = "exclude",
    batch_size: int = 8,
    samples: int = 0,
    decision: str | None = None,
    tta: bool = False,
    segmenter=None,
    overwrite: bool = False,
    progress=None,
    log=print,
    cases: str = "volume",
    loaded: LoadedModel | None = None,
) -> dict:
    """Score a model on the labelled slices of `data` (a folder, or a `DatasetSpec` saying how
    to read it); write the reports into the folder
    `output` (atomically; a non-empty folder only with `overwrite` and only when it holds an
    earlier evaluation.json).

    With a run folder as the model and no `split`, its own split.json is used when the run
    was trained on the same folder (its test part, or `part`). The lung field comes from the
    folder's lung masks, else `segmenter` (default: the package's). Returns the summary dict
    (with `mean_lesion_dice`).

    Besides the per-slice Table 1 (metrics.md/.csv/.json, metrics_per_image.csv) it writes
    volumes.csv: per case 3-D Dice and HD95 (`volume_metrics`), whose means are a section of
    metrics.md and the `volumes` entry of metrics.json. Cases (`data.cases.plan_cases`): each
    volume file, or with `cases="patient"` each patient; 2-D slice files are stacked per patient
    (none without patient ids). `loaded`: the model at `model_path`, already loaded
    (`inference.load_model`; a StitchNet load costs seconds).
    """
    spec = DatasetSpec.of(data)
    data = spec.path
    inputs = {"--data": data, "--split": split}
    check_model_output(output, model_path, inputs, overwrite=overwrite, marker=EVALUATION_MARKER)
    check_stitchnet_options(model_path, samples, decision)
    if cases not in CASE_KINDS:
        raise DataError(None, f"unknown case grouping {cases!r}: use {', '.join(CASE_KINDS)}")
    dataset = spec.discover(require_labels=True)
    loaded = loaded or load_model(model_path)
    size = loaded.input_size(size)
    chosen = None
    if split is not None:
        chosen = Split.load(split)
    elif loaded.run is not None and Run(loaded.run).split_path.is_file():
        config = Run(loaded.run).config()
        if config is not None and Path(config.labelled).resolve() == Path(data).resolve():
            chosen = Split.load(Run(loaded.run).split_path)
            part = part or ("test" if chosen.test else "val")
            log(f"using the run's split: its {part} part")
    if chosen is None and part is not None:
        raise DataError(data, f"--part {part} needs --split (or a run trained on this folder)")
    subset = select(dataset, chosen, part)
    if not len(subset):
        raise DataError(data, f"no slices to evaluate in the split's {part!r} part")
    scorer = SliceScorer(
        subset,
        size,
        segmenter,
        absent=absent,
        batch_size=batch_size,
        cache=False,
        intensity=model_intensity(loaded.model),
    )
    plan = plan_cases(subset, cases)
    volume_table = VolumeTable(
        volume_classes(scorer.scheme, subset.mask_map.mapping.values()), absent
    )
    stacker = CaseStacker(plan, volume_table)
    expect(progress, len(subset))
    start = time.time()
    table = scorer.table(
        loaded.model,
        samples=samples,
        decision=decision,
        progress=progress,
        tta=tta,
        on_slice=stacker.add,
    )
    volumes = stacker.finish().summary() | {"cases": cases, "note": plan.describe()}
    seconds = time.time() - start
    name = type(loaded.model).__name__
    summary = summarize(table)
    info = {
        "model": str(loaded.path),
        "model_class": name,
        "data": str(data),
        "split": None if chosen is None else (str(split) if split else "run split.json"),
        "part": part if chosen is not None else "all",
        "slices": len(subset),
        "size": size,
        "scheme": scorer.scheme,
        "absent": absent,
        "tta": tta,
        "intensity": scorer.intensity,
        "geometry": "preprocessed slices" if dataset.prepared_size else "original slices",
        "lung_field": lung_field_source(subset),
        "seconds": seconds,
    }
    with atomic_dir(output, overwrite, marker=EVALUATION_MARKER) as tmp:
        paths = table.write(tmp, stem="metrics", model_name=name)
        paths["volumes_csv"] = _write_volumes(tmp, volume_table, volumes, paths)
        report = info | {"summary": summary, "volumes": volumes}
        atomic_write_text(tmp / EVALUATION_MARKER, json.dumps(report, indent=1) + "\n")
    paths = {k: Path(output) / Path(v).name for k, v in paths.items()}
    return report | {"files": {k: str(v) for k, v in paths.items()}}
