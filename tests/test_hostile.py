"""Hostile but realistic use (issue 13): outputs that would overwrite inputs, --overwrite on
folders the command did not write, outputs under files, unexpected exceptions.

Each case runs a command through the CLI and checks: the exit code, one `error:` line naming
the problem, no traceback, every pre-existing file byte-identical, and no temporaries left.
The model is a `ThresholdRule` JSON (it loads instantly); the refusals come before any model
is loaded, so they hold for every model type.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from helpers import error_line, forged_png, run

from stitchnet_tf.data.synthetic import write_demo_dataset
from stitchnet_tf.models.threshold import ThresholdRule


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A dataset, a model and a few files a user might have lying around."""
    root = tmp_path_factory.mktemp("hostile")
    write_demo_dataset(
        root / "data", labelled_patients=3, unlabelled_patients=1, slices_per_patient=2, size=64
    )
    ThresholdRule(0.3, 0.6, size=32).save(root / "rule.json")
    (root / "notes").mkdir()
    (root / "notes" / "thesis.tex").write_text("three years of work\n")
    (root / "notes.txt").write_text("a file, not a folder\n")
    (root / "model.keras").write_bytes(b"PK\x03\x04 not really a model")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def refused(world: Path, *args, expect: int = 2) -> str:
    """Run a command that must be refused; return its error line after checking that nothing
    under `world` changed and no temporaries were left."""
    before = snapshot(world)
    line = error_line(run(*args, expect=expect))
    assert snapshot(world) == before, f"{args} changed files"
    assert not leftovers(world), leftovers(world)
    return line


def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(world):
    d, lab = world / "data", world / "data" / "labelled"
    images = lab / "images"
    cases = [
        (("preprocess", "-i", lab, "-o", lab, "--size", 32), "is the input --input"),
        (("preprocess", "-i", lab, "-o", d, "--size", 32), "contains the input --input"),
        (("preprocess", "-i", lab, "-o", lab / "prep", "--size", 32), "lies inside the input"),
        (("train", "-l", lab, "-o", lab, "--size", 32), "is the input --labelled"),
        (("train", "-l", lab, "-u", d / "unlabelled", "-o", d), "contains the input --labelled"),
        (("predict", "-m", world / "rule.json", "-i", images, "-o", images), "is the input"),
        (("predict", "-m", world / "rule.json", "-i", images, "-o", lab), "contains the input"),
        (("styles", "-m", world / "rule.json", "-i", images, "-o", images), "is the input"),
        (("evaluate", "-m", world / "rule.json", "-d", lab, "-o", lab / "eval"), "lies inside"),
        (("evaluate", "-m", world / "rule.json", "-d", lab, "-o", world), "contains the input"),
        (("sample", "-m", world / "rule.json", "-o", world), "contains the input --model"),
        (
            ("export", "-m", world / "model.keras", "-o", world / "model.keras", "--format",
             "tflite"),
            "is the input --model",
        ),
        (("split", "-d", lab, "-o", lab / "patients.csv"), "lies inside the input --data"),
    ]  # fmt: skip
    for args, message in cases:
        for flags in ((), ("--overwrite",)):
            line = refused(world, *args, *flags)
            assert message in line, (args, line)


def test_overwrite_replaces_only_what_the_command_wrote(world, tmp_path):
    lab, notes = world / "data" / "labelled", world / "notes"
    rule = world / "rule.json"
    cases = [
        (("predict", "-m", rule, "-i", lab / "images", "-o", notes), "no burden.csv"),
        (("evaluate", "-m", rule, "-d", lab, "-o", notes), "no evaluation.json"),
        (("preprocess", "-i", lab, "-o", notes, "--size", 32), "no dataset.json"),
        (("demo-data", "-o", notes), "no synthetic.json"),
        (("demo", "-o", notes), "no demo.json"),
        (("train", "-l", lab, "-o", notes, "--size", 32), "not a run of this tool"),
    ]
    for args, message in cases:
        line = refused(world, *args, "--overwrite")
        assert message in line, (args, line)
        assert "not empty" in refused(world, *args) or args[0] == "train"
    # the command's own earlier output is replaced
    out = tmp_path / "pred"
    for flags in ((), ("--overwrite",)):
        run("predict", "-m", rule, "-i", lab / "images", "-o", out, *flags)
    assert (out / "burden.csv").is_file() and not leftovers(tmp_path)
    evaluation = tmp_path / "eval"
    for flags in ((), ("--overwrite",)):
        run("evaluate", "-m", rule, "-d", lab, "-o", evaluation, *flags)
    assert (evaluation / "metrics.md").is_file()


