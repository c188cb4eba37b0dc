"""Helpers shared by several test modules (`from helpers import ...`: tests/ is on the path)."""

from __future__ import annotations

import os
import subprocess
import threading

import numpy as np
from click.testing import CliRunner

from stitchnet_tf.data.classes import MaskValueMap, allowed_to_onehot
from stitchnet_tf.data.intensity import window_hu
from stitchnet_tf.data.preprocess import RawSlice, prepare
from stitchnet_tf.data.synthetic import synth_patient


def run(*args, expect=0):
    """Invoke the CLI with `args` (stringified); assert its exit code and return the result."""
    from stitchnet_tf_cli.main import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def error_line(result) -> str:
    """The single line a failing command prints (no traceback)."""
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def lesion_batch(size=64, n=4):
    """n preprocessed synthetic slices with lesions: x [n,S,S,1], allowed [n,S,S,4]."""
    slices = [s for s in synth_patient(6, 12, 96) if (s.lesion > 0).mean() > 0.02][:n]
    mask_map = MaskValueMap.parse("medseg")
    xs, sets = [], []
    for s in slices:
        p = prepare(RawSlice(window_hu(s.hu), mask_map.to_allowed(s.lesion), s.lung), size)
        xs.append(p.x[..., None])
        sets.append(allowed_to_onehot(p.allowed))
    return np.stack(xs).astype("float32"), np.stack(sets)


def forged_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def run_on_terminal(command: list, env: dict, cwd=None, timeout: float = 900):
    """Run `command` with its stderr on a pseudo-terminal (as a user at a terminal sees it:
    progress bars drawn); returns (exit code, stdout, stderr)."""
    import pty

    master, slave = pty.openpty()
    child = subprocess.Popen(
        [str(c) for c in command], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=slave,
        text=True,
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = child.communicate(timeout=timeout)
    reader.join(timeout=60)
    os.close(master)
    return child.returncode, stdout, b"".join(chunks).decode("utf-8", "replace")


def write_ct_dicom(
    path,
    stored=None,
    *,
    hu=None,
    slope=1.0,
    intercept=0.0,
    position=(0.0, 0.0, 0.0),
    orientation=(1, 0, 0, 0, 1, 0),
    pixel_spacing=None,
    thickness=None,
    series="1.2.3.4",
    study=None,
    frame_of_reference=None,
    number=1,
    modality="CT",
    description=None,
    patient_id=None,
    **attributes,
):
    """Write a single-frame CT DICOM file (int16 pixels, explicit VR little endian) and
    return `path`. Pixels: `stored` values as they are, or `hu` stored as
    rint((hu - intercept) / slope). `pixel_spacing` (row, column) and `thickness` (mm),
    `study` and `frame_of_reference` UIDs, `description` and `patient_id` are left out when
    None; `attributes` are further DICOM attributes by keyword (PatientName="Test^P", ...)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    if (stored is None) == (hu is None):
        raise TypeError("write_ct_dicom: give exactly one of stored= and hu=")
    if hu is not None:
        stored = np.rint((np.asarray(hu, float) - intercept) / slope)
    stored = np.ascontiguousarray(stored, dtype="<i2")
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = modality, series, number
    optional = {
        "PatientID": patient_id,
        "StudyInstanceUID": study,
        "FrameOfReferenceUID": frame_of_reference,
        "SeriesDescription": description,
        "PixelSpacing": None if pixel_spacing is None else list(pixel_spacing),
        "SliceThickness": thickness,
    }
    for keyword, value in {**optional, **attributes}.items():
        if value is not None:
            setattr(ds, keyword, value)
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.ImagePositionPatient = [float(x) for x in position]
    ds.ImageOrientationPatient = [float(x) for x in orientation]
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
