"""Models shipped with the package, loaded by name as keras-hub presets are.

The trained files live in the repository's top-level `saved_models/` folder, which is installed
as the package `stitchnet_tf_models` (package data of the wheel). Each shipped model is a folder
with a model card; a lesion model's folder is a trimmed run folder (`best.keras` and its
`config.json`), so `inference.load_model` reads it as it reads a run.

    stitchnet-tf list-models
    stitchnet-tf predict -m medseg-stitchnet -i scan/ -o out/

A name whose files are missing is a `DataError`, never a silent fallback to another model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stitchnet_tf.errors import DataError

#: The importable package that holds `saved_models/` once installed.
PACKAGE = "stitchnet_tf_models"


@dataclass(frozen=True)
class ShippedModel:
    """One shipped model: its name, what it segments, and where its files are in the folder."""

    name: str
    kind: str  # "lesion" (four classes) or "lung" (the lung field)
    folder: str
    file: str  # the file `load_model` / `LearnedLungMask` reads, relative to the folder
    description: str

    @property
    def card(self) -> str:
        return f"{self.folder}/MODEL_CARD.md"


SHIPPED: dict[str, ShippedModel] = {
    m.name: m
    for m in (
        ShippedModel(
            "medseg-stitchnet",
            "lesion",
            "medseg_stitchnet",
            "best.keras",
            "StitchNet (cpu preset, 128 px) trained on the 50 labelled MedSeg slices: "
            "healthy lung, GGO, consolidation",
        ),
        ShippedModel(
            "lung-unet",
            "lung",
            "lung_unet",
            "lung_unet.keras",
            "lung-field U-Net (zenodo lungs, fine-tuned with MedSeg lesions as lung); the "
            "default lung segmenter",
        ),
        ShippedModel(
            "lung-unet-v1",
            "lung",
            "lung_unet",
            "lung_unet_v1.keras",
            "stage-1 lung-field U-Net (zenodo lungs only)",
        ),
    )
}
#: The lung segmenter every command uses unless told otherwise.
DEFAULT_LUNG_MODEL = "lung-unet"


def models_root() -> Path:
    """The installed `saved_models/` folder (in a source checkout: the repository's own)."""
    try:
        from importlib.resources import files

        root = Path(str(files(PACKAGE)))
        if root.is_dir():
            return root
    except (ImportError, TypeError):  # not installed: running from a source checkout
        pass
    return Path(__file__).resolve().parents[1] / "saved_models"


def is_shipped_name(name: str | os.PathLike) -> bool:
    """Whether `name` is a shipped model's name (and not a path that exists)."""
    return str(name) in SHIPPED and not Path(name).exists()


def location(name: str) -> Path:
    """Where the file of shipped model `name` is when installed (it may be missing)."""
    if name not in SHIPPED:
        raise DataError(name, f"no shipped model of that name (shipped: {', '.join(SHIPPED)})")
    return models_root() / SHIPPED[name].folder / SHIPPED[name].file


def shipped_path(name: str) -> Path:
    """The file of shipped model `name` (`DataError` if the name is unknown or not installed)."""
    path = location(name)
    if not path.is_file():
        raise DataError(
            name,
            f"shipped model is not installed ({path} is missing): reinstall stitchnet-tf, "
            "or pass a model path",
        )
    return path


def resolve(model: str | os.PathLike) -> Path:
    """A model argument as a path: a shipped model's name becomes its folder (lesion models:
    the folder, read as a run) or file (lung models); anything else is returned as given."""
    if not is_shipped_name(model):
        return Path(model)
    path = shipped_path(str(model))
    return path.parent if SHIPPED[str(model)].kind == "lesion" else path


def list_models() -> list[dict]:
    """One row per shipped model: name, kind, whether installed, size (MB), description, card."""
    root = models_root()
    rows = []
    for m in SHIPPED.values():
        path = root / m.folder / m.file
        rows.append(
            {
                "name": m.name,
                "kind": m.kind,
                "installed": path.is_file(),
                "size_mb": round(path.stat().st_size / 1e6, 1) if path.is_file() else None,
                "description": m.description,
                "card": str(root / m.card),
            }
        )
    return rows
