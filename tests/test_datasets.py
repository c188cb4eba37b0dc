"""Dataset folder discovery: layouts, volumes, patients, manifests and bad folders."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stitchnet_tf.data import io
from stitchnet_tf.data.classes import MaskValueMap
from stitchnet_tf.data.datasets import Dataset, Sample, discover
from stitchnet_tf.errors import DataError

H, W = 40, 48
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((H, W), value, np.uint8)
    a[: H // 2] = 0
    Image.fromarray(a).save(path)
    return path


def jpg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W), 90, np.uint8)).save(path)
    return path


def nifti(path: Path, n: int, dtype=np.int16) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros((W, H, n), dtype)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n", encoding="utf-8")
    return path


def error_of(excinfo, path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert excinfo.value.path == str(path)
    assert msg.startswith(f"{path}: ")
    return msg


# --------------------------------------------------------------------------- layouts


def test_labelled_layout_with_lungs_and_mixed_suffixes(tmp_path):
    jpg(tmp_path / "images" / "a.jpg")
    png(tmp_path / "images" / "b.png")
    png(tmp_path / "masks" / "a.png", 1)
    np.save(tmp_path / "masks" / "b.npy", np.zeros((H, W), np.uint8))
    png(tmp_path / "lungs" / "a.png", 255)
    png(tmp_path / "lungs" / "b.png", 255)
    (tmp_path / "images" / ".DS_Store").write_bytes(b"\x00junk")  # hidden: ignored
    ds = discover(tmp_path)
    assert isinstance(ds, Dataset)
    assert ds.root == tmp_path
    assert [s.id for s in ds.samples] == ["images/a.jpg", "images/b.png"]
    a, b = ds.samples
    assert a == Sample(
        "images/a.jpg",
        str(tmp_path / "images" / "a.jpg"),
        str(tmp_path / "masks" / "a.png"),
        str(tmp_path / "lungs" / "a.png"),
        None,
        None,
    )
    assert b.mask == str(tmp_path / "masks" / "b.npy")
    assert b.lung == str(tmp_path / "lungs" / "b.png")
    assert ds.labelled and all(s.labelled for s in ds.samples)
    assert not ds.has_patients
    assert len(ds) == 2
    assert ds.mask_map.name == "medseg"
    assert ds.prepared_size is None


def test_labelled_layout_without_lungs(tmp_path):
    png(tmp_path / "images" / "x.png")
    png(tmp_path / "masks" / "x.png", 255)
    (s,) = discover(tmp_path, mask_values="binary").samples
    assert s.mask == str(tmp_path / "masks" / "x.png") and s.lung is None
    assert discover(tmp_path, mask_values="binary").mask_map.name == "binary"


def test_mask_values_as_map_and_from_dataset_json(tmp_path):
    png(tmp_path / "images" / "x.png")
    custom = MaskValueMap.parse("0:none,7:lesion")
    assert discover(tmp_path, mask_values=custom).mask_map is custom
    (tmp_path / "dataset.json").write_text(
        json.dumps({"prepared_size": 256, "mask_values": "bits"})
    )
    ds = discover(tmp_path)
    assert ds.prepared_size == 256
    assert ds.mask_map.name == "bits"
    assert ds.info["prepared_size"] == 256


def test_unlabelled_images_folder(tmp_path):
    for name in ("c.png", "a.png", "b.tif"):
        png(tmp_path / "images" / name)
    ds = discover(tmp_path)
    assert [s.id for s in ds.samples] == ["images/a.png", "images/b.tif", "images/c.png"]
    assert all(s.mask is None and s.lung is None and s.slice is None for s in ds.samples)
    assert not ds.labelled


def test_unlabelled_images_at_root_ignore_side_files(tmp_path):
    png(tmp_path / "s1.png")
    png(tmp_path / "s2.png")
    csv(tmp_path / "patients.csv", "file,patient\ns1.png,P1\ns2.png,P2")
    (tmp_path / "README.md").write_text("# about this data\n")
    ds = discover(tmp_path)
    assert [s.id for s in ds.samples] == ["s1.png", "s2.png"]
    assert [s.patient for s in ds.samples] == ["P1", "P2"]
    assert ds.has_patients and not ds.labelled


def test_nifti_volumes_expand_to_slices(tmp_path):
    nifti(tmp_path / "images" / "v.nii.gz", 3)
    nifti(tmp_path / "masks" / "v.nii.gz", 3, np.uint8)
    nifti(tmp_path / "images" / "w.nii", 2)
    nifti(tmp_path / "masks" / "w.nii.gz", 2, np.uint8)  # stems match across suffixes
    ds = discover(tmp_path)
    assert [s.id for s in ds.samples] == [
        "images/v.nii.gz#0",
        "images/v.nii.gz#1",
        "images/v.nii.gz#2",
        "images/w.nii#0",
        "images/w.nii#1",
    ]
    assert [s.slice for s in ds.samples] == [0, 1, 2, 0, 1]
    assert [s.patient for s in ds.samples] == ["v", "v", "v", "w", "w"]
    assert ds.samples[4].mask == str(tmp_path / "masks" / "w.nii.gz")
    assert ds.samples[0].image == str(tmp_path / "images" / "v.nii.gz")
    assert ds.has_patients and ds.labelled


def test_volume_patient_from_patients_csv_overrides_stem(tmp_path):
    nifti(tmp_path / "images" / "v.nii.gz", 2)
    csv(tmp_path / "patients.csv", "file,patient\nv.nii.gz,P9")
    assert {s.patient for s in discover(tmp_path).samples} == {"P9"}


def test_mask_volume_with_other_slice_count_is_an_error(tmp_path):
    nifti(tmp_path / "images" / "v.nii.gz", 3)
    mask = nifti(tmp_path / "masks" / "v.nii.gz", 4, np.uint8)
    with pytest.raises(DataError) as ei:
        discover(tmp_path)
    msg = error_of(ei, mask)
    assert "4 slices" in msg and "3" in msg and "v.nii.gz" in msg


def test_lung_volume_with_other_slice_count_is_an_error(tmp_path):
    nifti(tmp_path / "images" / "v.nii", 3)
    lung = nifti(tmp_path / "lungs" / "v.nii", 2, np.uint8)
    with pytest.raises(DataError) as ei:
        discover(tmp_path)
    error_of(ei, lung)


def test_dicom_series_folder_is_one_volume(tmp_path, write_ct_dicom):
    series = tmp_path / "images" / "ct1"
    series.mkdir(parents=True)
    for i, z in enumerate([3.0, 1.0, 2.0, 0.0]):
        write_ct_dicom(series / f"{i}.dcm", np.zeros((H, W)), z=z, series="1.2.3.9", number=i)
    png(tmp_path / "images" / "flat.png")
    ds = discover(tmp_path)
    assert [s.id for s in ds.samples] == [f"images/ct1#{k}" for k in range(4)] + ["images/flat.png"]
    assert [s.slice for s in ds.samples] == [0, 1, 2, 3, None]
    assert [s.patient for s in ds.samples] == ["ct1"] * 4 + [None]
    assert ds.samples[0].image == str(series)
    assert not ds.has_patients  # the slice file has none


def _two_dotted_series(root: Path, write_ct_dicom) -> list[str]:
    names = ["1.2.840.5.100", "1.2.840.5.200"]
    for n, name in enumerate(names):
        folder = root / "images" / name
        folder.mkdir(parents=True)
        for i in range(2):
            write_ct_dicom(folder / f"{i}.dcm", np.zeros((H, W)), z=i, series=f"9.{n}", number=i)
    return names


def test_dicom_series_folders_with_dotted_names_are_separate_patients(tmp_path, write_ct_dicom):
    names = _two_dotted_series(tmp_path, write_ct_dicom)
    ds = discover(tmp_path)
    assert [s.id for s in ds.samples] == [f"images/{n}#{k}" for n in names for k in (0, 1)]
    assert [s.patient for s in ds.samples] == [n for n in names for _ in (0, 1)]


def test_dicom_series_folder_with_dotted_name_finds_its_mask(tmp_path, write_ct_dicom):
    names = _two_dotted_series(tmp_path, write_ct_dicom)
    for name in names:
        nifti(tmp_path / "masks" / f"{name}.nii.gz", 2, np.uint8)
    ds = discover(tmp_path)
    assert [Path(s.mask).name for s in ds.samples] == [f"{n}.nii.gz" for n in names for _ in (0, 1)]


# --------------------------------------------------------------------------- patients


@pytest.mark.parametrize("key", ["a.png", "a", "images/a.png"])
def test_patients_csv_by_name_stem_or_relative_path(tmp_path, key):
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "images" / "b.png")
    csv(tmp_path / "patients.csv", f"file,patient\n{key},P1\nb.png, P2 ")
    ds = discover(tmp_path)
    assert [s.patient for s in ds.samples] == ["P1", "P2"]
    assert ds.has_patients


def test_file_missing_from_patients_csv_is_an_error(tmp_path):
    png(tmp_path / "images" / "a.png")
    b = png(tmp_path / "images" / "b.png")
    csv(tmp_path / "patients.csv", "file,patient\na.png,P1")
    with pytest.raises(DataError) as ei:
        discover(tmp_path)
    assert "patients.csv" in error_of(ei, b)


def test_patients_csv_without_its_columns_is_an_error(tmp_path):
    png(tmp_path / "images" / "a.png")
    bad = csv(tmp_path / "patients.csv", "name,subject\na.png,P1")
    with pytest.raises(DataError) as ei:
        discover(tmp_path)
    assert "file,patient" in error_of(ei, bad)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"^(p\d+)_", ["p01", "p01", "p02"]),  # group 1
        (r"(ct)-?(?P<patient>p\d+)", ["p01", "p01", "p02"]),  # the named group, not group 1
        (r"p\d+", ["p01", "p01", "p02"]),  # no group: the whole match
    ],
)
def test_patient_pattern(tmp_path, pattern, expected):
    for name in ("p01_001.png", "p01_002.png", "p02_001.png"):
        png(tmp_path / "images" / name)
    if "ct" in pattern:
        for p in (tmp_path / "images").iterdir():
            p.rename(p.with_name("ct-" + p.name))
    ds = discover(tmp_path, patient_pattern=pattern)
    assert [s.patient for s in ds.samples] == expected
    assert ds.has_patients


def test_name_not_matching_the_pattern_is_an_error(tmp_path):
    png(tmp_path / "images" / "p01_001.png")
    odd = png(tmp_path / "images" / "scan.png")
    with pytest.raises(DataError) as ei:
        discover(tmp_path, patient_pattern=r"(p\d+)_")
    assert "patient-pattern" in error_of(ei, odd)


# --------------------------------------------------------------------------- manifest


def test_manifest_mixed_labelled_and_unlabelled(tmp_path):
    png(tmp_path / "data" / "a.png")
    png(tmp_path / "data" / "b.png")
    jpg(tmp_path / "data" / "c.jpg")
    png(tmp_path / "labels" / "a.png", 1)
    png(tmp_path / "labels" / "c.png", 2)
    png(tmp_path / "lung" / "a.png", 255)
    png(tmp_path / "images" / "ignored.png")  # the manifest wins over the folder layout
    csv(
        tmp_path / "manifest.csv",
        """
