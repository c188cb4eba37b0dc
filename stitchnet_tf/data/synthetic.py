"""Synthetic chest-CT slices with lesion and lung labels: the embedded demo dataset.

Each "patient" is a seeded set of shape parameters (body size, lung shapes, lesion burden);
each slice is that patient at a position z along the lungs (apex z=0, base z=1), so slices of
one patient vary smoothly and differ from other patients'. Slices are made in Hounsfield units
(HU): air outside the body, a body with a fat rim, ribs and spine, a mediastinum with the heart,
two lungs with vessels, and ground-glass opacity (GGO) and consolidation lesions inside the
lungs, plus Gaussian noise. Intensities follow real CT: healthy lung is darkest, GGO hazy mid
grey, consolidation as dense as soft tissue.

Coordinates are normalised to [-1, 1] across the image, x to the right and y down (anterior at
the top, the patient's left on the image right, as in radiological display), so a patient looks
the same at every `size`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from stitchnet_tf.data.intensity import (
    LUNG_WINDOW_LEVEL,
    LUNG_WINDOW_WIDTH,
    to_uint8,
    window_hu,
)
from stitchnet_tf.fileio import atomic_dir

#: Smallest image side `synth_patient` and `write_demo_dataset` accept.
MIN_SIZE = 32
#: the settings file that marks a folder written by `demo-data` (what --overwrite may replace)
SYNTHETIC_MARKER = "synthetic.json"
#: Palette of the written lesion masks (index 0 none, 1 GGO, 2 consolidation), as MedSeg's.
MEDSEG_PALETTE: tuple[int, ...] = (0, 0, 0, 128, 0, 0, 0, 128, 0)

_AIR, _FAT, _SOFT = -1000.0, -100.0, 40.0
_LOWEST_HU, _HIGHEST_HU = -1024.0, 3071.0
_MAX_HARMONIC = 5


@dataclasses.dataclass(frozen=True)
class SyntheticSlice:
    """One synthetic axial slice and its labels, all [H, W].

    Attributes:
        hu: float32 Hounsfield units.
        lesion: uint8 lesion classes, 0 none, 1 GGO, 2 consolidation (MedSeg convention).
        lung: bool, both lungs including the lesions inside them, excluding the mediastinum.
        patient: the patient's name.
        index: the slice index within the patient.
    """

    hu: np.ndarray
    lesion: np.ndarray
    lung: np.ndarray
    patient: str
    index: int


@dataclasses.dataclass(frozen=True)
class _Blob:
    """A star-shaped blob: an ellipse whose radius varies with the angle by harmonics."""

    cx: float
    cy: float
    rx: float
    ry: float
    amps: tuple[float, ...] = ()  # harmonic k = 1, 2, ... amplitudes (relative to the radius)
    phases: tuple[float, ...] = ()
    notch: tuple[float, float, float] = (0.0, 0.0, 1.0)  # depth, angle, angular width


@dataclasses.dataclass(frozen=True)
class _Lung:
    side: int  # -1 image left (patient's right), +1 image right
    cx: float
    cy: float
    ax: float
    ay: float
    amps: tuple[float, ...]
    phases: tuple[float, ...]
    drift: tuple[float, ...]  # phase change per unit z, per harmonic
    notch: float


@dataclasses.dataclass(frozen=True)
class _Lesion:
    kind: int  # 1 GGO, 2 consolidation
    lung: int  # 0 or 1, index into _Patient.lungs
    theta: float  # position in lung-local polar coordinates
    rho: float
    radius: float  # relative to the lung's mean semi-axis
    aspect: float
    zc: float
    zr: float
    hu: float
    soft: float  # edge width in pixels at 128 px
    amps: tuple[float, ...]
    phases: tuple[float, ...]
    drift: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class _Patient:
    seed: int
    z0: float
    z1: float
    body: _Blob
    fat: float  # fat rim thickness, normalised units
    wall: float  # chest wall thickness inside the fat, normalised units
    lungs: tuple[_Lung, _Lung]
    heart: _Blob
    mediastinum_ax: float
    spine_y: float
    spine_r: float
    ribs: tuple[tuple[float, float], ...]  # (angle, drift) per rib
    lung_hu: float
    noise: float
    lesions: tuple[_Lesion, ...]


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")


def _seed_entropy(seed: int) -> int:
    """Any integer -> a non-negative one for `np.random.SeedSequence`."""
    return int(seed) % (1 << 64)


def _harmonics(rng: np.random.Generator, scale: float, n: int = 4):
    amps = tuple(float(a) for a in rng.uniform(-scale, scale, n) / np.arange(1, n + 1) ** 0.5)
    phases = tuple(float(p) for p in rng.uniform(0.0, 2 * np.pi, n))
    return amps, phases


def _sample_patient(patient_seed: int) -> _Patient:
    """Draw one patient's shape parameters from its seed."""
    rng = np.random.default_rng(np.random.SeedSequence([_seed_entropy(patient_seed), 0]))
    z0, z1 = float(rng.uniform(0.08, 0.3)), float(rng.uniform(0.7, 0.92))
    bax, bay = float(rng.uniform(0.8, 0.92)), float(rng.uniform(0.55, 0.66))
    bcy = float(rng.uniform(0.0, 0.08))
    amps, phases = _harmonics(rng, 0.03)
    amps = (0.0, amps[1], amps[2], float(rng.uniform(0.01, 0.03)))  # k=4: a squarer chest
    phases = (0.0, phases[1], phases[2], float(np.pi))
    body = _Blob(float(rng.uniform(-0.02, 0.02)), bcy, bax, bay, amps, phases)
    fat = float(rng.uniform(0.025, 0.07))
    wall = float(rng.uniform(0.035, 0.06))
    lungs = []
    lung_cy = bcy + float(rng.uniform(-0.07, -0.02))
    for side in (-1, 1):
        amps, phases = _harmonics(rng, 0.06)
        amps = (float(rng.uniform(0.03, 0.08)), *amps[1:])  # k=1 bulges posteriorly
        phases = (-np.pi / 2, *phases[1:])
        lungs.append(
            _Lung(
                side=side,
                cx=side * bax * float(rng.uniform(0.44, 0.49)),
                cy=lung_cy + float(rng.uniform(-0.02, 0.02)),
                ax=bax * float(rng.uniform(0.36, 0.41)) * (1.03 if side < 0 else 0.97),
                ay=bay * float(rng.uniform(0.74, 0.84)),
                amps=amps,
                phases=phases,
                drift=tuple(float(d) for d in rng.uniform(-1.5, 1.5, len(amps))),
                notch=float(rng.uniform(0.12, 0.25)),
            )
        )
    heart = _Blob(
        bax * float(rng.uniform(0.06, 0.15)),
        bcy - bay * float(rng.uniform(0.1, 0.22)),
        bax * float(rng.uniform(0.22, 0.3)),
        bay * float(rng.uniform(0.3, 0.4)),
        *_harmonics(rng, 0.04, 3),
    )
    ribs = tuple(
        (float(a), float(d))
        for a, d in zip(rng.uniform(0, 2 * np.pi, 12), rng.uniform(-1.0, 1.0, 12), strict=True)
    )
    # COVID-19 CT of the kind segmenters are trained on: most patients carry lesions, often many
    burden = int(rng.choice(4, p=[0.06, 0.24, 0.4, 0.3]))
    n_ggo = (0, int(rng.integers(2, 5)), int(rng.integers(4, 9)), int(rng.integers(8, 14)))[burden]
    p_con = (0.0, 0.4, 0.6, 0.75)[burden]
    lesions: list[_Lesion] = []
    grow = (1.0, 1.2, 1.4, 1.7)[burden]
    for _ in range(n_ggo):
        ggo = _sample_lesion(rng, 1, z0, z1, grow)
        lesions.append(ggo)
        if rng.random() < p_con:  # consolidation inside or next to the GGO, towards the pleura
            con = _sample_lesion(rng, 2, z0, z1)
            lesions.append(
                dataclasses.replace(
                    con,
                    lung=ggo.lung,
                    theta=ggo.theta + float(rng.uniform(-0.15, 0.15)),
                    rho=min(1.05, ggo.rho + float(rng.uniform(0.0, 0.2))),
                    radius=ggo.radius * float(rng.uniform(0.35, 0.7)),
                    zc=ggo.zc + float(rng.uniform(-0.3, 0.3)) * ggo.zr,
                    zr=ggo.zr * float(rng.uniform(0.4, 0.8)),
                )
            )
    if burden >= 2 and rng.random() < 0.5:  # a lone consolidation at the lung border
        lesions.append(_sample_lesion(rng, 2, z0, z1, grow))
    return _Patient(
        seed=patient_seed,
        z0=z0,
        z1=z1,
        body=body,
        fat=fat,
        wall=wall,
        lungs=(lungs[0], lungs[1]),
        heart=heart,
        mediastinum_ax=bax * float(rng.uniform(0.09, 0.13)),
        spine_y=bcy + bay * float(rng.uniform(0.66, 0.74)),
        spine_r=bax * float(rng.uniform(0.08, 0.1)),
        ribs=ribs,
        lung_hu=float(rng.uniform(-880.0, -830.0)),
        noise=float(rng.uniform(12.0, 35.0)),
        lesions=tuple(lesions),
    )


