"""Reading a `.nii.gz` volume: one whole read against slice-by-slice reads (issue 15).

Usage (from the repository root):
    python benchmarks/volume_read.py [--shape 256 256 120] [--repeats 3] [--output DIR]

Writes a 256×256×120 int16 `.nii.gz` (a noisy body-and-lungs phantom, so that it compresses
like CT) to a temporary folder and times, best of `--repeats` each ((a) and (b) interleaved):

(a) `volumes.read_volume`: the whole volume, once, in canonical orientation;
(b) every slice through `io.read_image(path, k)`, as training and evaluation read slices (the
    volume cache emptied first, so this includes its one whole read, plus the windowing);
(c) the reading of earlier versions: `nib.load` and `dataobj[..., k]` for every slice, then
    transposed and windowed as `io.read_image` did (each slice decompresses the file up to it).

The acceptance bound is (b)/(a) <= 1.5. Writes volume_read.json and volume_read.md to --output
(default benchmarks/results) with the machine described.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lungmask_dice import machine  # noqa: E402

from stitchnet_tf.data import io, volumes  # noqa: E402

BOUND = 1.5


def phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """int16 HU [X, Y, Z]: air, a soft-tissue ellipse, two lungs, Gaussian noise (sd 20 HU)."""
    nx, ny, nz = shape
    x = np.linspace(-1, 1, nx)[:, None, None]
    y = np.linspace(-1, 1, ny)[None, :, None]
    z = np.linspace(0, 1, nz)[None, None, :]
    hu = np.full(shape, -1000.0, np.float32)
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    hu = np.where(body, 40.0, hu)
    radius = 0.25 + 0.1 * np.sin(np.pi * z)
    for cx in (-0.42, 0.42):
        lung = ((x - cx) / (radius * 1.1)) ** 2 + (y / (radius * 1.8)) ** 2 < 1
        hu = np.where(lung, -850.0, hu)
    hu += np.random.default_rng(seed).normal(0, 20, shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 120])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    import nibabel as nib

    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "volume.nii.gz"
        affine = np.diag([-0.7, -0.7, 2.5, 1.0])  # stored like DICOM (L, P, S): old == new view
        nib.save(nib.Nifti1Image(phantom(shape), affine), str(path))
        size_mb = path.stat().st_size / 1e6
        n = shape[2]
        window = io.Window()

        def whole():
            volumes.read_volume(path)

        def slices_now():
            volumes.clear_cache()
            for k in range(n):
                io.read_image(path, k)

        def slices_before():
            for k in range(n):
                img = nib.load(str(path))
                window(np.asarray(img.dataobj[..., k]).T.astype(np.float32))

        # the same slices both ways (the affine makes the old and the canonical view agree)
        np.testing.assert_allclose(
            io.read_image(path, 7),
            window(np.asarray(nib.load(str(path)).dataobj[..., 7]).T.astype(np.float32)),
        )
        a = b = float("inf")
        for _ in range(args.repeats):  # interleaved: the machine's load falls on both alike
            a = min(a, best_of(whole, 1))
            b = min(b, best_of(slices_now, 1))
        c = best_of(slices_before, args.repeats)
    ratio = b / a
    out = {
        "what": "whole-volume read vs slice-by-slice reads of a .nii.gz",
        "shape": list(shape),
        "dtype": "int16",
        "file_mb": round(size_mb, 2),
        "repeats": args.repeats,
        "seconds": {
            "a_read_volume": round(a, 4),
            "b_read_image_all_slices": round(b, 4),
            "c_old_per_slice": round(c, 4),
        },
        "ratio_b_over_a": round(ratio, 3),
        "ratio_c_over_a": round(c / a, 2),
        "speedup_c_over_b": round(c / b, 2),
        "bound_b_over_a": BOUND,
        "within_bound": bool(ratio <= BOUND),
        "machine": machine() | {"nibabel": nib.__version__},
        "command": "python benchmarks/volume_read.py",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    print(json.dumps(out, indent=1))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "volume_read.json").write_text(json.dumps(out, indent=1) + "\n")
    m = out["machine"]
    lines = [
        "# Reading a .nii.gz volume: whole vs slice by slice",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared), Python {m['python']}, NumPy "
        f"{m['numpy']}, nibabel {m['nibabel']}. Command: `{out['command']}` ({out['date']}). "
        f"Volume: {shape[0]}×{shape[1]}×{shape[2]} int16 phantom, {size_mb:.1f} MB gzipped. "
        f"Best of {args.repeats}.",
        "",
        "| read | seconds | × (a) |",
        "| --- | --- | --- |",
        f"| (a) `volumes.read_volume`, whole volume once | {a:.3f} | 1.00 |",
        f"| (b) `io.read_image(path, k)` for all {n} slices (cache emptied first) | {b:.3f} "
        f"| {ratio:.2f} |",
        f"| (c) before: `nib.load` + `dataobj[..., k]` per slice | {c:.3f} | {c / a:.1f} |",
        "",
        f"(b)/(a) = {ratio:.2f} (bound {BOUND}: {'met' if ratio <= BOUND else 'NOT met'}); "
        f"reading every slice is {c / b:.1f}× faster than before.",
    ]
    (args.output / "volume_read.md").write_text("\n".join(lines) + "\n")
    return 0 if ratio <= BOUND else 1


if __name__ == "__main__":
    sys.exit(main())
