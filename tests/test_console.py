"""The console (issue 15): no TensorFlow start-up lines or library warnings unless --verbose,
progress bars on stderr, --quiet, and train's device line and duration estimate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_on_terminal

from stitchnet_tf.data.synthetic import write_demo_dataset
from stitchnet_tf.models.threshold import ThresholdRule
from stitchnet_tf.progress import expect
from stitchnet_tf_cli import console

#: lines the first `import tensorflow` printed on this machine before (issue 15)
STARTUP = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796282210.516811   19865 port.cc:153] oneDNN custom operations are on. You "
    "may see slightly different numerical results",
    "I0000 00:00:1796282210.517379   19865 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "E0000 00:00:1796282216.974104   19865 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
    "2025-09-17 14:44:05.157831: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] Could "
    "not find cuda drivers on your machine, GPU will not be used.",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",  # LiteRT, running a .tflite
]

#: what must never show in a normal run: TensorFlow's start-up and Python warnings
NOISE = ("absl", "oneDNN", "cuda", "cuInit", "cpu_feature_guard", "Warning", "WARNING")

#: runs the CLI like the console script does, then says whether TensorFlow was imported (the
#: check is only meaningful for a command that imports it) and how the console was set up
SCRIPT = """\
import os, sys
from stitchnet_tf_cli import console
from stitchnet_tf_cli.main import cli
try:
    cli(sys.argv[1:], prog_name="stitchnet-tf")
finally:
    print("tensorflow:", "tensorflow" in sys.modules, file=sys.__stdout__)
    print("hook:", console._HOOK in sys.meta_path, file=sys.__stdout__)
    print("env:", os.environ.get("TF_CPP_MIN_LOG_LEVEL"), file=sys.__stdout__)
"""


@pytest.mark.parametrize("line", STARTUP)
def test_tensorflow_startup_lines_are_recognised(line):
    assert console.NATIVE_NOISE.match(line)


@pytest.mark.parametrize(
    "line",
    [
        "error: data/x.png: truncated file",
        "warning: no patient ids: split by slice",
        "Traceback (most recent call last):",
        "F0000 00:00:1796282210.516811   19865 cuda.cc:1] Check failed: a fatal error",
        "segmented 2 slices (0 volumes) -> preds; lesion burden in preds/burden.csv",
    ],
)
def test_other_lines_are_kept(line):
    assert not console.NATIVE_NOISE.match(line)


def test_native_lines_while_tensorflow_imports_are_filtered(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    with console._filtered_native_stderr():
        os.write(2, ("\n".join(STARTUP) + "\nkept: a real message\n").encode())
    assert capfd.readouterr().err == "kept: a real message\n"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # TensorFlow logs everything: so do we
    with console._filtered_native_stderr():
        os.write(2, (STARTUP[1] + "\n").encode())
    assert capfd.readouterr().err == STARTUP[1] + "\n"


def test_a_bar_off_a_terminal_prints_its_label_once_and_nothing_when_quiet(capsys):
    try:
        with console.progress("predict", "slices") as bar:
            expect(bar, 3)
            for _ in range(4):  # one more than announced: the bar grows
                bar(1)
        assert capsys.readouterr().err == "predict (3 slices)\n"
        console.configure(quiet=True)
        with console.progress("predict", "slices") as bar:
            expect(bar, 3)
            bar(3)
        console.info("an informational line")
        console.warn("still shown")
        console.info("warning: a library's log line that warns")
        assert capsys.readouterr() == (
            "",
            "warning: still shown\nwarning: a library's log line that warns\n",
        )
    finally:
        console.configure()


def test_expect_leaves_plain_callables_alone():
    calls: list[int] = []
    expect(calls.append, 5)  # a list's append has no `expect`
    expect(None, 5)
    assert calls == []


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Two unlabelled slices and a `ThresholdRule` model (it loads instantly; `predict` still
    imports TensorFlow)."""
    root = tmp_path_factory.mktemp("console")
    write_demo_dataset(
        root / "data", labelled_patients=1, unlabelled_patients=1, slices_per_patient=2, size=64
    )
    ThresholdRule(0.3, 0.6, size=32).save(root / "rule.json")
    return root


def _predict(world: Path, out: str, *options: str, tty: bool = False):
    """`stitchnet-tf [options] predict` in a child process, as a user runs it (no
    TF_CPP_MIN_LOG_LEVEL of the test runner); its stderr on a pseudo-terminal with `tty`.
    Returns (exit code, stdout, stderr)."""
    args = [*options, "predict", "-m", world / "rule.json", "-i", world / "data" / "unlabelled"]
    args += ["-o", world / out]
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "COLUMNS")}
    command = [sys.executable, "-c", SCRIPT, *map(str, args)]
    if not tty:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        return done.returncode, done.stdout, done.stderr
    return run_on_terminal(command, env, timeout=600)


def test_a_normal_run_shows_a_bar_and_no_tensorflow_startup_lines(world):
    code, out, err = _predict(world, "normal", tty=True)
    assert code == 0, err[-3000:]
    assert "tensorflow: True" in out and "hook: False" in out  # TensorFlow was imported
    assert "segmented 2 slices" in out
    assert "predict (2 slices)" in err and "2/2" in err and "[####" in err  # the bar, drawn
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    noisy = [ln for ln in lines if any(word in ln for word in NOISE)]
    assert not noisy, err[-3000:]


def test_quiet_prints_only_the_result(world):
    code, out, err = _predict(world, "quiet", "-q")
    assert code == 0, err[-3000:]
    assert err == ""
    assert out.splitlines()[0].startswith("segmented 2 slices (0 volumes)")
    assert "tensorflow: True" in out


def test_verbose_leaves_tensorflow_and_warnings_alone(world):
    code, out, err = _predict(world, "verbose", "--verbose")
    assert code == 0, err[-3000:]
    assert "tensorflow: True" in out and "hook: False" in out and "env: None" in out
    # TensorFlow's own start-up lines come through (which ones depends on the machine)
    assert any(console.NATIVE_NOISE.match(ln) for ln in err.splitlines()), err[-3000:]


def test_train_estimates_its_duration_from_the_run_itself(monkeypatch):
    from stitchnet_tf import training

    now = [0.0]
    monkeypatch.setattr(training.time, "time", lambda: now[0])
    said: list[str] = []
    callback = training._estimate(said.append, steps_per_epoch=8, epochs_left=4)
    callback.set_params({"verbose": 0})
    callback.on_train_begin()
    for epoch, first_step in enumerate((30.0, 2.0, 2.0, 2.0)):
        callback.on_epoch_begin(epoch)
        for batch in range(8):  # the first step of the run traces the graph: 30 s
            now[0] += first_step if batch == 0 else 2.0
            callback.on_train_batch_end(batch)
        now[0] += 20.0  # validation and checkpoints
        callback.on_epoch_end(epoch)
    assert said == [
        # after 6 steps, 26 are left at 2 s a step
        "estimated time: about 52 s for the 26 steps left (2.00 s a step on steps 2-6; "
        "validation not included)",
        # 30 + 7 x 2 + 20 = 64 s, of which 28 s were tracing: 36 s an epoch
        "epoch 1 took 36 s with validation (and 28 s tracing the train step); about 1.8 min "
        "for the 3 epochs left",
        "epoch 2 took 36 s with validation; about 72 s for the 2 epochs left",
    ]


def test_train_names_its_device_and_strategy():
    from stitchnet_tf import distribute

    line = distribute.describe(distribute.make_strategy("auto"))
    assert ("CPU (" in line or "GPU " in line) and "replica" in line
