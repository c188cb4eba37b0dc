"""Patient-level splits and label withholding."""

from pathlib import Path

import pytest

from stitchnet_tf.data.classes import MaskValueMap
from stitchnet_tf.data.datasets import Dataset, Sample
from stitchnet_tf.data.splits import (
    Split,
    kfold_splits,
    split_dataset,
    withhold_labels,
    withhold_patients,
)
from stitchnet_tf.errors import DataError


def _dataset(n_patients=10, per=(3, 9), labelled=True, patients=True):
    samples = []
    for p in range(n_patients):
        for k in range(per[0] + (p * 7) % (per[1] - per[0] + 1)):
            sid = f"images/p{p}_{k}.png"
            samples.append(
                Sample(sid, sid, sid if labelled else None, None, f"P{p}" if patients else None)
            )
    return Dataset(Path("root"), samples, MaskValueMap.parse("medseg"))


def _patients_of(ds, ids):
    by_id = {s.id: s.patient for s in ds.samples}
    return {by_id[i] for i in ids}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_by_patient_has_no_leakage_and_covers_everything(seed):
    ds = _dataset()
    s = split_dataset(ds, seed=seed)
    parts = [set(s.train), set(s.val), set(s.test)]
    assert all(parts) and sum(map(len, parts)) == len(ds)
    assert set().union(*parts) == {x.id for x in ds.samples}
    pats = [_patients_of(ds, p) for p in parts]
    assert not (pats[0] & pats[1] or pats[0] & pats[2] or pats[1] & pats[2])
    assert s.by == "patient" and sorted(s.patients["test"]) == sorted(pats[2])
    # about 60/20/20 of the slices
    assert 0.45 < len(s.train) / len(ds) < 0.75


def test_split_is_seed_controlled():
    ds = _dataset()
    assert split_dataset(ds, seed=3).to_json() == split_dataset(ds, seed=3).to_json()
    assert split_dataset(ds, seed=3).test != split_dataset(ds, seed=4).test


def test_split_by_slice_without_patients_warns():
    warnings = []
    s = split_dataset(_dataset(patients=False), seed=0, warn=warnings.append)
    assert s.by == "slice" and len(warnings) == 1 and "no patient ids" in warnings[0]


def test_too_few_patients_and_bad_fractions():
    with pytest.raises(DataError, match="2 patient"):
        split_dataset(_dataset(n_patients=2))
    with pytest.raises(DataError, match="fractions"):
        split_dataset(_dataset(), (0.5, 0.2, 0.2))


def test_save_load_round_trip_and_check(tmp_path):
    ds = _dataset()
    s = withhold_labels(split_dataset(ds, seed=0), ds, max_labelled=2, seed=0)
    s.save(tmp_path / "split.json")
    loaded = Split.load(tmp_path / "split.json")
    assert loaded.to_json() == s.to_json()
    loaded.check(ds)
    with pytest.raises(DataError, match="not in this dataset"):
        loaded.check(_dataset(n_patients=3))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not a valid split file"):
        Split.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="split file not found"):
        Split.load(tmp_path / "missing.json")


def test_withhold_labels_subsets_train_only_and_is_seeded():
    ds = _dataset()
    s = split_dataset(ds, seed=0)
    a = withhold_labels(s, ds, max_labelled=4, seed=1)
    assert len(s.train) - len(a.unlabelled) == 4 and set(a.unlabelled) <= set(s.train)
    assert a.train == s.train and a.val == s.val and a.test == s.test
    assert withhold_labels(s, ds, max_labelled=4, seed=1).unlabelled == a.unlabelled
    assert withhold_labels(s, ds, max_labelled=4, seed=2).unlabelled != a.unlabelled
    b = withhold_labels(s, ds, label_fraction=0.25, seed=0)
    assert len(s.train) - len(b.unlabelled) == round(0.25 * len(s.train))
    assert withhold_labels(s, ds, max_labelled=10_000).unlabelled == []
    with pytest.raises(DataError, match="not both"):
        withhold_labels(s, ds, max_labelled=1, label_fraction=0.5)