def test_split_never_replaces_another_file(world, tmp_path):
    lab = world / "data" / "labelled"
    assert "file exists" in refused(world, "split", "-d", lab, "-o", world / "notes.txt")
    line = refused(world, "split", "-d", lab, "-o", world / "notes.txt", "--overwrite")
    assert "not one" in line
    out = tmp_path / "s.json"
    run("split", "-d", lab, "-o", out)
    assert "file exists" in error_line(run("split", "-d", lab, "-o", out, expect=2))
    run("split", "-d", lab, "-o", out, "--seed", 1, "--overwrite")


def test_export_overwrite_replaces_only_an_export(world, tmp_path):
    from stitchnet_tf.errors import DataError
    from stitchnet_tf.export import export_savedmodel, export_tflite

    before = snapshot(world)
    with pytest.raises(DataError, match="replaces only a .tflite file"):
        export_tflite(None, world / "notes.txt", 32, overwrite=True)
    (tmp_path / "base" / "1").mkdir(parents=True)
    (tmp_path / "base" / "1" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="replaces only a SavedModel"):
        export_savedmodel(None, tmp_path / "base", 32, version=1, overwrite=True)
    assert snapshot(world) == before and (tmp_path / "base" / "1" / "keep.txt").is_file()


def test_an_output_under_a_file_is_one_line_for_every_writer(world, tiny_stitchnet_run):
    """All ten writers; the refusal comes before any model is loaded."""
    target = world / "notes.txt" / "sub"
    rule, lab, net = world / "rule.json", world / "data" / "labelled", tiny_stitchnet_run
    for args in (
        ("predict", "-m", rule, "-i", lab / "images", "-o", target),
        ("evaluate", "-m", rule, "-d", lab, "-o", target),
        ("preprocess", "-i", lab, "-o", target, "--size", 32),
        ("demo-data", "-o", target),
        ("demo", "-o", target),
        ("train", "-l", lab, "-o", target, "--size", 32),
        ("split", "-d", lab, "-o", target / "s.json"),
        ("styles", "-m", net, "-i", lab / "images", "-o", target),
        ("sample", "-m", net, "-o", target),
        ("export", "-m", net, "-o", target),
        ("export", "-m", net, "-o", target / "m.tflite", "--format", "tflite"),
    ):
        line = refused(world, *args)
        assert "notes.txt" in line, (args, line)


def test_leftovers_of_a_killed_process_are_removed_by_the_next_run(world, tmp_path):
    """kill -9 leaves temporaries nothing can remove at the time: the next command writing
    beside them removes those whose process is gone, and keeps a live process's."""
    from stitchnet_tf.fileio import sweep_leftovers

    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = [
        tmp_path / f".pred.tmp-{dead}-abc123",
        tmp_path / f".best.tmp-{dead}-x.keras",
        tmp_path / f".pred.old-{dead}",
    ]
    stale[0].mkdir()
    (stale[0] / "half.png").write_bytes(b"x")
    stale[1].write_bytes(b"partial")
    stale[2].mkdir()
    live = tmp_path / f".other.tmp-{os.getpid()}-keep"
    live.mkdir()
    unrelated = tmp_path / ".hidden-notes.tmp"
    unrelated.write_text("mine")
    run("predict", "-m", world / "rule.json", "-i", world / "data" / "labelled", "-o",
        tmp_path / "pred")  # fmt: skip
    assert not any(p.exists() for p in stale), [p for p in stale if p.exists()]
    assert live.is_dir() and unrelated.is_file()
    assert sweep_leftovers(tmp_path) == []


