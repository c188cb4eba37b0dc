"""The command line end to end on tiny synthetic data, including every kind of bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import error_line, run

from stitchnet_tf import __version__
from stitchnet_tf.data.datasets import discover
from stitchnet_tf.data.io import read_mask, write_png
from stitchnet_tf.data.lung_unet import default_segmenter
from stitchnet_tf.data.synthetic import write_demo_dataset

COMMANDS = ["demo-data", "preprocess", "split"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "demo"
    write_demo_dataset(
        root, labelled_patients=5, unlabelled_patients=2, slices_per_patient=3, size=96, seed=1
    )
    return root


def test_version_and_help_on_every_command():
    assert __version__ in run("--version").output
    assert all(c in run("--help").output for c in COMMANDS)
    for c in COMMANDS:
        assert "Example:" in run(c, "--help").output


def test_demo_data_writes_the_standard_layout(tmp_path):
    out = tmp_path / "d"
    run(
        "demo-data",
        "-o",
        out,
        "--labelled-patients",
        2,
        "--unlabelled-patients",
        1,
        "--slices",
        2,
        "--size",
        64,
    )
    assert len(list((out / "labelled" / "images").iterdir())) == 4
    assert len(list((out / "labelled" / "masks").iterdir())) == 4
    assert len(list((out / "unlabelled" / "images").iterdir())) == 2
    lab = discover(out / "labelled")
    assert lab.labelled and lab.has_patients and len({s.patient for s in lab.samples}) == 2


def test_demo_data_refuses_a_non_empty_folder_and_keeps_it(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    r = run("demo-data", "-o", tmp_path, expect=2)
    assert "not empty" in error_line(r) and (tmp_path / "keep.txt").read_text() == "precious"


def test_preprocess_then_train_pipeline_reads_it_back(demo, tmp_path):
    out = tmp_path / "prep"
    r = run("preprocess", "-i", demo / "labelled", "-o", out, "--size", 64)
    assert "wrote 15 slices (15 labelled) at 64x64" in r.output
    info = json.loads((out / "dataset.json").read_text())
    assert info["prepared_size"] == 64 and info["mask_values"] == "bits"
    prepared = discover(out)
    assert len(prepared) == 15 and prepared.prepared_size == 64 and prepared.has_patients
    from stitchnet_tf.data.pipeline import SliceLoader

    x, allowed, lung = SliceLoader(prepared, prepared.samples, 64)(0)
    assert x.shape == (64, 64, 1) and (x[lung == 0] == 0).all()
    np.testing.assert_array_equal(allowed.sum(-1), 1)  # exact 4-class labels from mask + lungs
    assert allowed[..., 1].sum() > 0  # healthy lung present
    # preprocessing a preprocessed copy crops no further
    again = tmp_path / "again"
    run("preprocess", "-i", out, "-o", again, "--size", 64)
    for sub in ("images", "masks", "lungs"):
        for first in sorted((out / sub).iterdir())[:3]:
            np.testing.assert_array_equal(read_mask(first), read_mask(again / sub / first.name))


def test_preprocess_unlabelled_with_automatic_lung_mask(demo, tmp_path):
    r = run("preprocess", "-i", demo / "unlabelled", "-o", tmp_path / "u", "--size", 32)
    assert "wrote 6 slices (0 labelled)" in r.output
    info = json.loads((tmp_path / "u" / "dataset.json").read_text())
    assert info["segmenter_name"] == type(default_segmenter()).__name__


def test_split_by_patient_with_label_subset(demo, tmp_path):
    r = run(
        "split",
        "-d",
        demo / "labelled",
        "-o",
        tmp_path / "s.json",
        "--seed",
        3,
        "--fractions",
        "0.6,0.2,0.2",
        "--max-labelled",
        2,
    )
    assert "split by patient" in r.output
    s = json.loads((tmp_path / "s.json").read_text())
    pats = {p: set(v) for p, v in s["patients"].items()}
    assert not (pats["train"] & pats["test"]) and len(s["unlabelled"]) == len(s["train"]) - 2
    bad = run(
        "split", "-d", demo / "labelled", "-o", tmp_path / "t.json", "--fractions", "1,2", expect=2
    )
    assert "three numbers" in bad.output


def test_an_unexpected_exception_is_one_line_and_debug_shows_the_traceback(
    demo, tmp_path, monkeypatch
):
    import stitchnet_tf.data.splits as splits

    def broken(*args, **kwargs):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(splits, "split_dataset", broken)
    args = ("split", "-d", demo / "labelled", "-o", tmp_path / "s.json")
    line = error_line(run(*args, expect=1))
    assert line == (
        "error: internal error: RuntimeError: something broke "
        "(rerun with --debug for the traceback)"
    )
    debug = run("--debug", *args, expect=1)
    assert isinstance(debug.exception, RuntimeError)
    assert not (tmp_path / "s.json").exists()


def test_split_without_patient_ids_warns(demo, tmp_path):
    data = tmp_path / "nopat"
    shutil.copytree(demo / "labelled", data)
    (data / "patients.csv").unlink()
    r = run("split", "-d", data, "-o", tmp_path / "s.json")
    assert "warning:" in r.output and "by slice" in r.output


# --------------------------------------------------------------------------- bad input


def _corrupt(folder: Path, name: str):
    (folder / "images" / name).write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def _truncated(folder: Path, name: str):
    p = folder / "images" / name
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _missing_mask(folder: Path, name: str):
    (folder / "masks" / name).unlink()


def _mask_size(folder: Path, name: str):
    write_png(folder / "masks" / name, np.zeros((50, 60), np.uint8), [0, 0, 0] * 3)


def _unknown_values(folder: Path, name: str):
    write_png(folder / "masks" / name, np.full((96, 96), 7, np.uint8), [0, 0, 0] * 8)


def _small(folder: Path, name: str):
    write_png(folder / "images" / name, np.zeros((20, 96), np.uint8))
    write_png(folder / "masks" / name, np.zeros((20, 96), np.uint8), [0, 0, 0] * 3)
    write_png(folder / "lungs" / name, np.zeros((20, 96), np.uint8))


def _non_image(folder: Path, name: str):
    (folder / "images" / "notes.txt").write_text("not an image")


def _bad_dicom(folder: Path, name: str):
    (folder / "images" / "scan.dcm").write_bytes(b"\x00" * 200)


CASES = {
    "corrupt": (_corrupt, "corrupt or truncated image", True),
    "truncated": (_truncated, "truncated", True),
    "missing mask": (_missing_mask, "no mask with the same name", True),
    "mask size": (_mask_size, "mask is 50x60 but its image is 96x96", True),
    "unknown values": (_unknown_values, "unknown mask values 7", True),
    "too small": (_small, "smaller than 32 px", True),
    "non-image": (_non_image, "not a supported image file", False),
    "bad dicom": (_bad_dicom, "DICOM", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_file(demo, tmp_path, case):
    make_bad, message, skippable = CASES[case]
    data = tmp_path / "data"
    shutil.copytree(demo / "labelled", data)
    name = sorted((data / "images").iterdir())[2].name
    make_bad(data, name)
    out = tmp_path / "out"
    line = error_line(run("preprocess", "-i", data, "-o", out, "--size", 32, expect=2))
    assert message in line
    culprit = {"non-image": "notes.txt", "bad dicom": "scan.dcm"}.get(case, Path(name).stem)
    assert culprit in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written
    if skippable:
        r = run("preprocess", "-i", data, "-o", out, "--size", 32, "--skip-bad")
        assert "warning:" in r.output and "skipped 1 bad slices" in r.output
        assert len(list((out / "images").iterdir())) == 14


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    assert "no images found" in error_line(
        run("preprocess", "-i", tmp_path / "empty", "-o", tmp_path / "o", expect=2)
    )
    assert "dataset folder not found" in error_line(
        run("split", "-d", tmp_path / "nowhere", "-o", tmp_path / "s.json", expect=2)
    )


def test_bad_size_and_bad_mask_values(demo, tmp_path):
    assert "multiple of 32" in error_line(
        run("preprocess", "-i", demo / "labelled", "-o", tmp_path / "o", "--size", 100, expect=2)
    )
    assert "bad --mask-values class 'blob'" in error_line(
        run(
            "preprocess",
            "-i",
            demo / "labelled",
            "-o",
            tmp_path / "o",
            "--mask-values",
            "0:blob",
            expect=2,
        )
    )


def test_failed_overwrite_keeps_the_previous_output(demo, tmp_path):
    out = tmp_path / "out"
    run("preprocess", "-i", demo / "labelled", "-o", out, "--size", 32)
    before = sorted(p.name for p in (out / "images").iterdir())
    data = tmp_path / "data"
    shutil.copytree(demo / "labelled", data)
    _corrupt(data, sorted((data / "images").iterdir())[-1].name)
    run("preprocess", "-i", data, "-o", out, "--size", 32, "--overwrite", expect=2)
    assert sorted(p.name for p in (out / "images").iterdir()) == before