def test_withhold_patients_keeps_whole_train_patients_and_is_seeded():
    ds = _dataset()
    s = split_dataset(ds, seed=0)
    train_patients = _patients_of(ds, s.train)
    a = withhold_patients(s, ds, 2, seed=1)
    kept = set(s.train) - set(a.unlabelled)
    assert set(a.unlabelled) <= set(s.train) and a.val == s.val and a.test == s.test
    assert len(_patients_of(ds, kept)) == 2  # every slice of the two chosen patients
    assert not _patients_of(ds, kept) & _patients_of(ds, a.unlabelled)
    assert _patients_of(ds, kept) | _patients_of(ds, a.unlabelled) == train_patients
    assert withhold_patients(s, ds, 2, seed=1).unlabelled == a.unlabelled
    assert {tuple(withhold_patients(s, ds, 2, seed=k).unlabelled) for k in range(5)} != {
        tuple(a.unlabelled)
    }
    assert withhold_patients(s, ds, len(train_patients)).unlabelled == []
    with pytest.raises(DataError, match="labelled patients must be 1 to the"):
        withhold_patients(s, ds, 0)
    no_ids = _dataset(patients=False)
    with pytest.raises(DataError, match="need patient ids"):
        withhold_patients(split_dataset(no_ids, seed=0), no_ids, 1)


@pytest.mark.parametrize("patients", [True, False])
def test_kfold_tests_every_slice_once_without_leakage(patients):
    ds = _dataset(n_patients=12, patients=patients)
    splits = kfold_splits(ds, k=5, seed=3)
    everything = sorted(s.id for s in ds.samples)
    assert sorted(i for s in splits for i in s.test) == everything  # each slice tested once
    for i, s in enumerate(splits):
        assert sorted(s.train + s.val + s.test) == everything
        assert s.val == splits[(i + 1) % 5].test  # val is the next fold
        if patients:
            parts = [_patients_of(ds, s.part(p)) for p in ("train", "val", "test")]
            assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    sizes = [len(s.test) for s in splits]
    assert max(sizes) - min(sizes) <= 9  # dealt to the smallest fold: about equal
    assert kfold_splits(ds, k=5, seed=3) == splits  # seeded
    with pytest.raises(DataError):
        kfold_splits(_dataset(n_patients=4), k=5)


def test_leaking_splits_are_caught(tmp_path):
    """A hand-edited split that puts a slice, or one patient's slices, in two parts is refused
    with one line naming the split file."""
    ds = _dataset()
    good = split_dataset(ds, seed=0)
    good.check(ds)
    twice = Split(good.train, good.val, good.test + good.train[:1])
    twice.save(tmp_path / "twice.json")
    with pytest.raises(DataError, match=r"twice\.json: slice .* in both 'train' and 'test'"):
        Split.load(tmp_path / "twice.json").check(ds)
    by_id = {s.id: s.patient for s in ds.samples}
    moved = good.train[0]  # one slice of a training patient moves to test; the rest stay
    leaky = Split([i for i in good.train if i != moved], good.val, good.test + [moved])
    assert sum(by_id[i] == by_id[moved] for i in leaky.train) > 0
    with pytest.raises(DataError, match=rf"patient {by_id[moved]} has slices in both 'train'"):
        leaky.check(ds)
    # without patient ids a split by slice is all one can check
    Split(leaky.train, leaky.val, leaky.test).check(_dataset(patients=False))


def test_train_and_evaluate_refuse_a_leaking_split(tiny_data, tmp_path):
    from helpers import error_line, run

    from stitchnet_tf.data.datasets import discover
    from stitchnet_tf.models.threshold import ThresholdRule

    labelled = tiny_data / "labelled"
    ds = discover(labelled)
    assert ds.has_patients
    good = split_dataset(ds, (0.5, 0.25, 0.25), seed=0)
    by_id = {s.id: s.patient for s in ds.samples}
    moved = good.train[0]
    Split([i for i in good.train if i != moved], good.val, good.test + [moved]).save(
        tmp_path / "leaky.json"
    )
    out = tmp_path / "run"
    result = run("train", "-l", labelled, "-o", out, "--split", tmp_path / "leaky.json",
                 "--epochs", 1, "--steps-per-epoch", 1, "--size", 32, expect=2)  # fmt: skip
    line = error_line(result)
    assert "leaky.json" in line and f"patient {by_id[moved]}" in line and not out.exists()
    rule = ThresholdRule(0.3, 0.6, 64).save(tmp_path / "rule.json")
    result = run("evaluate", "-m", rule, "-d", labelled, "--split", tmp_path / "leaky.json",
                 "-o", tmp_path / "eval", expect=2)  # fmt: skip
    assert "leaky.json" in error_line(result) and not (tmp_path / "eval").exists()
