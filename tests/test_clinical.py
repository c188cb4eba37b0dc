"""Clinical outputs (`stitchnet_tf.clinical`): statistics by hand, the NIfTI label sidecar, and a
DICOM Segmentation of a small synthetic CT series read back with highdicom."""

from __future__ import annotations

import json

import highdicom as hd
import numpy as np
import pydicom
import pytest
from helpers import write_ct_dicom
from pydicom.uid import generate_uid

from stitchnet_tf import __version__
from stitchnet_tf.clinical import (
    LABELS,
    provenance,
    segmenter_provenance,
    sha256_of,
    sidecar_path,
    statistics,
    voxel_volume_ml,
    write_dicom_seg,
    write_label_sidecar,
    write_statistics,
)
from stitchnet_tf.data.classes import CON, GGO, HEALTHY
from stitchnet_tf.errors import DataError

K, H, W = 6, 40, 48
PROVENANCE = {
    "model": {"path": "/models/rule.json", "sha256": "ab" * 32, "class": "ThresholdRule"},
    "lung_segmenter": {"method": "classical", "name": "AutoLungMask"},
    "window": {"level": -600.0, "width": 1500.0},
    "software": {"name": "stitchnet-tf", "version": __version__},
    "date": "2026-01-02T03:04:05+00:00",
    "input": "/data/series",
}


#: Patient, study and series attributes (beyond the UIDs and PatientID) a DICOM-SEG needs
PATIENT_STUDY = {
    "PatientName": "Test^P",
    "PatientBirthDate": "",
    "PatientSex": "O",
    "StudyDate": "20260102",
    "StudyTime": "030405",
    "StudyID": "1",
    "AccessionNumber": "A1",
    "ReferringPhysicianName": "",
    "SeriesNumber": 3,
}


def write_ct_series(folder, hu: np.ndarray, *, spacing=(0.7, 0.8), thickness=2.5, z0=-40.0):
    """Write a CT series (one file per slice of `hu` [K, H, W], slice k at z0 + k*thickness)
    with the patient, study and geometry attributes a DICOM-SEG needs; return the files in
    slice order. Files are named in reverse slice order (as some scanners do)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k, plane in enumerate(hu):
        path = write_ct_dicom(
            folder / f"IM{K - k:04d}.dcm",
            plane + 1024,  # stored values: HU + 1024
            intercept=-1024.0,
            position=(-10.0, -20.0, z0 + thickness * k),
            pixel_spacing=spacing,
            thickness=thickness,
            series=series,
            study=study,
            frame_of_reference=frame,
            number=k + 1,
            patient_id="P1",
            **PATIENT_STUDY,
        )
        paths.append(path)
    return paths


def synthetic_labels() -> np.ndarray:
    """[K, H, W] labels, each slice different (lesions move with k), first slice empty, no
    consolidation on slice 1."""
    labels = np.zeros((K, H, W), np.uint8)
    labels[1:, 5:35, 4:44] = HEALTHY
    for k in range(1, K):
        labels[k, 10:16, 6 + 5 * k : 12 + 5 * k] = GGO
        if k != 1:
            labels[k, 25 : 25 + k, 20:24] = CON
    return labels


@pytest.fixture
def series(tmp_path):
    """(datasets read back from disk in slice order, labels, HU)."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 100, (K, H, W)).astype(np.int16)
    paths = write_ct_series(tmp_path / "series", hu)
    return [pydicom.dcmread(p) for p in paths], synthetic_labels(), hu


# --------------------------------------------------------------------------- provenance


