"""The four pixel classes and per-pixel *allowed-class sets*.

Every label, exact or partial, becomes per pixel the set of classes it allows, stored as a
4-bit mask (bit k set = class k allowed). The model marginalises over exactly this set, so
labelled, partially labelled and unlabelled pixels share one code path.

Classes (docs/DESIGN.md §1): 0 background (outside the lung field), 1 healthy lung,
2 ground-glass opacity (GGO), 3 consolidation (CON).
"""

from __future__ import annotations

import numpy as np

from stitchnet_tf.errors import DataError

CLASS_NAMES: tuple[str, ...] = ("background", "healthy", "ggo", "con")
NUM_CLASSES = 4
BACKGROUND, HEALTHY, GGO, CON = range(NUM_CLASSES)


def bits(*classes: int) -> int:
    """The allowed-set bit mask of the given class ids."""
    return sum(1 << k for k in set(classes))


ALL = bits(BACKGROUND, HEALTHY, GGO, CON)  # 15: unlabelled
LUNG = bits(HEALTHY, GGO, CON)  # inside the lung field
LESION = bits(GGO, CON)
NO_LESION = bits(BACKGROUND, HEALTHY)

#: Names usable in a mask-value map, each meaning a set of classes.
SET_NAMES: dict[str, int] = {
    "background": bits(BACKGROUND),
    "healthy": bits(HEALTHY),
    "ggo": bits(GGO),
    "con": bits(CON),
    "lesion": LESION,  # GGO or consolidation
    "lung": LUNG,  # healthy or any lesion
    "none": NO_LESION,  # no lesion: background or healthy lung
    "unknown": ALL,
}

#: Named mask conventions. `medseg` reads MedSeg / Inf-Net indexed masks (0 no lesion,
#: 1 GGO, 2 consolidation) and 0/255 binary lesion masks; `binary` reads lesion masks stored
#: as 0 and 1 or 255; `fourclass` reads exact 4-class label images; `bits` reads stored
#: allowed-set bit masks (the masks `preprocess` writes).
PRESETS: dict[str, dict[int, int]] = {
    "medseg": {0: NO_LESION, 1: bits(GGO), 2: bits(CON), 255: LESION},
    "binary": {0: NO_LESION, 1: LESION, 255: LESION},
    "fourclass": {0: bits(BACKGROUND), 1: bits(HEALTHY), 2: bits(GGO), 3: bits(CON)},
    "bits": {v: v for v in range(1, 16)},
}
DEFAULT_MASK_VALUES = "medseg"


class MaskValueMap:
    """What each stored mask value means, as an allowed-class bit mask.

    Args:
        mapping: stored value -> allowed-set bits (1..15).
        name: how the map was given, for messages and manifests.

    Example:
        >>> m = MaskValueMap.parse("0:none,1:ggo,2:con")
        >>> m.to_allowed(np.array([[0, 1], [2, 2]]), "mask.png").tolist()
        [[3, 4], [8, 8]]
    """

    def __init__(self, mapping: dict[int, int], name: str = "custom"):
        for v, b in mapping.items():
            if not 1 <= b <= ALL:
                raise ValueError(f"mask value {v} maps to an empty or invalid class set ({b})")
        self.mapping = {int(k): int(v) for k, v in mapping.items()}
        self.name = name

    @classmethod
    def parse(cls, spec: str | None) -> MaskValueMap:
        """From a preset name (`medseg`, `binary`, `fourclass`, `bits`) or `0:none,1:ggo,...`.

        The right-hand side of each pair is a set name (see `SET_NAMES`) or several joined by
        `+` (e.g. `3:ggo+con`).
        """
        spec = (spec or DEFAULT_MASK_VALUES).strip()
        if spec in PRESETS:
            return cls(PRESETS[spec], spec)
        mapping: dict[int, int] = {}
        for item in spec.split(","):
            key, sep, names = item.partition(":")
            if not sep:
                raise DataError(
                    None,
                    f"bad --mask-values item {item!r}: expected VALUE:CLASS "
                    f"(presets: {', '.join(PRESETS)})",
                )
            try:
                value = int(key)
            except ValueError:
                raise DataError(None, f"bad --mask-values value {key!r}: not an integer") from None
            b = 0
            for name in names.split("+"):
                name = name.strip().lower()
                if name not in SET_NAMES:
                    raise DataError(
                        None,
                        f"bad --mask-values class {name!r}: use one of {', '.join(SET_NAMES)}",
                    )
                b |= SET_NAMES[name]
            mapping[value] = b
        return cls(mapping, spec)

    def to_allowed(self, stored: np.ndarray, path: str = "mask") -> np.ndarray:
        """Stored values [H, W] -> allowed-set bits [H, W] uint8; unknown values are an error."""
        values = np.unique(stored)
        unknown = [int(v) for v in values if int(v) not in self.mapping]
        if unknown:
            shown = ", ".join(map(str, unknown[:8])) + (" ..." if len(unknown) > 8 else "")
            raise DataError(
                path,
                f"unknown mask values {shown} for mask map '{self.name}' "
                f"(known: {sorted(self.mapping)}); pass --mask-values",
            )
        lut = np.zeros(max(int(values.max()), max(self.mapping)) + 1, np.uint8)
        for v, b in self.mapping.items():
            lut[v] = b
        return lut[stored.astype(np.int64)]

    def __repr__(self) -> str:
        return f"MaskValueMap({self.name!r})"


def combine_with_lung(allowed: np.ndarray, lung_field: np.ndarray) -> np.ndarray:
    """Refine allowed sets [H, W] with a lung field [H, W] bool.

    Outside the lung field only background is allowed, inside only lung classes; where that
    contradicts the label (a lesion drawn outside an imperfect lung mask), the label wins.
    """
    region = np.where(lung_field, LUNG, bits(BACKGROUND)).astype(np.uint8)
    both = allowed & region
    return np.where(both == 0, allowed, both).astype(np.uint8)


def lung_field_of(allowed: np.ndarray, lung: np.ndarray | None) -> np.ndarray:
    """The lung field [H, W] bool from a lung mask and what the label itself says.

    Pixels whose label forbids background (any lesion, healthy lung) are lung even where the
    lung mask missed them; pixels labelled exactly background are not, whatever the mask says.
    """
    field = np.zeros(allowed.shape, bool) if lung is None else lung.astype(bool)
    field |= (allowed & bits(BACKGROUND)) == 0
    field &= allowed != bits(BACKGROUND)
    return field


def allowed_to_onehot(allowed: np.ndarray) -> np.ndarray:
    """Bits [...] -> [..., 4] float32 with 1 where a class is allowed."""
    return ((allowed[..., None] >> np.arange(NUM_CLASSES)) & 1).astype(np.float32)


def exact_labels(allowed: np.ndarray, fill: int = -1) -> np.ndarray:
    """Class id where exactly one class is allowed, `fill` elsewhere. [H, W] int."""
    out = np.full(allowed.shape, fill, np.int64)
    for k in range(NUM_CLASSES):
        out[allowed == (1 << k)] = k
    return out
