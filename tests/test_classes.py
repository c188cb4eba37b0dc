"""Mask-value maps and per-pixel allowed-class sets."""

import numpy as np
import pytest

from stitchnet_tf.data.classes import (
    ALL,
    BACKGROUND,
    CON,
    GGO,
    HEALTHY,
    LESION,
    LUNG,
    NO_LESION,
    MaskValueMap,
    allowed_to_onehot,
    bits,
    combine_with_lung,
    exact_labels,
    lung_field_of,
)
from stitchnet_tf.errors import DataError


def test_bits_and_named_sets():
    assert bits(BACKGROUND) == 1 and bits(CON) == 8
    assert ALL == 15 and LUNG == bits(HEALTHY, GGO, CON) and LESION == bits(GGO, CON)
    assert NO_LESION == bits(BACKGROUND, HEALTHY)


def test_parse_spec_and_presets():
    m = MaskValueMap.parse("0:none,1:ggo,2:con")
    stored = np.array([[0, 1], [2, 0]])
    np.testing.assert_array_equal(m.to_allowed(stored), [[NO_LESION, 4], [8, NO_LESION]])
    assert MaskValueMap.parse(None).mapping == MaskValueMap.parse("medseg").mapping
    assert MaskValueMap.parse("binary").mapping[255] == LESION
    assert MaskValueMap.parse("fourclass").mapping == {0: 1, 1: 2, 2: 4, 3: 8}
    assert MaskValueMap.parse("3:ggo+con,7:unknown,9:lung").mapping == {3: LESION, 7: ALL, 9: LUNG}


@pytest.mark.parametrize("spec", ["0:none,1:bogus", "x:ggo", "0-none", "0:"])
def test_bad_specs_are_one_line_errors(spec):
    with pytest.raises(DataError) as e:
        MaskValueMap.parse(spec)
    assert "\n" not in str(e.value) and "--mask-values" in str(e.value)


def test_unknown_values_name_the_file():
    m = MaskValueMap.parse("medseg")
    with pytest.raises(DataError, match=r"masks/a\.png: unknown mask values 7, 38"):
        m.to_allowed(np.array([[0, 7], [38, 1]]), "masks/a.png")


def test_combine_with_lung_restricts_and_label_wins():
    allowed = np.array([NO_LESION, NO_LESION, bits(GGO), ALL, ALL], np.uint8)
    field = np.array([True, False, False, True, False])
    out = combine_with_lung(allowed, field)
    # inside lung: no-lesion -> healthy; outside: background; GGO outside an imperfect mask stays.
    np.testing.assert_array_equal(out, [bits(HEALTHY), bits(BACKGROUND), bits(GGO), LUNG, 1])


def test_lung_field_includes_lesions_and_excludes_exact_background():
    allowed = np.array([bits(GGO), NO_LESION, bits(BACKGROUND), bits(HEALTHY)], np.uint8)
    lung = np.array([False, True, True, False])
    np.testing.assert_array_equal(lung_field_of(allowed, lung), [True, True, False, True])
    np.testing.assert_array_equal(lung_field_of(allowed, None), [True, False, False, True])


def test_onehot_and_exact_labels():
    allowed = np.array([[1, 2], [LESION, ALL]], np.uint8)
    onehot = allowed_to_onehot(allowed)
    assert onehot.shape == (2, 2, 4) and onehot.dtype == np.float32
    np.testing.assert_array_equal(onehot[1, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(exact_labels(allowed), [[0, 1], [-1, -1]])
