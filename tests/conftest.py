"""Shared pytest fixtures."""

import fcntl
import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per test worker (`-n 2` on the 2-core CI machine): TensorFlow's own pools of
    # one thread per core in each worker only contend with each other. Set before TensorFlow
    # starts; the commands' child processes inherit it.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import helpers  # noqa: E402
import pytest

# Seconds each slow file took in one full run (2 workers, shared machine, 2026-12-06; relative
# weights are what matter). The two test workers take whole files (`--dist loadfile`) in
# collection order (`--no-loadscope-reorder`): heaviest first, so that no long file is left
# to run alone at the end. xdist's own order (most tests first) put the one-test demo last.
FILE_SECONDS = {
    "test_cli_train.py": 700,
    "test_export.py": 635,
    "test_model.py": 450,
    "test_distribute.py": 345,
    "test_demo.py": 280,
    "test_base.py": 185,
    "test_battery.py": 100,
    "test_consistency.py": 70,
    "test_evaluation.py": 70,
}


def _write_ct_dicom(path, stored, *, z=0.0, series="1.2.3.4", number=1, slope=1.0, intercept=0.0):
    """Write a minimal single-frame CT DICOM file (int16 stored values; IPP [0, 0, z], axial,
    no PixelSpacing) and return its path."""
    return helpers.write_ct_dicom(
        path,
        stored,
        position=(0.0, 0.0, z),
        series=series,
        number=number,
        slope=slope,
        intercept=intercept,
    )


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
    """Heaviest files first, each file's tests in their own order (a stable sort); the
    learning guards skipped unless `--learning`."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))
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


def _once(tmp_path_factory, worker_id: str, name: str, make) -> Path:
    """The folder `make(folder)` writes, made once for all test workers of the session (the
    workers' temporary folders share a parent; a lock lets one make it while the others wait),
    or once for this process without workers. If making it fails, the other workers fail with
    its cause rather than retry into the half-written folder."""
    if worker_id == "master":
        folder = tmp_path_factory.mktemp(name) / name
        make(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent
    folder, done, failed = root / name, root / f"{name}.done", root / f"{name}.failed"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():  # not again into the half-written folder: the cause is reported
            cause = failed.read_text()
            pytest.fail(f"the shared {name} failed in another worker: {cause}", pytrace=False)
        if not done.exists():
            try:
                make(folder)
            except BaseException as error:
                failed.write_text(f"{type(error).__name__}: {error}".splitlines()[0][:300])
                raise
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, worker_id):
    """A synthetic dataset shared by the whole session (never modify it): `labelled/` with 4
    patients × 2 slices of 64 px (P00_00.png ...), `unlabelled/` with 1 patient."""
    from stitchnet_tf.data.synthetic import write_demo_dataset

    def make(root):
        write_demo_dataset(
            root, labelled_patients=4, unlabelled_patients=1, slices_per_patient=2, size=64, seed=5
        )

    return _once(tmp_path_factory, worker_id, "tiny-data", make)


@pytest.fixture(scope="session")
def tiny_stitchnet_run(tiny_data, tmp_path_factory, worker_id):
    """A StitchNet run folder trained for one step at 32 px, shared by the session and its
    workers (never modify it): a minute, for the validation's traces."""
    from helpers import run

    def make(out):
        run(
            "train", "-l", tiny_data / "labelled", "-o", out, "--epochs", 1,
            "--steps-per-epoch", 1, "--seed", 0, *TINY_TRAIN,
        )  # fmt: skip

    return _once(tmp_path_factory, worker_id, "tiny-stitchnet-run", make)
