"""The user's first run, as the README promises it: a wheel installed into a fresh virtual
environment segments a DICOM folder with the shipped lesion model by name. The label NIfTI and
the DICOM-SEG overlay the series; statistics are in mL; the console shows a progress bar and
no TensorFlow start-up lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import test_volumes as tv
from helpers import run_on_terminal

ROOT = Path(__file__).resolve().parents[1]
#: What TensorFlow, absl, CUDA and Keras print at start-up when nobody silences them.
NOISE = re.compile(r"oneDNN|cuda|cuInit|absl|I0000|W0000|E0000|tensorflow/|UserWarning", re.I)


@pytest.mark.slow
def test_fresh_wheel_predicts_a_dicom_folder_with_the_shipped_model(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("stitchnet_tf-*.whl")
    venv = tmp_path / "venv"
    # the dependencies (TensorFlow ...) come from this interpreter; the package from the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python, exe = venv / "bin" / "python", venv / "bin" / "stitchnet-tf"
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
    where = subprocess.run(
        [python, "-c", "import stitchnet_tf, stitchnet_tf_models as m; "
         "print(stitchnet_tf.__file__); print(m.__file__)"],
        cwd=tmp_path, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert all(str(venv) in w for w in where), where  # not the source checkout

    anatomy = np.stack([s.hu for s in reversed(tv.synth_patient(7, tv.K, tv.N))])
    anatomy = np.rint(anatomy).astype(np.int16)
    files = tv.write_series(tmp_path / "scan" / "patient" / "study" / "ct", anatomy)
    code, stdout, stderr = run_on_terminal(
        [exe, "predict", "-m", "medseg-stitchnet", "-i", "scan", "-o", "out"], env, tmp_path
    )
    assert code == 0, stderr[-2000:]
    noise = [line for line in stderr.replace("\r", "\n").splitlines() if NOISE.search(line)]
    assert not noise, noise
    assert f"predict ({tv.K} slices)" in stderr and f"{tv.K}/{tv.K}" in stderr  # the bar, drawn
    assert f"segmented {tv.K} slices (1 volumes)" in stdout

    out = tmp_path / "out"
    img = nib.load(out / "scan_labels.nii.gz")
    expected = tv.dicom_affine_by_hand((1, 0, 0, 0, 1, 0), origin=files[0][2])
    np.testing.assert_allclose(img.affine, expected, atol=1e-3)
    assert img.shape == (tv.N, tv.N, tv.K)
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(out / "scan_seg.dcm")
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f, *_ in files]
    np.testing.assert_array_equal(
        seg.get_pixels_by_source_instance(uids, combine_segments=True),
        np.transpose(np.asarray(img.dataobj), (2, 1, 0)),
    )
    assert len(list((out / "scan_overlays").glob("*.png"))) == tv.K
    stats = json.loads((out / "statistics.json").read_text())
    (entry,) = stats["entries"]
    assert entry["spacing_known"] and entry["lung_ml"] > 0
    assert entry["provenance"]["model"]["class"] == "StitchNet"
    assert str(venv) in entry["provenance"]["model"]["path"]
    burden = (out / "burden.csv").read_text()
    assert "lung_ml" in burden.splitlines()[0]
