"""The end-to-end demo on the embedded synthetic data: the README's main job.

Generates a synthetic CT dataset, splits it by patient, trains StitchNet (labelled + unlabelled)
and the MobileNetV2 U-Net (labelled only) briefly at a small size, evaluates both on the test
patients (Table 1 layout), and draws StitchNet's styles and prior samples.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from stitchnet_tf.data.datasets import discover
from stitchnet_tf.data.splits import split_dataset
from stitchnet_tf.data.synthetic import write_demo_dataset
from stitchnet_tf.fileio import atomic_write_text, check_output_dir

#: written first, rewritten with the results at the end: marks a demo folder for --overwrite
DEMO_MARKER = "demo.json"
#: the demo shows the generative half too: p(y | z) is trained (docs/DESIGN.md §7.15)
TINY_STITCHNET = dict(width=0.25, backbone_alpha=0.35, generative_weight=1.0)
TINY_UNET = dict(width=0.25, alpha=0.35)


def run_demo(
    output: str | os.PathLike,
    *,
    size: int = 64,
    epochs: int = 6,
    steps_per_epoch: int = 40,
    batch_size: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    verbose: int | str = 2,
    log=print,
) -> dict:
    """Run the demo into `output`; returns the paths of its report and runs."""
    from stitchnet_tf.evaluation import evaluate
    from stitchnet_tf.figures import sample_figure, styles_figures
    from stitchnet_tf.inference import load_model
    from stitchnet_tf.training import TrainConfig, train

    out = Path(output)
    check_output_dir(out, overwrite, marker=DEMO_MARKER)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    start = time.time()
    out.mkdir(parents=True)
    atomic_write_text(out / DEMO_MARKER, json.dumps({"status": "running"}) + "\n")
    data = out / "data"
    log(f"writing synthetic CT to {data}")
    write_demo_dataset(
        data,
        labelled_patients=10,
        unlabelled_patients=6,
        slices_per_patient=6,
        size=max(96, size),
        seed=seed,
    )
    labelled = discover(data / "labelled")
    split = split_dataset(labelled, seed=seed)
    split.save(out / "split.json")

    results, loaded = {}, {}
    for name, options in (("stitchnet", TINY_STITCHNET), ("unet", TINY_UNET)):
        log(f"training {name} ({epochs} epochs x {steps_per_epoch} steps at {size}x{size})")
        config = TrainConfig(
            labelled=str(data / "labelled"),
            unlabelled=str(data / "unlabelled") if name == "stitchnet" else None,
            output=str(out / "runs" / name),
            model=name,
            size=size,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            # StitchNet: half the labelled slices plus as many unlabelled (the same compute)
            batch_size=batch_size // 2 if name == "stitchnet" else batch_size,
            unlabelled_per_batch=batch_size // 2 if name == "stitchnet" else None,
            learning_rate=3e-3,
            seed=seed,
            split=str(out / "split.json"),
            cache=True,
            model_options=options,
        )
        summary = train(config, verbose=verbose, log=log)
        loaded[name] = load_model(out / "runs" / name)  # loaded once for the report and figures
        evaluation = evaluate(
            out / "runs" / name,
            data / "labelled",
            out / "eval" / name,
            split=out / "split.json",
            part="test",
            log=log,
            loaded=loaded[name],
        )
        results[name] = {
            "train": summary,
            "evaluation": {k: evaluation[k] for k in ("slices", "scheme", "seconds")},
            "summary": evaluation["summary"],
        }
    report = [
        "# stitchnet-tf demo (synthetic CT)",
        "",
        f"{len(split.train)} train / {len(split.val)} val / {len(split.test)} test slices "
        "(split by patient); StitchNet also saw the unlabelled slices.",
        "",
    ]
    for name, r in results.items():
        report.append(f"## {name}\n")
        report.append((out / "eval" / name / "metrics.md").read_text())
        report.append(
            f"Training: {r['train']['epochs_done']} epochs in "
            f"{r['train']['seconds']:.0f} s; best epoch {r['train']['best_epoch']}.\n"
        )
    test_images = out / "test_images"
    test_images.mkdir(exist_ok=True)
    for sample in labelled.subset(split.test).samples[:4]:
        src = Path(sample.image)
        (test_images / src.name).write_bytes(src.read_bytes())
    stitchnet = out / "runs" / "stitchnet"
    recon = styles_figures(
        stitchnet, test_images, out / "styles", size=size, loaded=loaded["stitchnet"]
    )
    sample_figure(stitchnet, out / "samples", n=4, size=size, seed=seed, loaded=loaded["stitchnet"])
    seconds = time.time() - start
    if recon["lung_mae_mean"] is not None:
        report.append(
            "StitchNet's stitched reconstruction of 4 test slices: mean absolute error inside "
            f"the lung {recon['lung_mae_mean']:.3f} (intensities in [0, 1]).\n"
        )
    report.append(
        f"Total demo time {seconds / 60:.1f} min. Figures: `styles/`, `samples/`, "
        "`runs/*/curves.png`."
    )
    atomic_write_text(out / "REPORT.md", "\n".join(report) + "\n")
    atomic_write_text(out / DEMO_MARKER, json.dumps(results, indent=1, default=str) + "\n")
    return {
        "report": str(out / "REPORT.md"),
        "seconds": seconds,
        "runs": {k: str(out / "runs" / k) for k in results},
    }