def test_provenance(tmp_path):
    import hashlib

    from stitchnet_tf.data.io import Window
    from stitchnet_tf.data.lungmask import AutoLungMask

    model = tmp_path / "rule.json"
    model.write_text("{}")
    got = provenance(
        model, model_class="ThresholdRule", lung_segmenter=AutoLungMask(), window=Window(),
        input_path=tmp_path / "scan.nii.gz",
    )  # fmt: skip
    assert got["model"] == {
        "path": str(model),
        "sha256": hashlib.sha256(b"{}").hexdigest(),
        "class": "ThresholdRule",
    }
    assert got["lung_segmenter"] == {"method": "classical", "name": "AutoLungMask"}
    assert got["window"] == {"level": Window().level, "width": Window().width}
    assert got["software"] == {"name": "stitchnet-tf", "version": __version__}
    assert got["input"] == str(tmp_path / "scan.nii.gz") and got["date"].endswith("+00:00")
    assert segmenter_provenance("user-masks") == {"method": "user-masks"}

    class FakeUNet:  # a LearnedLungMask without loading Keras
        path = model

        def get_config(self):
            return {"method": "learned-unet"}

    assert segmenter_provenance(FakeUNet()) == {
        "method": "lung-unet",
        "model": str(model),
        "sha256": got["model"]["sha256"],
    }
    export = tmp_path / "export"
    (export / "variables").mkdir(parents=True)
    (export / "saved_model.pb").write_bytes(b"pb")
    (export / "variables" / "v").write_bytes(b"v")
    digest = sha256_of(export)
    (export / "variables" / "v").write_bytes(b"w")
    assert len(digest) == 64 and sha256_of(export) != digest  # a folder: over its files


# --------------------------------------------------------------------------- statistics


def test_voxel_volume_from_the_affine():
    assert voxel_volume_ml(np.diag([2.0, 2.0, 2.0, 1.0])) == pytest.approx(0.008)
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.7, 0.8, 2.5])  # flipped axis, rotated: |det|
    affine[:3, 3] = [100.0, -50.0, 7.0]
    assert voxel_volume_ml(affine) == pytest.approx(0.7 * 0.8 * 2.5 / 1000)


def test_statistics_by_hand():
    labels = np.zeros((2, 3, 4), np.uint8)
    labels[0, 0, :] = HEALTHY  # 4 healthy
    labels[0, 1, :2] = GGO  # 2 GGO
    labels[1, 2, :] = HEALTHY  # 4 more healthy
    labels[1, 0, 3] = CON  # 1 CON
    hu = np.full(labels.shape, -1000.0)
    hu[0, 0, :] = [-900, -880, -860, -840]
    hu[1, 2, :] = [-800, -800, -800, -800]
    hu[0, 1, :2] = [-500, -400]
    hu[1, 0, 3] = 30.0
    entry = statistics(labels, hu, voxel_volume_ml(np.diag([2.0, 2.0, 2.0, 1.0])), PROVENANCE)
    assert entry["spacing_known"] is True
    counts = [entry[f"{k}_px"] for k in ("lung", "healthy", "ggo", "con")]
    assert counts == [11, 8, 2, 1]
    assert entry["lesion_px"] == 3
    assert entry["voxel_volume_ml"] == pytest.approx(0.008)  # 2 x 2 x 2 mm = 8 mm^3
    assert entry["lung_ml"] == pytest.approx(11 * 0.008)
    assert entry["healthy_ml"] == pytest.approx(0.064)
    assert entry["ggo_ml"] == pytest.approx(0.016)
    assert entry["con_ml"] == pytest.approx(0.008)
    assert entry["lesion_ml"] == pytest.approx(0.024)
    assert entry["ggo_pct"] == pytest.approx(100 * 2 / 11, abs=1e-3)
    assert entry["con_pct"] == pytest.approx(100 / 11, abs=1e-3)
    assert entry["lesion_pct"] == pytest.approx(300 / 11, abs=1e-3)
    assert entry["mean_hu"] == {"healthy": -835.0, "ggo": -450.0, "con": 30.0}
    assert entry["provenance"] == PROVENANCE and entry["input"] == "/data/series"


def test_statistics_anisotropic_spacing_and_no_hu():
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[:, :2, :2] = HEALTHY  # 12 voxels
    affine = np.diag([0.6, 0.9, 3.0, 1.0])  # 1.62 mm^3
    entry = statistics(labels, None, voxel_volume_ml(affine), PROVENANCE)
    assert entry["lung_ml"] == pytest.approx(12 * 1.62 / 1000)
    assert entry["ggo_ml"] == 0.0 and entry["ggo_pct"] == 0.0
    assert entry["mean_hu"] == {"healthy": None, "ggo": None, "con": None}  # 8-bit input