image,mask,lung,patient
data/a.png,labels/a.png,lung/a.png,P1
data/b.png,,,P2
data/c.jpg,labels/c.png,, P1
""",
    )
    ds = discover(tmp_path)
    assert [s.id for s in ds.samples] == ["data/a.png", "data/b.png", "data/c.jpg"]
    a, b, c = ds.samples
    assert (a.mask, a.lung, a.patient) == (
        str(tmp_path / "labels" / "a.png"),
        str(tmp_path / "lung" / "a.png"),
        "P1",
    )
    assert (b.mask, b.lung, b.patient) == (None, None, "P2")
    assert not b.labelled
    assert (c.mask, c.lung, c.patient) == (str(tmp_path / "labels" / "c.png"), None, "P1")
    assert ds.labelled and ds.has_patients


def test_manifest_patient_falls_back_to_pattern_and_volumes_expand(tmp_path):
    png(tmp_path / "x" / "p7_1.png")
    nifti(tmp_path / "x" / "vol.nii.gz", 2)
    csv(tmp_path / "manifest.csv", "image,patient\nx/p7_1.png,\nx/vol.nii.gz,P3")
    ds = discover(tmp_path, patient_pattern=r"(p\d+)_")
    assert [s.id for s in ds.samples] == ["x/p7_1.png", "x/vol.nii.gz#0", "x/vol.nii.gz#1"]
    assert [s.patient for s in ds.samples] == ["p7", "P3", "P3"]


def test_manifest_slice_column(tmp_path):
    nifti(tmp_path / "vol.nii", 5)
    csv(tmp_path / "manifest.csv", "image,slice\nvol.nii,3")
    (s,) = discover(tmp_path).samples
    assert (s.id, s.slice) == ("vol.nii#3", 3)


def test_manifest_listing_a_missing_file_names_the_manifest(tmp_path):
    png(tmp_path / "a.png")
    manifest = csv(tmp_path / "manifest.csv", "image,mask\na.png,masks/a.png")
    with pytest.raises(DataError) as ei:
        discover(tmp_path)
    assert "masks/a.png" in error_of(ei, manifest)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("image,mask", "no rows"),
        ("file,mask\na.png,", "'image' column"),
        ("image,patient\n ,P1", "empty 'image'"),
    ],
)
def test_bad_manifests(tmp_path, text, problem):
    png(tmp_path / "a.png")
    manifest = csv(tmp_path / "manifest.csv", text)
    with pytest.raises(DataError) as ei:
        discover(tmp_path)
    assert problem in error_of(ei, manifest)


# --------------------------------------------------------------------------- bad layouts


def test_missing_folder_and_file_as_root(tmp_path):
    with pytest.raises(DataError) as ei:
        discover(tmp_path / "nope")
    assert "not found" in error_of(ei, tmp_path / "nope")
    f = png(tmp_path / "f.png")
    with pytest.raises(DataError) as ei:
        discover(f)
    assert "not a folder" in error_of(ei, f)


def test_empty_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError) as ei:
        discover(tmp_path)
    assert "no images" in error_of(ei, tmp_path / "images")


def test_image_without_mask_is_an_error_naming_it(tmp_path):
    png(tmp_path / "images" / "a.png")
    lonely = png(tmp_path / "images" / "b.png")
    png(tmp_path / "masks" / "a.png", 1)
    with pytest.raises(DataError) as ei:
        discover(tmp_path)
    assert "no mask" in error_of(ei, lonely)


def test_skip_bad_skips_and_warns(tmp_path):
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "images" / "b.png")
    png(tmp_path / "masks" / "a.png", 1)
    warnings: list[str] = []
    ds = discover(tmp_path, skip_bad=True, warn=warnings.append)
    assert [s.id for s in ds.samples] == ["images/a.png"]
    assert len(warnings) == 1
    assert "b.png" in warnings[0] and "no mask" in warnings[0]
    # skip_bad without a warn callback still stops
    with pytest.raises(DataError):
        discover(tmp_path, skip_bad=True)


def test_skip_bad_with_nothing_left(tmp_path):
    png(tmp_path / "images" / "b.png")
    (tmp_path / "masks").mkdir()
    warnings: list[str] = []
    with pytest.raises(DataError) as ei:
        discover(tmp_path, skip_bad=True, warn=warnings.append)
    assert "no usable samples" in error_of(ei, tmp_path)
    assert len(warnings) == 1


def test_mask_without_image_only_warns(tmp_path):
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "masks" / "a.png", 1)
    png(tmp_path / "masks" / "zz.png", 1)
    warnings: list[str] = []
    ds = discover(tmp_path, warn=warnings.append)
    assert [s.id for s in ds.samples] == ["images/a.png"]
    assert len(warnings) == 1 and "zz.png" in warnings[0]
    assert len(discover(tmp_path)) == 1  # without a warn callback: silent


def test_non_image_file_in_images_is_an_error_naming_it(tmp_path):
    png(tmp_path / "images" / "a.png")
    notes = tmp_path / "images" / "notes.txt"
    notes.write_text("hello\n")
    with pytest.raises(DataError) as ei:
        discover(tmp_path)
    assert "not a supported image file" in error_of(ei, notes)


def test_two_masks_with_one_stem_is_an_error(tmp_path):
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "masks" / "a.png", 1)
    np.save(tmp_path / "masks" / "a.npy", np.zeros((H, W), np.uint8))
    with pytest.raises(DataError) as ei:
        discover(tmp_path)
    msg = error_of(ei, tmp_path / "masks")
    assert "a.png" in msg and "a.npy" in msg


def test_require_labels(tmp_path):
    png(tmp_path / "images" / "a.png")
    with pytest.raises(DataError) as ei:
        discover(tmp_path, require_labels=True)
    assert "no masks" in error_of(ei, tmp_path)
    png(tmp_path / "masks" / "a.png", 1)
    assert discover(tmp_path, require_labels=True).labelled


def test_masks_subdir_and_lungs_subdir(tmp_path):
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "infection" / "a.png", 255)
    png(tmp_path / "lungfield" / "a.png", 255)
    (s,) = discover(tmp_path, masks_subdir="infection", lungs_subdir="lungfield").samples
    assert s.mask == str(tmp_path / "infection" / "a.png")
    assert s.lung == str(tmp_path / "lungfield" / "a.png")
    assert not discover(tmp_path).labelled  # the default "masks" folder is absent
    # lungs_subdir=None: the lung masks are not read (the lung field comes from the image)
    (s,) = discover(tmp_path, masks_subdir="infection", lungs_subdir=None).samples
    assert s.lung is None and s.mask is not None


def test_dataset_spec_carries_the_reading_whole(tmp_path):
    import dataclasses

    from stitchnet_tf.data.datasets import DatasetSpec
    from stitchnet_tf.training import TrainConfig

    png(tmp_path / "images" / "a.png")
    png(tmp_path / "infection" / "a.png", 255)
    png(tmp_path / "lungfield" / "a.png", 255)
    spec = DatasetSpec(str(tmp_path), "binary", None, "infection", "lungfield")
    (s,) = spec.discover(require_labels=True).samples
    assert s.lung == str(tmp_path / "lungfield" / "a.png")
    assert spec.discover().mask_map.name == "binary"
    assert DatasetSpec.of(spec) is spec and DatasetSpec.of(tmp_path) == DatasetSpec(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.path = tmp_path
    config = TrainConfig(
        labelled=str(tmp_path), output="run", unlabelled=str(tmp_path / "u"),
        mask_values="binary", masks_subdir="infection", lungs_subdir="lungfield",
        unlabelled_patient_pattern=r"(p\d+)_",
    )  # fmt: skip
    assert config.labelled_spec() == spec
    unlabelled = config.unlabelled_spec()  # its own patients, the same sub-folders, no masks
    assert unlabelled.patient_pattern == r"(p\d+)_" and unlabelled.lungs_subdir == "lungfield"
    assert unlabelled.mask_values is None


def test_cli_lungs_subdir_none_reads_no_lung_masks(tmp_path):
    import click
    from click.testing import CliRunner

    from cli.options import data_options

    png(tmp_path / "images" / "a.png")
    png(tmp_path / "lungs" / "a.png", 255)

    @click.command()
    @data_options
    def show(reading):
        (s,) = reading(tmp_path).discover().samples
        click.echo(f"lung={s.lung is not None}")

    assert CliRunner().invoke(show, []).output.strip() == "lung=True"
    assert CliRunner().invoke(show, ["--lungs-subdir", "none"]).output.strip() == "lung=False"


# --------------------------------------------------------------------------- Dataset / Sample


def _ds(patients=("P1", "P2", "P1")):
    samples = [
        Sample(f"images/{i}.png", f"/d/images/{i}.png", f"/d/masks/{i}.png", None, p)
        for i, p in enumerate(patients)
    ]
    return Dataset(Path("/d"), samples, MaskValueMap.parse(None))


def test_subset_keeps_dataset_order_and_ignores_unknown_ids():
    ds = _ds()
    sub = ds.subset(["images/2.png", "images/0.png", "images/9.png"])
    assert [s.id for s in sub.samples] == ["images/0.png", "images/2.png"]
    assert sub.root == ds.root and sub.mask_map is ds.mask_map
    assert len(ds) == 3  # the original is untouched
    assert len(ds.subset(set())) == 0


def test_unlabel_drops_only_the_mask():
    s = Sample("images/a.png", "/d/images/a.png", "/d/masks/a.png", "/d/lungs/a.png", "P", 4)
    u = s.unlabel()
    assert s.labelled and not u.labelled
    assert u == Sample("images/a.png", "/d/images/a.png", None, "/d/lungs/a.png", "P", 4)
    assert s.mask == "/d/masks/a.png"  # frozen, unchanged


def test_has_patients_and_labelled():
    assert _ds().has_patients
    assert not _ds(("P1", None, "P2")).has_patients
    assert not _ds(("P1", "", "P2")).has_patients
    assert not _ds(()).has_patients
    ds = _ds()
    assert ds.labelled
    ds.samples = [s.unlabel() for s in ds.samples]
    assert not ds.labelled
    ds.samples[1] = replace(ds.samples[1], mask="/d/masks/x.png")
    assert ds.labelled


# --------------------------------------------------------------------------- real data


def needs_data(test):
    """Marks a test that reads ../shared/data (`realdata`; skipped where it is absent)."""
    absent = pytest.mark.skipif(
        not SHARED.is_dir(), reason=f"real data folder {SHARED} is absent (fresh clone)"
    )
    return pytest.mark.realdata(absent(test))


@needs_data
def test_real_medseg_labelled():
    ds = discover(SHARED / "medseg-covid" / "labelled", require_labels=True)
    assert len(ds) == 50
    assert all(s.labelled and Path(s.mask).is_file() for s in ds.samples)
    assert all(s.id.startswith("images/") and s.id.endswith(".jpg") for s in ds.samples)
    assert not ds.has_patients
    for s in ds.samples[:3]:
        m = io.read_mask(s.mask)
        assert set(np.unique(m).tolist()) <= {0, 1, 2}
        allowed = ds.mask_map.to_allowed(m, s.mask)
        assert allowed.shape == m.shape
        assert io.read_image(s.image).shape == m.shape


@needs_data
def test_real_medseg_unlabelled_patients_from_pattern():
    ds = discover(SHARED / "medseg-covid" / "unlabelled", patient_pattern=r"Data-1_(.+)_\d+\.jpg")
    assert len(ds) == 1600
    assert not ds.labelled
    assert ds.has_patients
    assert len({s.patient for s in ds.samples}) == 20


@needs_data
def test_real_zenodo20_lungs():
    ds = discover(SHARED / "zenodo20-lungs", masks_subdir="infection", mask_values="binary")
    assert len(ds) == 1269
    assert ds.has_patients and ds.labelled
    assert len({s.patient for s in ds.samples}) == 14
    assert all(s.lung and Path(s.lung).parent.name == "lungs" for s in ds.samples)
    assert all(Path(s.mask).parent.name == "infection" for s in ds.samples)


def test_images_at_root_pass_over_mask_folders(tmp_path):
    from stitchnet_tf.data.io import write_png

    (tmp_path / "masks").mkdir()
    write_png(tmp_path / "a.png", np.zeros((40, 40), np.uint8))
    write_png(tmp_path / "masks" / "a.png", np.zeros((40, 40), np.uint8))
    ds = discover(tmp_path)
    assert [s.id for s in ds.samples] == ["a.png"] and ds.samples[0].mask is not None
