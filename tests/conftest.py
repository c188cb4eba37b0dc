"""Shared pytest fixtures."""

import numpy as np
import pytest


def _write_ct_dicom(path, stored, *, z=0.0, series="1.2.3.4", number=1, slope=1.0, intercept=0.0):
    """Write a minimal single-frame CT DICOM file (int16 stored values) and return its path."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    stored = np.ascontiguousarray(stored, dtype="<i2")
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def write_ct_dicom():
    """`write_ct_dicom(path, stored_int16, z=, series=, number=, slope=, intercept=)`."""
    return _write_ct_dicom


def pytest_addoption(parser):
    parser.addoption(
        "--learning",
        action="store_true",
        help="also run the learning guards (short training runs on real data; minutes each)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--learning"):
        return
    skip = pytest.mark.skip(reason="learning guard: run with --learning")
    for item in items:
        if "learning" in item.keywords:
            item.add_marker(skip)


#: Options of the tiny training runs the tests share: 32 px, eager (no graph trace), one
#: BatchNorm re-estimation batch.
TINY_TRAIN = (
    "--size", "32", "--batch-size", "4", "--width", "0.25", "--backbone-alpha", "0.35",
    "--eager", "--quiet", "--recalibration-steps", "1", "--fractions", "0.5,0.25,0.25",
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A synthetic dataset shared by the whole session (never modify it): `labelled/` with 4
    patients × 2 slices of 64 px (P00_00.png ...), `unlabelled/` with 1 patient."""
    from stitchnet_tf.data.synthetic import write_demo_dataset

    root = tmp_path_factory.mktemp("tiny") / "data"
    write_demo_dataset(
        root, labelled_patients=4, unlabelled_patients=1, slices_per_patient=2, size=64, seed=5
    )
    return root


@pytest.fixture(scope="session")
def tiny_stitchnet_run(tiny_data, tmp_path_factory):
    """A StitchNet run folder trained for one step at 32 px (seconds), shared by the session."""
    from helpers import run

    out = tmp_path_factory.mktemp("tiny-runs") / "stitchnet"
    run(
        "train", "-l", tiny_data / "labelled", "-o", out, "--epochs", 1,
        "--steps-per-epoch", 1, "--seed", 0, *TINY_TRAIN,
    )  # fmt: skip
    return out