def test_statistics_of_a_slice_without_spacing():
    labels = np.zeros((5, 6), np.uint8)
    labels[1:3, 1:4] = GGO
    hu = np.full(labels.shape, -300.0)
    entry = statistics(labels, hu, None, PROVENANCE | {"input": "a.png"})
    assert entry["spacing_known"] is False and entry["voxel_volume_ml"] is None
    assert entry["shape"] == [1, 5, 6]
    assert entry["lung_px"] == entry["ggo_px"] == 6 and entry["ggo_pct"] == 100.0
    assert all(entry[f"{k}_ml"] is None for k in ("lung", "healthy", "ggo", "con", "lesion"))
    assert entry["mean_hu"] == {"healthy": None, "ggo": -300.0, "con": None}  # empty: null


def test_statistics_refuses_bad_shapes():
    with pytest.raises(ValueError, match="HU shape"):
        statistics(np.zeros((2, 3, 4), np.uint8), np.zeros((2, 4, 3)), 0.001, PROVENANCE)
    with pytest.raises(ValueError, match="0..3"):
        statistics(np.full((3, 3), 7, np.uint8), None, None, PROVENANCE)


def test_statistics_json_totals(tmp_path):
    a = np.zeros((2, 4, 4), np.uint8)
    a[:, :2] = HEALTHY
    a[0, 0, :2] = GGO  # 16 lung, 2 GGO at 1 mm^3
    b = np.zeros((1, 4, 4), np.uint8)
    b[0, :, :2] = CON  # 8 lung, 8 CON at 8 mm^3
    hu_a, hu_b = np.full(a.shape, -800.0), np.full(b.shape, 40.0)
    hu_a[a == GGO] = -500.0
    entries = [
        statistics(a, hu_a, 0.001, PROVENANCE | {"input": "a.nii.gz"}),
        statistics(b, hu_b, 0.008, PROVENANCE | {"input": "b.nii.gz"}),
    ]
    write_statistics(tmp_path / "statistics.json", entries)
    doc = json.loads((tmp_path / "statistics.json").read_text())
    assert [e["input"] for e in doc["entries"]] == ["a.nii.gz", "b.nii.gz"]
    totals = doc["totals"]
    assert totals["inputs"] == 2 and totals["spacing_known"] is True
    assert totals["lung_px"] == 24 and totals["lung_ml"] == pytest.approx(0.016 + 0.064)
    assert totals["con_ml"] == pytest.approx(0.064)
    assert totals["con_pct"] == pytest.approx(80.0)  # by volume, not by voxel count (33 %)
    assert totals["mean_hu"] == {"healthy": -800.0, "ggo": -500.0, "con": 40.0}
    # a slice without spacing among them: no mL totals, percentages by count
    entries.append(statistics(np.full((4, 4), GGO, np.uint8), None, None, PROVENANCE))
    totals = write_statistics(tmp_path / "statistics.json", entries)["totals"]
    assert totals["spacing_known"] is False and totals["lung_ml"] is None
    assert totals["ggo_pct"] == pytest.approx(100 * 18 / 40)
    assert totals["mean_hu"]["ggo"] == -500.0  # over the inputs that have HU
    assert [p.name for p in tmp_path.iterdir()] == ["statistics.json"]  # no temporaries left


# --------------------------------------------------------------------------- sidecar


def test_label_sidecar(tmp_path):
    nifti = tmp_path / "scan_labels.nii.gz"
    path = write_label_sidecar(nifti, PROVENANCE)
    assert path == tmp_path / "scan_labels.json" == sidecar_path(nifti)
    assert sidecar_path(tmp_path / "x.nii") == tmp_path / "x.json"
    doc = json.loads(path.read_text())
    assert doc["file"] == "scan_labels.nii.gz"
    assert [(lab["value"], lab["name"], lab["color"]) for lab in doc["labels"]] == [
        (0, "background", [0, 0, 0]),
        (1, "healthy lung", [110, 110, 110]),
        (2, "ground-glass opacity", [0, 200, 0]),
        (3, "consolidation", [30, 90, 255]),
    ]
    assert doc["labels"][2]["type"] == {
        "CodeValue": "112120",
        "CodingSchemeDesignator": "DCM",
        "CodeMeaning": "Ground glass opacity",
    }
    assert doc["provenance"] == PROVENANCE


def test_label_colours_are_the_png_palette():
    from stitchnet_tf.predict import LABEL_PALETTE

    assert [c for value in sorted(LABELS) for c in LABELS[value][1]] == LABEL_PALETTE