def _sample_lesion(
    rng: np.random.Generator, kind: int, z0: float, z1: float, grow: float = 1.0
) -> _Lesion:
    # Lesions lie mostly in the periphery (subpleural) and posteriorly (dependent lung).
    theta = float(rng.uniform(-np.pi, np.pi))
    if rng.random() < 0.5:
        theta = float(np.pi / 2 + rng.normal(0.0, 0.8))
    ggo = kind == 1
    amps, phases = _harmonics(rng, 0.25 if ggo else 0.3, _MAX_HARMONIC)
    return _Lesion(
        kind=kind,
        lung=int(rng.integers(2)),
        theta=theta,
        rho=float(rng.uniform(0.45, 0.95) if ggo else rng.uniform(0.75, 1.05)),
        radius=grow * float(rng.uniform(0.18, 0.45) if ggo else rng.uniform(0.1, 0.22)),
        aspect=float(rng.uniform(0.7, 1.4)),
        zc=float(rng.uniform(z0 - 0.05, z1 + 0.05)),
        zr=float(rng.uniform(0.25, 0.6) if ggo else rng.uniform(0.15, 0.35)),
        hu=float(rng.uniform(-600.0, -350.0) if ggo else rng.uniform(-90.0, 40.0)),
        soft=float(rng.uniform(2.5, 5.0) if ggo else rng.uniform(1.0, 1.8)),
        amps=(0.0, *amps[1:]),
        phases=phases,
        drift=tuple(float(d) for d in rng.uniform(-3.0, 3.0, _MAX_HARMONIC)),
    )


