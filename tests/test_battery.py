"""The hostile-input battery (issue 13): every bad slice or mask × every command that reads it.

Each bad input is built on the fly in a copy of the session's tiny dataset (slice P00_00 of
the labelled part, U00_00 of the unlabelled part). All cases run through the CLI in one child
process (`battery_child.py`) under a timeout, so a hang fails the battery instead of the
suite. Each case must end with exit 2 and one `error:` line naming the bad file, no
traceback, no output, every watched input byte-identical, and no temporaries left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_TRAIN
from helpers import forged_png
from PIL import Image

from stitchnet_tf.models.threshold import ThresholdRule


def _png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array.astype(np.uint8)).save(path)


def _rename(folder: Path, stem: str, new_name: str | bytes) -> Path:
    """Rename `images/<stem>.png` to `new_name` and fix the patients.csv row; return it."""
    old = folder / "images" / f"{stem}.png"
    new = Path(os.fsdecode(os.fsencode(folder / "images") + b"/" + os.fsencode(new_name)))
    os.rename(old, new)
    csv = folder / "patients.csv"
    rows = csv.read_bytes().replace(f"{stem}.png".encode(), os.fsencode(new_name))
    csv.write_bytes(rows)
    return new


def _nifti_truncated(folder: Path, stem: str) -> None:
    image = _rename(folder, stem, f"{stem}.nii.gz")
    noise = np.random.default_rng(0).integers(-1000, 400, (64, 64, 2)).astype(np.int16)
    nib.save(nib.Nifti1Image(noise, np.eye(4)), image)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # header intact


def _symlink_loop(folder: Path, stem: str) -> None:
    image = folder / "images" / f"{stem}.png"
    image.unlink()
    image.symlink_to(image.name)


def _folder(folder: Path, stem: str) -> None:
    image = folder / "images" / f"{stem}.png"
    image.unlink()
    image.mkdir()


#: Ways to spoil one image of a dataset folder: name -> function(folder, stem).
IMAGE_SPOILS = {
    "text-named-png": lambda f, s: (f / "images" / f"{s}.png").write_text("not an image\n"),
    "truncated-png": lambda f, s: (f / "images" / f"{s}.png").write_bytes(
        (f / "images" / f"{s}.png").read_bytes()[:100]
    ),
    "zero-bytes": lambda f, s: (f / "images" / f"{s}.png").write_bytes(b""),
    "8x8": lambda f, s: _png(f / "images" / f"{s}.png", np.full((8, 8), 90)),
    "bomb": lambda f, s: (f / "images" / f"{s}.png").write_bytes(forged_png(100_000, 100_000)),
    "truncated-jpeg": lambda f, s: _rename(f, s, f"{s}.jpg").write_bytes(b"\xff\xd8\xff\xe0"),
    "truncated-nifti": _nifti_truncated,
    "non-utf8-name": lambda f, s: _rename(f, s, f"{s}".encode() + b"\xff\xfe.png"),
    "symlink-loop": _symlink_loop,
    "folder-named-png": _folder,
}

#: Ways to spoil one mask of a labelled dataset folder.
MASK_SPOILS = {
    "wrong-size-mask": lambda f, s: _png(f / "masks" / f"{s}.png", np.zeros((40, 40))),
    "mask-value-7": lambda f, s: _png(f / "masks" / f"{s}.png", np.full((64, 64), 7)),
}

#: Commands that read a labelled dataset: name -> args(dataset, output, world).
DATASET_COMMANDS = {
    "preprocess": lambda d, o, w: ["preprocess", "-i", d, "-o", o, "--size", "32"],
    "train": lambda d, o, w: [
        "train", "-l", d, "-o", o, "--epochs", "1", "--steps-per-epoch", "1", *TINY_TRAIN
    ],
    "evaluate": lambda d, o, w: ["evaluate", "-m", w["rule"], "-d", d, "-o", o],
    "split": lambda d, o, w: ["split", "-d", d, "-o", f"{o}.json"],
    "export-int8": lambda d, o, w: [
        "export", "-m", w["run"], "-o", f"{o}.tflite", "--format", "tflite",
        "--quantize", "int8", "--data", d,
    ],
}  # fmt: skip

#: Commands that read images only (no masks), and `train` reading the unlabelled part.
IMAGE_COMMANDS = {
    "predict": lambda d, o, w: ["predict", "-m", w["rule"], "-i", f"{d}/images", "-o", o],
    "styles": lambda d, o, w: ["styles", "-m", w["run"], "-i", f"{d}/images", "-o", o],
    "train-unlabelled": lambda d, o, w: [
        "train", "-l", w["labelled"], "-u", d, "-o", o, "--epochs", "1",
        "--steps-per-epoch", "1", "--unlabelled-per-batch", "2", *TINY_TRAIN,
    ],
}  # fmt: skip

CASES = [
    (spoil, command) for spoil in IMAGE_SPOILS for command in (*DATASET_COMMANDS, *IMAGE_COMMANDS)
] + [(spoil, command) for spoil in MASK_SPOILS for command in DATASET_COMMANDS]

#: The whole battery must finish within this (a hang fails it instead of the suite).
TIMEOUT = 900


@pytest.fixture(scope="module")
def battery(tiny_data, tiny_stitchnet_run, tmp_path_factory) -> dict:
    """Build every bad input, run every case in one child process; results by case id."""
    root = tmp_path_factory.mktemp("battery")
    rule = root / "rule.json"
    ThresholdRule(0.3, 0.6, size=32).save(rule)
    world = {"rule": str(rule), "run": str(tiny_stitchnet_run)}
    world["labelled"] = str(tiny_data / "labelled")
    cases = []
    for spoil, command in CASES:
        case_id = f"{spoil}:{command}"
        folder = root / spoil
        if not folder.exists():
            shutil.copytree(tiny_data, folder, symlinks=True)
            for part, stem in (("labelled", "P00_00"), ("unlabelled", "U00_00")):
                spoils = IMAGE_SPOILS | (MASK_SPOILS if part == "labelled" else {})
                if spoil in spoils and (spoil in IMAGE_SPOILS or part == "labelled"):
                    spoils[spoil](folder / part, stem)
        part = "unlabelled" if command == "train-unlabelled" else "labelled"
        output = root / "out" / case_id.replace(":", "-")
        make = (DATASET_COMMANDS | IMAGE_COMMANDS)[command]
        args = [str(a) for a in make(folder / part, output, world)]
        if command == "split":
            output = Path(f"{output}.json")
        elif command == "export-int8":
            output = Path(f"{output}.tflite")
        watch = [str(folder), str(rule), str(tiny_stitchnet_run), str(tiny_data)]
        cases.append({"id": case_id, "args": args, "watch": watch, "output": str(output)})
    (root / "out").mkdir()
    cases_file, results_file = root / "cases.json", root / "results.jsonl"
    cases_file.write_text(json.dumps(cases))
    child = Path(__file__).with_name("battery_child.py")
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        done = subprocess.run(
            [sys.executable, str(child), str(cases_file), str(results_file)],
            capture_output=True, text=True, timeout=TIMEOUT, env=env,
        )  # fmt: skip
        crashed = done.returncode != 0 and done.stderr[-2000:]
    except subprocess.TimeoutExpired:
        crashed = f"the battery did not finish in {TIMEOUT} s (a hang)"
    lines = [json.loads(ln) for ln in results_file.read_text().splitlines()]
    results = {r["id"]: r for r in lines if "id" in r}
    started = [r["start"] for r in lines if "start" in r]
    if started and started[-1] not in results:  # the case that hung or killed the child
        results[started[-1]] = {"crashed": crashed or "the child died during this case"}
    return results


@pytest.mark.parametrize(("spoil", "command"), CASES, ids=[f"{s}:{c}" for s, c in CASES])
def test_a_bad_input_is_one_line_naming_the_file(battery, spoil, command):
    case_id = f"{spoil}:{command}"
    assert case_id in battery, "not run: an earlier case hung or killed the battery"
    r = battery[case_id]
    assert "crashed" not in r, r["crashed"]
    output = r["output"]
    assert r["exception"] is None, r["exception"]
    assert r["exit"] == 2, output[-2000:]
    assert "Traceback" not in output, output[-2000:]
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, output[-2000:]
    stem = "U00_00" if command == "train-unlabelled" else "P00_00"
    assert stem in errors[0], errors[0]
    assert not r["changed"], f"inputs changed: {r['changed']}"
    assert not r["leftovers"], r["leftovers"]
    assert not r["output_exists"], "a failed command left its output"