# --------------------------------------------------------------------------- DICOM-SEG


def _frame_source(frame) -> str:
    return frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID


def test_dicom_seg_round_trip(series, tmp_path):
    datasets, labels, _ = series
    path = write_dicom_seg(tmp_path / "scan_seg.dcm", labels, datasets, PROVENANCE)
    seg = hd.seg.segread(path)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert seg.PatientID == "P1" and seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    # segments: labels, codes, algorithm
    expected = {
        1: ("Healthy lung", ("91723000", "SCT"), ("39607008", "SCT")),
        2: ("Ground-glass opacity", ("49755003", "SCT"), ("112120", "DCM")),
        3: ("Consolidation", ("49755003", "SCT"), ("95436008", "SCT")),
    }
    assert seg.get_segment_numbers() == [1, 2, 3]
    for number, (label, category, kind) in expected.items():
        desc = seg.get_segment_description(number)
        assert desc.segment_label == label
        cat, typ = desc.segmented_property_category, desc.segmented_property_type
        assert (cat.value, cat.scheme_designator) == category
        assert (typ.value, typ.scheme_designator) == kind
        assert desc.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = desc.algorithm_identification[0]
        assert algorithm.AlgorithmName == "stitchnet-tf"
        assert algorithm.AlgorithmVersion == __version__
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    # every frame: the position of the source slice it references, and that slice's mask
    by_uid = {ds.SOPInstanceUID: k for k, ds in enumerate(datasets)}
    frames = seg.pixel_array
    assert len(seg.PerFrameFunctionalGroupsSequence) == len(frames) > 0
    seen = set()
    for frame, pixels in zip(seg.PerFrameFunctionalGroupsSequence, frames, strict=True):
        k = by_uid[_frame_source(frame)]
        number = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in datasets[k].ImagePositionPatient])
        np.testing.assert_array_equal(pixels, labels[k] == number)
        seen.add((k, number))
    present = {(k, v) for k in range(K) for v in (1, 2, 3) if (labels[k] == v).any()}
    assert seen == present  # empty frames (slice 0, no CON on slice 1) are left out
    # the whole label volume, by source instance
    uids = [ds.SOPInstanceUID for ds in datasets]
    volume = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(volume, labels)


def test_dicom_seg_empty_segments(series, tmp_path):
    datasets, labels, _ = series
    no_con = np.where(labels == CON, GGO, labels).astype(np.uint8)
    seg = hd.seg.segread(write_dicom_seg(tmp_path / "a.dcm", no_con, datasets, PROVENANCE))
    assert seg.get_segment_numbers() == [1, 2, 3]  # segment 3 described, without frames
    uids = [ds.SOPInstanceUID for ds in datasets]
    got = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(got, no_con)
    empty = np.zeros_like(labels)
    seg = hd.seg.segread(write_dicom_seg(tmp_path / "b.dcm", empty, datasets, PROVENANCE))
    got = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(got, empty)


def test_dicom_seg_refuses_labels_not_matching_the_series(series, tmp_path):
    datasets, labels, _ = series
    out = tmp_path / "seg.dcm"
    with pytest.raises(DataError, match="labels have 5 slices but the source series has 6"):
        write_dicom_seg(out, labels[:5], datasets, PROVENANCE)
    with pytest.raises(DataError, match="labels are 48×40 px but source image 0 is 40×48"):
        write_dicom_seg(out, labels.transpose(0, 2, 1), datasets, PROVENANCE)
    del datasets[2].FrameOfReferenceUID
    with pytest.raises(DataError, match="source image 2 lacks FrameOfReferenceUID"):
        write_dicom_seg(out, labels, datasets, PROVENANCE)
    assert not out.exists() and list(tmp_path.glob(".*")) == []


def test_dicom_seg_of_an_anonymised_series(series, tmp_path):
    """Type 2 patient and study attributes dropped by an anonymiser are written empty."""
    datasets, labels, _ = series
    for ds in datasets:
        for keyword in ("PatientName", "PatientBirthDate", "AccessionNumber", "StudyID"):
            delattr(ds, keyword)
    seg = hd.seg.segread(write_dicom_seg(tmp_path / "s.dcm", labels, datasets, PROVENANCE))
    assert seg.PatientName == "" and seg.PatientID == "P1"