# -- rendering -------------------------------------------------------------------------------


def _coords(lo: int, hi: int, size: int) -> np.ndarray:
    """Normalised coordinates of the centres of pixels lo..hi-1."""
    return ((np.arange(lo, hi, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)


def _distance(
    size: int, blob: _Blob, pad: int = 3, full: bool = False
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Approximate signed distance in pixels (negative inside) to `blob`, in its bounding box.

    Returns (box, distance [h, w]) or None when the blob is off the image; `full` computes the
    whole image.
    """
    reach = 1.0 + float(np.abs(blob.amps).sum())
    half = size / 2.0
    if full:
        x0, x1, y0, y1 = 0, size, 0, size
    else:
        x0 = max(0, int(math.floor((blob.cx - blob.rx * reach + 1) * half)) - pad)
        x1 = min(size, int(math.ceil((blob.cx + blob.rx * reach + 1) * half)) + pad)
        y0 = max(0, int(math.floor((blob.cy - blob.ry * reach + 1) * half)) - pad)
        y1 = min(size, int(math.ceil((blob.cy + blob.ry * reach + 1) * half)) + pad)
        if x0 >= x1 or y0 >= y1:
            return None
    u = (_coords(x0, x1, size)[None, :] - blob.cx) / blob.rx
    v = (_coords(y0, y1, size)[:, None] - blob.cy) / blob.ry
    th = np.arctan2(v, u)
    r = np.ones(th.shape, np.float32)
    for k, (a, p) in enumerate(zip(blob.amps, blob.phases, strict=True), start=1):
        if a:
            r += a * np.cos(k * th + p)
    depth, angle, width = blob.notch
    if depth:
        dth = (th - angle + np.pi) % (2 * np.pi) - np.pi
        r -= depth * np.exp(-((dth / width) ** 2))
    d = (np.hypot(u, v) - r) * (min(blob.rx, blob.ry) * half)
    return (slice(y0, y1), slice(x0, x1)), d.astype(np.float32)


def _alpha(d: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-ness in [0, 1]: 0.5 on the boundary, a linear ramp `width` pixels wide."""
    return np.clip(0.5 - d / max(width, 1e-3), 0.0, 1.0)


def _paint(hu: np.ndarray, box, alpha: np.ndarray, value) -> None:
    hu[box] += alpha * (value - hu[box])


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field [size, size] with unit-ish standard deviation, `cells` blobs across."""
    coarse = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(coarse, (size + 3 * size // cells,) * 2, interpolation=cv2.INTER_CUBIC)
    o = size // (2 * cells)
    return big[o : o + size, o : o + size] * 1.4


def _z_lung(z: float) -> float:
    """Lung size along z: small at the apex, largest below the middle."""
    return 0.5 + 0.5 * math.sin(math.pi * min(max(0.1 + 0.85 * z, 0.0), 1.0)) ** 0.7


def _z_heart(z: float) -> float:
    """Heart size along z: absent at the apex, full at the base."""
    return min(max((z - 0.3) / 0.4, 0.0), 1.0) ** 0.5


def _lung_blob(lung: _Lung, z: float) -> _Blob:
    s = _z_lung(z)
    medial = math.pi if lung.side > 0 else 0.0
    phases = tuple(p + d * z for p, d in zip(lung.phases, lung.drift, strict=True))
    notch = (lung.notch * (0.4 + 0.6 * _z_heart(z)), medial, 0.7)
    # lungs shrink towards their lateral-posterior part, as seen at the apex
    cx = lung.cx + lung.side * (1 - s) * lung.ax * 0.3
    return _Blob(cx, lung.cy, lung.ax * s, lung.ay * s, lung.amps, phases, notch)


def _to_px(x: float, size: int) -> int:
    """Normalised coordinate -> fixed-point pixel coordinate for cv2 drawing with shift=4."""
    return int(round(((x + 1.0) * size / 2.0 - 0.5) * 16))


def _vessels(p: _Patient, lungs: list[_Blob], z: float, size: int) -> np.ndarray:
    """Vessel density [size, size] in [0, 1]: branching trees from each hilum, plus dots."""
    canvas = np.zeros((size, size), np.uint8)
    scale = size / 128.0
    widths = (1.7, 1.3, 1.0, 0.8, 0.6)
    values = (210, 170, 130, 100, 75)
    for li, (lung, blob) in enumerate(zip(p.lungs, lungs, strict=True)):
        # the same draws at every z, so the trees move smoothly along z
        rng = np.random.default_rng(np.random.SeedSequence([_seed_entropy(p.seed), 1, li]))

        def to_image(u: float, v: float, blob: _Blob = blob) -> tuple[int, int]:
            return (_to_px(blob.cx + u * blob.rx, size), _to_px(blob.cy + v * blob.ry, size))

        def grow(u, v, angle, length, depth, rng=rng):
            f, phi = rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
            zc, ze = rng.random(), rng.uniform(0.1, 0.4)
            bends = rng.uniform(-0.35, 0.35, 3)
            a = angle + 0.3 * math.sin(2 * math.pi * f * z + phi)
            points = [to_image(u, v)]
            for bend in bends:  # a gently curving vessel in three pieces
                a += bend
                u, v = u + length / 3 * math.cos(a), v + length / 3 * math.sin(a)
                points.append(to_image(u, v))
            if depth == 0 or abs(z - zc) < ze:
                thick = max(1, int(round(widths[depth] * scale)))
                value = values[depth] * min(1.0, widths[depth] * scale)  # partial volume
                pts = np.array(points, np.int32)
                cv2.polylines(canvas, [pts], False, value, thick, cv2.LINE_AA, 4)
            if depth < len(widths) - 1:
                spread = rng.uniform(0.25, 0.6)
                for sign in (-1.0, 1.0):
                    shrink = rng.uniform(0.6, 0.8)
                    grow(u, v, a + sign * spread, length * shrink, depth + 1)

        lateral = 0.0 if lung.side > 0 else math.pi
        hilum_u, hilum_v = -lung.side * 0.55, float(rng.uniform(-0.2, 0.1))
        n_main = int(rng.integers(3, 5))
        for angle in np.linspace(-1.3, 1.3, n_main) + rng.uniform(-0.2, 0.2, n_main):
            grow(hilum_u, hilum_v, lateral - lung.side * angle, rng.uniform(0.35, 0.5), 0)
        n_dots = 40
        uv = rng.uniform(-1.0, 1.0, (n_dots, 2))
        zc, ze = rng.random(n_dots), rng.uniform(0.04, 0.12, n_dots)
        radius, value = rng.uniform(0.5, 1.6, n_dots) * scale, rng.uniform(120, 255, n_dots)
        for i in np.flatnonzero((np.hypot(uv[:, 0], uv[:, 1]) < 0.95) & (abs(z - zc) < ze)):
            r = max(1, int(round(radius[i] * 16)))
            cv2.circle(canvas, to_image(*uv[i]), r, int(value[i]), -1, cv2.LINE_AA, 4)
    vessels = canvas.astype(np.float32) / 255.0
    return cv2.GaussianBlur(vessels, (0, 0), 0.4 * scale**0.5)


def _render(
    p: _Patient, z: float, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One slice of patient `p` at z: (hu, lesion, lung)."""
    scale = size / 128.0
    half = size / 2.0
    hu = np.full((size, size), _AIR, np.float32)

    # CT table under the body
    y = _coords(0, size, size)
    x = y[None, :]
    table_y = p.body.cy + p.body.ry + 0.07 + 0.18 * x**2
    _paint(hu, np.s_[:, :], _alpha(np.abs(y[:, None] - table_y) * half - 0.9 * scale, 1.0), 150.0)

    # body: fat rim, then chest wall muscle
    box, d_body = _distance(size, p.body, full=True)
    muscle = _SOFT + 12.0 * _smooth_noise(rng, size, 6)
    _paint(hu, box, _alpha(d_body, 1.0), _FAT)
    _paint(hu, box, _alpha(d_body + p.fat * half, 2.0 * scale), muscle)

    # mediastinum (fat) with heart, aorta and trachea
    hz = _z_heart(z)
    med = _Blob(
        p.body.cx,
        p.body.cy - 0.05,
        p.mediastinum_ax * (1.0 + 0.4 * hz),
        p.body.ry * 0.78,
        (0.0, 0.08),
        (0.0, 0.0),
    )
    box_m, d_med = _distance(size, med)
    _paint(hu, box_m, _alpha(d_med, 1.5 * scale), _FAT + 20.0)
    blockers: list[tuple[tuple[slice, slice], np.ndarray]] = [(box_m, d_med)]
    if hz > 0.05:
        h = p.heart
        heart = _Blob(h.cx, h.cy, h.rx * hz, h.ry * hz, h.amps, h.phases)
        found = _distance(size, heart)
        if found is not None:
            _paint(hu, found[0], _alpha(found[1], 1.0), _SOFT + 10.0)
            blockers.append(found)
    aorta_r = p.spine_r * 0.8
    aorta = _Blob(p.body.cx + p.spine_r * 1.1, p.spine_y - 2.0 * p.spine_r, aorta_r, aorta_r)
    found = _distance(size, aorta)
    _paint(hu, found[0], _alpha(found[1], 1.0), _SOFT + 5.0)
    if z < 0.45:
        tr = p.spine_r * 0.75
        trachea = _Blob(p.body.cx, p.spine_y - 2.6 * p.spine_r, tr, tr * 0.9)
        found = _distance(size, trachea)
        _paint(hu, found[0], _alpha(found[1], 1.0), _AIR + 50.0)

    # bones: vertebra with spinous process, ribs
    bones = [
        _Blob(p.body.cx, p.spine_y, p.spine_r, p.spine_r * 0.9),
        _Blob(p.body.cx, p.spine_y + 1.5 * p.spine_r, p.spine_r * 0.35, p.spine_r * 0.8),
    ]
    for angle, drift in p.ribs:
        a = angle + 0.8 * drift * z
        if math.sin(a) < -0.55:  # no ribs in cross-section over the sternum
            continue
        f = 1.0 - (p.fat + 0.5 * p.wall) / min(p.body.rx, p.body.ry)
        rib_r = 0.025 * p.body.rx
        bones.append(
            _Blob(
                p.body.cx + f * p.body.rx * math.cos(a),
                p.body.cy + f * p.body.ry * math.sin(a),
                rib_r * 1.4,
                rib_r,
            )
        )
    for bone in bones:
        found = _distance(size, bone)
        if found is None:
            continue
        bb, d = found
        _paint(hu, bb, _alpha(d, 1.0), 300.0)
        cortex = _alpha(np.abs(d + 0.7 * scale) - 0.7 * scale, 1.0) * (d < 0.5)
        _paint(hu, bb, cortex, 650.0)
        blockers.append(found)

    # lungs: inside the chest wall, outside mediastinum, heart and bones
    lung = np.zeros((size, size), bool)
    lung_blobs = [_lung_blob(lung_p, z) for lung_p in p.lungs]
    for blob in lung_blobs:
        found = _distance(size, blob)
        if found is not None:
            lung[found[0]] |= found[1] < 0
    lung &= d_body < -(p.fat + p.wall) * half
    gap = 1.0 + 0.5 * scale
    for bb, d in blockers:
        lung[bb] &= d > gap
    # partial volume just outside the lung edge; the labelled lung itself is all lung
    blurred = cv2.GaussianBlur(lung.astype(np.float32), (0, 0), 0.5 + 0.1 * scale)
    lung_alpha = np.maximum(blurred, lung)
    parenchyma = p.lung_hu + 25.0 * _smooth_noise(rng, size, 10)
    vessels = _vessels(p, lung_blobs, z, size) * lung
    parenchyma += vessels * (rng.uniform(-20.0, 40.0) - parenchyma)
    hu += lung_alpha * (parenchyma - hu)

    # lesions, clipped to the lungs; consolidation wins over GGO
    lesion = np.zeros((size, size), np.uint8)
    texture = _smooth_noise(rng, size, 12)
    for les in sorted(p.lesions, key=lambda les: les.kind):
        c = 1.0 - ((z - les.zc) / les.zr) ** 2
        if c <= 0.02:
            continue
        blob = lung_blobs[les.lung]
        lr = math.sqrt(blob.rx * blob.ry) * les.radius * math.sqrt(c)
        r_local = 1.0 + sum(
            a * math.cos(k * les.theta + ph)
            for k, (a, ph) in enumerate(zip(blob.amps, blob.phases, strict=True), start=1)
        )
        rho = les.rho * r_local
        phases = tuple(ph + d * z for ph, d in zip(les.phases, les.drift, strict=True))
        shape = _Blob(
            blob.cx + rho * blob.rx * math.cos(les.theta),
            blob.cy + rho * blob.ry * math.sin(les.theta),
            lr * les.aspect**0.5,
            lr / les.aspect**0.5,
            les.amps,
            phases,
        )
        found = _distance(size, shape, pad=int(les.soft * scale) + 2)
        if found is None:
            continue
        bb, d = found
        inside = lung[bb]
        alpha = _alpha(d, les.soft * scale) * lung_alpha[bb]
        spread = 45.0 if les.kind == 1 else 20.0
        target = les.hu + spread * texture[bb]
        hu[bb] += alpha * np.maximum(target - hu[bb], 0.0)
        lesion[bb][(d < 0) & inside] = les.kind

    hu += rng.normal(0.0, p.noise, hu.shape).astype(np.float32)
    np.clip(hu, _LOWEST_HU, _HIGHEST_HU, out=hu)
    return hu, lesion, lung


def synth_patient(
    patient_seed: int, n_slices: int, size: int = 128, patient: str | None = None
) -> list[SyntheticSlice]:
    """`n_slices` synthetic axial slices [size, size] of one patient, apex to base.

    The same `patient_seed` and arguments give the same slices; the slices are spread evenly
    over the patient's (seeded) z range, so neighbours are similar. `patient` names the patient
    (default `S<seed>`).
    """
    _check_size(size)
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    p = _sample_patient(patient_seed)
    name = f"S{patient_seed}" if patient is None else patient
    out = []
    for i in range(n_slices):
        z = p.z0 + (p.z1 - p.z0) * (i / (n_slices - 1) if n_slices > 1 else 0.5)
        rng = np.random.default_rng(np.random.SeedSequence([_seed_entropy(patient_seed), 2, i]))
        hu, lesion, lung = _render(p, z, size, rng)
        out.append(SyntheticSlice(hu=hu, lesion=lesion, lung=lung, patient=name, index=i))
    return out


def _patient_seed(seed: int, group: int, i: int) -> int:
    """Patient seed for patient `i` of group 0 (labelled) or 1 (unlabelled)."""
    ss = np.random.SeedSequence([_seed_entropy(seed), 7, group, i])
    return int(ss.generate_state(1, np.uint64)[0])


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG")


def write_demo_dataset(
    output: str | os.PathLike,
    *,
    labelled_patients: int = 6,
    unlabelled_patients: int = 4,
    slices_per_patient: int = 8,
    size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write the synthetic demo dataset to the folder `output`, atomically; return its path.

    Layout: `labelled/{images,masks,lungs}/<P..>_<kk>.png` (lung-window 8-bit image, MedSeg
    palette lesion mask 0/1/2, 0/255 lung mask) with `labelled/patients.csv`, and
    `unlabelled/images/<U..>_<kk>.png` with `unlabelled/patients.csv` (a group with no patients
    is not written), plus a `README.md` and `synthetic.json` (the settings). Identical for
    identical arguments. An existing non-empty `output` is refused unless `overwrite`, and
    replaced only when it holds a `synthetic.json`. `progress(n)` is called after every `n`
    slices written.
    """
    _check_size(size)
    if slices_per_patient < 1:
        raise ValueError(f"slices_per_patient must be >= 1, got {slices_per_patient}")
    if labelled_patients < 0 or unlabelled_patients < 0:
        raise ValueError("patient counts must be >= 0")
    if labelled_patients + unlabelled_patients == 0:
        raise ValueError("need at least one patient")
    target = Path(output)
    groups = (("labelled", "P", labelled_patients), ("unlabelled", "U", unlabelled_patients))
    slice_digits = max(2, len(str(slices_per_patient - 1)))
    with atomic_dir(target, overwrite, marker=SYNTHETIC_MARKER) as tmp:
        settings = {
            "seed": seed,
            "size": size,
            "labelled_patients": labelled_patients,
            "unlabelled_patients": unlabelled_patients,
            "slices_per_patient": slices_per_patient,
        }
        (tmp / SYNTHETIC_MARKER).write_text(json.dumps(settings, indent=1) + "\n")
        for group, (folder, prefix, n_patients) in enumerate(groups):
            if n_patients == 0:
                continue
            labelled = group == 0
            subdirs = ("images", "masks", "lungs") if labelled else ("images",)
            for sub in subdirs:
                (tmp / folder / sub).mkdir(parents=True)
            rows = ["file,patient"]
            patient_digits = max(2, len(str(n_patients - 1)))
            for i in range(n_patients):
                name = f"{prefix}{i:0{patient_digits}d}"
                slices = synth_patient(
                    _patient_seed(seed, group, i), slices_per_patient, size, patient=name
                )
                for s in slices:
                    file = f"{name}_{s.index:0{slice_digits}d}.png"
                    image = to_uint8(window_hu(s.hu, LUNG_WINDOW_LEVEL, LUNG_WINDOW_WIDTH))
                    _save_png(Image.fromarray(image), tmp / folder / "images" / file)
                    if labelled:
                        mask = Image.fromarray(s.lesion)
                        mask.putpalette(MEDSEG_PALETTE)
                        _save_png(mask, tmp / folder / "masks" / file)
                        lung = s.lung.astype(np.uint8) * 255
                        _save_png(Image.fromarray(lung), tmp / folder / "lungs" / file)
                    rows.append(f"{file},{name}")
                    if progress is not None:
                        progress(1)
            (tmp / folder / "patients.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(
            "Synthetic chest-CT slices (not patient data) made by stitchnet_tf.data.synthetic.\n"
            f"seed={seed} size={size} labelled_patients={labelled_patients} "
            f"unlabelled_patients={unlabelled_patients} "
            f"slices_per_patient={slices_per_patient}\n",
            encoding="utf-8",
        )
    return target
