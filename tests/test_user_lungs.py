"""`predict --lungs DIR`: the user's lung masks (lungmask, TotalSegmentator) replace the lung
segmenter, in the input's geometry, or a one-line error names the mask."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from stitchnet_tf.data.synthetic import synth_patient
from stitchnet_tf.errors import DataError
from stitchnet_tf.models.threshold import ThresholdRule
from stitchnet_tf.predict import predict_path

K, N = 6, 48


@pytest.fixture(scope="module")
def rule(tmp_path_factory):
    return ThresholdRule(0.25, 0.5, 64).save(tmp_path_factory.mktemp("rule") / "rule.json")


def _affine() -> np.ndarray:
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-20.0, 10.0, -100.0)
    return affine


@pytest.fixture
def scan(tmp_path):
    """A NIfTI CT volume `in/scan.nii.gz` (stored (i, j, k) = RAS) and a lung mask that keeps
    only the left half of every slice's true lungs (so that using it shows)."""
    slices = synth_patient(3, K, N)
    hu = np.stack([s.hu for s in slices], axis=-1).astype(np.int16)  # [N, N, K]
    lung = np.stack([s.lung for s in slices], axis=-1)
    half = lung.copy()
    half[: N // 2] = False  # RAS i < N/2: the patient's right half gone
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(hu, _affine()), str(tmp_path / "in" / "scan.nii.gz"))
    return tmp_path, lung, half


def _labels(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_lungmask_style_volume_replaces_the_segmenter(rule, scan):
    root, lung, half = scan
    (root / "lungs").mkdir()
    values = half.astype(np.uint8) * 2  # lungmask: 1 right, 2 left
    nib.save(nib.Nifti1Image(values, _affine()), str(root / "lungs" / "scan.nii.gz"))
    predict_path(rule, root / "in", root / "out", lungs=root / "lungs")
    labels = _labels(root / "out" / "scan_labels.nii.gz")
    assert not labels[~half].any()  # nothing outside the user's lung field
    assert (labels[half] > 0).mean() > 0.9
    stats = (root / "out" / "statistics.json").read_text()
    assert '"method": "user-masks"' in stats and str(root / "lungs") in stats


def test_totalsegmentator_lobes_are_united(rule, scan):
    root, lung, half = scan
    lobes = root / "lungs" / "scan"
    lobes.mkdir(parents=True)
    upper, lower = half.copy(), half.copy()
    upper[..., : K // 2], lower[..., K // 2 :] = False, False
    for name, part in (("lung_upper_lobe_left", upper), ("lung_lower_lobe_left", lower)):
        nib.save(nib.Nifti1Image(part.astype(np.uint8), _affine()), str(lobes / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(lung.astype(np.uint8), _affine()), str(lobes / "heart.nii.gz"))
    predict_path(rule, root / "in", root / "out", lungs=root / "lungs")
    labels = _labels(root / "out" / "scan_labels.nii.gz")
    assert not labels[~half].any() and (labels[half] > 0).mean() > 0.9


def test_bad_lung_masks_are_one_line_errors(rule, scan):
    root, lung, _ = scan
    lungs = root / "lungs"
    lungs.mkdir()
    with pytest.raises(DataError, match="no lung mask for scan"):
        predict_path(rule, root / "in", root / "o1", lungs=lungs)
    shifted = _affine()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(lung.astype(np.uint8), shifted), str(lungs / "scan.nii.gz"))
    with pytest.raises(DataError, match="does not overlay"):
        predict_path(rule, root / "in", root / "o2", lungs=lungs)
    organs = lung.astype(np.uint8) * 11
    organs[0, 0, 0], organs[1, 0, 0] = 3, 52
    nib.save(nib.Nifti1Image(organs, _affine()), str(lungs / "scan.nii.gz"))
    with pytest.raises(DataError, match="multi-organ map"):
        predict_path(rule, root / "in", root / "o3", lungs=lungs)
    with pytest.raises(DataError, match="lung mask folder not found"):
        predict_path(rule, root / "in", root / "o4", lungs=root / "nowhere")
    assert not any((root / f"o{i}").exists() for i in range(1, 5))


def test_slice_masks(rule, tmp_path):
    s = synth_patient(4, 1, 64)[0]
    image = np.clip((s.hu + 1000) / 1400 * 255, 0, 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    (tmp_path / "lungs").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    half = s.lung.copy()
    half[:, :32] = False
    Image.fromarray(half.astype(np.uint8) * 255).save(tmp_path / "lungs" / "a.png")
    predict_path(rule, tmp_path / "in", tmp_path / "out", lungs=tmp_path / "lungs")
    labels = np.asarray(Image.open(tmp_path / "out" / "a_labels.png"))
    assert not labels[~half].any() and (labels[half] > 0).any()
    Image.fromarray(half[:40].astype(np.uint8) * 255).save(tmp_path / "lungs" / "a.png")
    with pytest.raises(DataError, match="lung mask is"):
        predict_path(rule, tmp_path / "in", tmp_path / "out2", lungs=tmp_path / "lungs")