@pytest.mark.parametrize(("signum", "code"), [(2, 130), (15, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_command_exits_cleanly_and_leaves_no_temporaries(
    world, tmp_path, signum, code
):
    """Interrupt `demo-data` while it writes (it polls for its temporary folder first):
    exit 130 / 143, one `error:` line, no temporary and no output."""
    import subprocess
    import sys
    import time

    out = tmp_path / "big"
    args = ["demo-data", "-o", str(out), "--labelled-patients", "40", "--size", "256"]
    script = "import sys\nfrom stitchnet_tf_cli.main import cli\ncli(sys.argv[1:])\n"
    import signal

    child = subprocess.Popen(
        [sys.executable, "-c", script, *args], stderr=subprocess.PIPE, text=True,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"},
        # a test runner's worker may ignore SIGINT, and a child inherits that: undo it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 120
    while not leftovers(tmp_path) and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "finished before it could be interrupted: make it bigger"
    time.sleep(0.3)
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == code, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert not leftovers(tmp_path) and not out.exists(), list(tmp_path.iterdir())


def test_evaluate_part_without_a_split_is_refused(world, tmp_path):
    line = error_line(
        run(
            "evaluate", "-m", world / "rule.json", "-d", world / "data" / "labelled",
            "-o", tmp_path / "e", "--part", "val", expect=2,
        )
    )  # fmt: skip
    assert "--part val needs --split" in line
    assert not (tmp_path / "e").exists()


def test_outputs_follow_the_umask(world, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "pred"
        run("predict", "-m", world / "rule.json", "-i", world / "data" / "labelled", "-o", out)
        run("split", "-d", world / "data" / "labelled", "-o", tmp_path / "s.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "s.json").stat().st_mode) == 0o644


@pytest.fixture(scope="module")
def corrupt_data(tmp_path_factory) -> Path:
    """A labelled dataset whose every slice of patient P00 is a truncated PNG."""
    root = tmp_path_factory.mktemp("corrupt")
    write_demo_dataset(
        root, labelled_patients=4, unlabelled_patients=0, slices_per_patient=2, size=64, seed=1
    )
    for image in sorted((root / "labelled" / "images").glob("P00_*.png")):
        image.write_bytes(image.read_bytes()[:100])
    return root / "labelled"


TRAIN_TINY = (
    "--size", "32", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4",
    "--width", "0.25", "--backbone-alpha", "0.35", "--eager", "--quiet",
    "--fractions", "0.5,0.25,0.25", "--recalibration-steps", "1",
)  # fmt: skip


def test_train_checks_every_slice_before_the_first_step(corrupt_data, tmp_path):
    before = snapshot(corrupt_data)
    r = run("train", "-l", corrupt_data, "-o", tmp_path / "run", *TRAIN_TINY, "--seed", 0, expect=2)
    line = error_line(r)
    assert "P00_0" in line and "truncated" in line, line
    assert snapshot(corrupt_data) == before and not leftovers(tmp_path)


@pytest.mark.slow
def test_a_slice_that_fails_inside_the_pipeline_ends_the_run_with_one_line(corrupt_data, tmp_path):
    """Without the up-front check the bad slice is met inside tf.data: the run must still end
    with exit 2 and one line naming the file, never a hang or a TensorFlow traceback."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import stitchnet_tf.training as t\n"
        "t.check_samples = lambda *a, **k: 0\n"
        "t.PIPELINE_GRACE = 5.0\n"
        "from stitchnet_tf_cli.main import cli\n"
        "cli(sys.argv[1:], prog_name='stitchnet-tf')\n"
    )
    args = ["train", "-l", corrupt_data, "-o", tmp_path / "run", *TRAIN_TINY, "--seed", 0]
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "P00_0" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_bad_options_are_one_line_naming_the_option(world, tmp_path):
    lab, rule = world / "data" / "labelled", world / "rule.json"
    out = tmp_path / "o"
    cases = [
        (("train", "-l", lab, "-o", out, "--seed", -1), "--seed"),
        (("train", "-l", lab, "-o", out, "--seed", 2**32), "--seed"),
        (("sample", "-m", rule, "-o", out, "--seed", -1), "--seed"),
        (("train", "-l", lab, "-o", out, "--learning-rate", -1), "--learning-rate"),
        (("train", "-l", lab, "-o", out, "--width", 0), "--width"),
        (("train", "-l", lab, "-o", out, "--backbone-alpha", -1), "--backbone-alpha"),
        (("train", "-l", lab, "-o", out, "--size", 33), "--size"),
        (("styles", "-m", rule, "-i", lab, "-o", out, "--size", 33), "--size"),
        (("preprocess", "-i", lab, "-o", out, "--margin", -1), "--margin"),
        (("preprocess", "-i", lab, "-o", out, "--window-width", 0), "--window-width"),
        (("predict", "-m", rule, "-i", lab, "-o", out, "--window-width", -5), "--window-width"),
        (("predict", "-m", rule, "-i", lab, "-o", out, "--decision", "posterior"), "--decision"),
        (("predict", "-m", rule, "-i", lab, "-o", out, "--samples", 3), "--samples"),
        (("evaluate", "-m", rule, "-d", lab, "-o", out, "--decision", "prior"), "--decision"),
        (("split", "-d", lab, "-o", out / "s.json", "--fractions", "nan,0.5,0.5"), "--fractions"),
        (("split", "-d", lab, "-o", out / "s.json", "--patient-pattern", "("), "--patient-pattern"),
        (
            ("split", "-d", lab, "-o", out / "s.json", "--patient-pattern", "P.*"),
            "--patient-pattern",
        ),
    ]
    for args, option in cases:
        line = refused(world, *args)
        assert option in line, (args, line)
        assert not out.exists(), args


def test_decompression_bombs_are_refused_before_decoding(world, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(world / "data" / "unlabelled", data)
    bombs = {"huge.png": forged_png(100_000, 100_000), "big.png": forged_png(10_000, 9_000)}
    for name, content in bombs.items():
        (data / "images" / name).write_bytes(content)
        with open(data / "patients.csv", "a") as f:
            f.write(f"{name},U99\n")
        line = refused(
            tmp_path,
            "predict", "-m", world / "rule.json", "-i", data / "images" / name,
            "-o", tmp_path / "p",
        )  # fmt: skip
        assert name in line and "limit of 67,108,864 pixels" in line, line
    line = refused(tmp_path, "preprocess", "-i", data, "-o", tmp_path / "o")
    assert "limit of 67,108,864 pixels" in line, line
    r = run("preprocess", "-i", data, "-o", tmp_path / "o", "--size", 32, "--skip-bad")
    assert "skipped 2 bad slices" in r.output, r.output


def test_a_config_json_that_is_not_an_object_is_named(world, tmp_path):
    import shutil

    from stitchnet_tf.errors import DataError
    from stitchnet_tf.run import Run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for text, problem in (("[1, 2]", "not a JSON object"), ("{", "JSONDecodeError")):
        (run_dir / "config.json").write_text(text)
        with pytest.raises(DataError, match=problem) as caught:
            Run(run_dir).config_dict()
        assert "config.json" in str(caught.value)
    shutil.rmtree(run_dir)
    assert Run(tmp_path).config_dict() is None and Run(tmp_path).config() is None


def test_a_baseline_refuses_stitchnet_options_with_one_line():
    import numpy as np

    from stitchnet_tf.errors import DataError
    from stitchnet_tf.models.baselines import UNet

    unet = UNet(width=0.25, alpha=0.35)
    x = np.zeros((1, 32, 32, 1), "float32")
    assert unet.segment(x)["labels"].shape == (1, 32, 32)
    for kwargs in ({"samples": 2}, {"decision": "posterior"}):
        with pytest.raises(DataError, match="apply to StitchNet only, not to UNet"):
            unet.segment(x, **kwargs)
