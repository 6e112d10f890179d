"""A synthetic, HAM10000-shaped data set for demos, tests and CI.

`write_demo_dataset` writes a folder that looks like the Kaggle download of
HAM10000 -- ``HAM10000_metadata.csv`` plus ``HAM10000_images_part_1/`` and
``HAM10000_images_part_2/`` full of ``<image_id>.jpg`` -- so every stage of the
pipeline (ingest, split, train, compare, report) runs on it unchanged, in
seconds, without the licensed images.

What is real about it (structure only; no real image or row is copied):

* the seven classes in the real proportions (nv 67 %, mel 11 %, bkl 11 %,
  bcc 5 %, akiec 3 %, vasc 1.4 %, df 1.1 %), with at least
  `MIN_LESIONS_PER_CLASS` lesions per class however small the set;
* several images per lesion (most lesions one image, many two to six), and the
  images of one lesion are views of the *same* lesion: same shape, colours,
  texture and skin, seen with another rotation, scale, offset, lighting,
  vignette and hairs. An image-level split therefore leaks, and measurably
  inflates accuracy, exactly like on the real data; a lesion-level split
  does not;
* the metadata columns, in the real order, with the real vocabularies:
  ``lesion_id`` ``HAM_0xxxxxx``, ``image_id`` ``ISIC_0xxxxxx``, ``dx_type`` in
  histo/follow_up/consensus/confocal (per class as in the release), ``age`` in
  5-year steps written ``"45.0"`` with a few empty and a few ``0.0``, ``sex``
  male/female/unknown with a few empty, ``localization`` from the 15 real sites
  including ``unknown``. The ids use numbers from 0100000 up, which the real
  release (lesions 0000000-0007628, images 0024306-0034320) never uses, so a
  synthetic row can never be mistaken for a real one;
* rows grouped by diagnosis and lesion, as in the released CSV; the lower half
  of the image ids in part 1, the upper half in part 2; 600x450 JPEGs.

What each class looks like is one table, `LESION_KINDS` (class -> shape,
colour, texture, plus the numeric ranges they are drawn from):

=====  ==================================  ==============================  ==========================================
class  shape                               colour                          texture
=====  ==================================  ==============================  ==========================================
akiec  patchy: irregular, ill-defined      pink-red, translucent           scale: white scaly flecks, pale follicles
bcc    lobed: 3-5 rounded lobes            pink, pearly                    vessels: red serpentine lines, blue-grey nests
bkl    blotchy: irregular, sharp "stuck    tan / light brown, opaque       cysts: white milia-like and dark comedo-like
       on" border, often elongated                                         dots on a mottled surface
df     ring: small, round, soft edge       light brown ring, white centre  ring: central white scar, faint network
mel    ragged: asymmetric, star-like       dark brown to black, blue-grey  streaks: radial streaks at the border,
       border                              veil, several colours           irregular dots, blue-white veil
nv     round: oval, symmetric, regular     brown, darker centre            network: pigment network (a quarter of
                                                                           them globular instead)
vasc   small: small, dense, lobulated      red to purple                   lacunae: dark red-purple lacunae, pale septa
=====  ==================================  ==============================  ==========================================

Within a class, size, aspect, border softness, opacity, colour and texture
strength vary per lesion, and a fraction of lesions (`CONFUSION_RATE`) take
their colour from a look-alike class (nv<->mel<->bkl, bcc<->akiec, df<->nv,
vasc<->bcc), so the classes overlap: a small CNN at 125x100 learns them well
above chance but not perfectly, and the metrics (balanced accuracy, per-class
recall, the confusion matrix) say something.

How it is drawn, and why it is fast (~150-200 images/s at 600x450 on one
core, most of it Pillow's C code): each lesion is painted once, in its own
frame, as a `PATCH` x `PATCH` RGBA texture with vectorised numpy (outline from
an angular look-up table, smooth noise and dots drawn by Pillow); each view
then places that patch with one affine `Image.transform` (rotation, scale,
flip, offset) onto skin (the lesion's skin tone, coarse redness mottling and
grain), multiplies in the lighting (per-channel gain, a gradient, vignetting
and, for about a third of the lesions, the black circle of a contact
dermatoscope), all at a "render" resolution of at most `RENDER_HEIGHT` rows
(the models see 100), upsamples to the requested size, draws hairs at full
resolution and saves a quality-90 JPEG. The views of one lesion share a
"session" (orientation, scope, lighting) that they vary around, as repeat
photos of one lesion do. Every lesion and every view has its own random
stream derived from the seed, so a seed gives the same bytes every time (for a
given Pillow/libjpeg).

API: `write_demo_dataset` (the files), `demo_metadata` (the rows it would
write, without images), `render_lesion` (one image), `CLASS_PROPORTIONS`,
`allocate_images` (images per class for a set size). Every demo folder also
holds a small `DEMO_MARKER` JSON file saying it is synthetic and how it was
made.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from skincluster.config import CLASS_NAMES

__all__ = [
    "CLASS_COUNTS",
    "CLASS_PROPORTIONS",
    "CONFUSION_RATE",
    "DEMO_MARKER",
    "DX_TYPE_WEIGHTS",
    "IMAGES_PER_LESION",
    "IMAGE_DIRS",
    "LESION_KINDS",
    "LOCALIZATIONS",
    "METADATA_COLUMNS",
    "METADATA_FILE",
    "MIN_LESIONS_PER_CLASS",
    "DemoSummary",
    "LesionKind",
    "allocate_images",
    "demo_metadata",
    "render_lesion",
    "write_demo_dataset",
]

#: Images per class in the real HAM10000 release (10,015 images).
CLASS_COUNTS: dict[str, int] = {
    "akiec": 327,
    "bcc": 514,
    "bkl": 1099,
    "df": 115,
    "mel": 1113,
    "nv": 6705,
    "vasc": 142,
}
_TOTAL = sum(CLASS_COUNTS.values())
#: Share of images per class, in `CLASS_NAMES` order (sums to 1).
CLASS_PROPORTIONS: dict[str, float] = {c: CLASS_COUNTS[c] / _TOTAL for c in CLASS_NAMES}
#: Every class gets at least this many lesions (so that a lesion-grouped,
#: stratified 67.5/7.5/25 split can put each class in each split).
MIN_LESIONS_PER_CLASS = 6
#: Images per lesion. The release has 74 % single-image lesions and at most 6
#: images per lesion; we use a little more multi-image lesions (mean ~1.6
#: images per lesion) so the lesion grouping matters even on small sets.
IMAGES_PER_LESION: dict[int, float] = {1: 0.62, 2: 0.20, 3: 0.10, 4: 0.04, 5: 0.025, 6: 0.015}

METADATA_FILE = "HAM10000_metadata.csv"
#: Written into every demo folder: marks it as synthetic (and how it was made).
DEMO_MARKER = ".skincluster-demo.json"
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
#: Order of the diagnosis blocks in the released CSV.
_ROW_ORDER = ("bkl", "df", "mel", "vasc", "bcc", "nv", "akiec")
#: First number used for synthetic ids (the real release never goes this high).
_ID_BASE = 100_000

#: How each diagnosis was confirmed, per class (shares as in the release).
DX_TYPE_WEIGHTS: dict[str, dict[str, float]] = {
    "akiec": {"histo": 1.0},
    "bcc": {"histo": 1.0},
    "bkl": {"histo": 0.70, "consensus": 0.24, "confocal": 0.06},
    "df": {"histo": 0.48, "consensus": 0.52},
    "mel": {"histo": 1.0},
    "nv": {"follow_up": 0.55, "histo": 0.37, "consensus": 0.08},
    "vasc": {"histo": 0.47, "consensus": 0.53},
}
#: Body sites (the release's vocabulary) and their overall shares.
LOCALIZATIONS: dict[str, float] = {
    "back": 0.219,
    "lower extremity": 0.207,
    "trunk": 0.140,
    "upper extremity": 0.112,
    "abdomen": 0.102,
    "face": 0.074,
    "chest": 0.041,
    "foot": 0.032,
    "unknown": 0.023,
    "neck": 0.017,
    "scalp": 0.013,
    "hand": 0.009,
    "ear": 0.006,
    "genital": 0.005,
    "acral": 0.001,
}
#: Sites that are much more (or less) common for a class than overall.
_SITE_BIAS: dict[str, dict[str, float]] = {
    "akiec": {"face": 5.0, "upper extremity": 2.0, "hand": 3.0, "scalp": 2.0, "acral": 0.0},
    "bcc": {"face": 3.0, "back": 1.5, "neck": 2.0, "acral": 0.0},
    "bkl": {"face": 3.0, "acral": 0.0},
    "df": {"lower extremity": 3.0, "acral": 0.0},
    "mel": {"back": 1.4, "upper extremity": 1.5, "acral": 0.0},
    "nv": {"face": 0.3},
    "vasc": {"trunk": 1.5, "abdomen": 1.5, "acral": 0.0},
}
#: Mean age per class (the release's, rounded); ages are drawn around it.
_MEAN_AGE = {"akiec": 67, "bcc": 67, "bkl": 64, "df": 53, "mel": 61, "nv": 46, "vasc": 51}


@dataclass(frozen=True)
class LesionKind:
    """How one class is drawn. Colours are RGB 0-255; ranges are (low, high).

    ``radius`` is in fractions of the image height; ``softness`` is the width
    of the border blur in units of the lesion radius; ``irregularity`` the
    amplitude of the 2-D noise that roughens the outline.
    """

    shape: str
    colour: str
    texture: str
    radius: tuple[float, float]
    aspect: tuple[float, float]
    softness: tuple[float, float]
    opacity: tuple[float, float]
    irregularity: float
    light: tuple[int, int, int]
    dark: tuple[int, int, int]
    accent: tuple[int, int, int]
    #: Classes whose colours a `CONFUSION_RATE` share of this class borrows.
    lookalikes: tuple[str, ...] = ()


#: The class -> appearance table (see the module docstring for a summary).
LESION_KINDS: dict[str, LesionKind] = {
    "akiec": LesionKind(
        shape="patchy", colour="pink-red", texture="scale",
        radius=(0.22, 0.45), aspect=(0.6, 1.0), softness=(0.15, 0.35), opacity=(0.45, 0.8),
        irregularity=0.22, light=(218, 132, 120), dark=(178, 84, 80), accent=(240, 232, 222),
        lookalikes=("bcc", "bkl"),
    ),
    "bcc": LesionKind(
        shape="lobed", colour="pink, pearly", texture="vessels",
        radius=(0.2, 0.4), aspect=(0.7, 1.0), softness=(0.05, 0.14), opacity=(0.5, 0.85),
        irregularity=0.06, light=(228, 170, 170), dark=(196, 124, 132), accent=(168, 28, 44),
        lookalikes=("akiec", "vasc"),
    ),
    "bkl": LesionKind(
        shape="blotchy", colour="tan", texture="cysts",
        radius=(0.25, 0.48), aspect=(0.55, 0.95), softness=(0.03, 0.09), opacity=(0.55, 0.9),
        irregularity=0.14, light=(192, 142, 106), dark=(140, 94, 66), accent=(236, 226, 206),
        lookalikes=("nv", "mel"),
    ),
    "df": LesionKind(
        shape="ring", colour="light brown, white centre", texture="ring",
        radius=(0.13, 0.26), aspect=(0.75, 1.0), softness=(0.15, 0.3), opacity=(0.5, 0.8),
        irregularity=0.04, light=(176, 118, 86), dark=(132, 84, 58), accent=(238, 220, 210),
        lookalikes=("nv",),
    ),
    "mel": LesionKind(
        shape="ragged", colour="dark brown to black, blue-grey veil", texture="streaks",
        radius=(0.28, 0.5), aspect=(0.55, 1.0), softness=(0.03, 0.1), opacity=(0.8, 0.97),
        irregularity=0.16, light=(118, 74, 50), dark=(42, 26, 24), accent=(112, 122, 152),
        lookalikes=("nv", "bkl"),
    ),
    "nv": LesionKind(
        shape="round", colour="brown", texture="network",
        radius=(0.18, 0.42), aspect=(0.7, 1.0), softness=(0.05, 0.15), opacity=(0.6, 0.92),
        irregularity=0.04, light=(166, 102, 66), dark=(100, 56, 40), accent=(58, 34, 24),
        lookalikes=("mel", "bkl", "df"),
    ),
    "vasc": LesionKind(
        shape="small", colour="red to purple", texture="lacunae",
        radius=(0.1, 0.22), aspect=(0.7, 1.0), softness=(0.03, 0.08), opacity=(0.8, 0.97),
        irregularity=0.06, light=(196, 54, 80), dark=(124, 26, 72), accent=(92, 14, 50),
        lookalikes=("bcc",),
    ),
}
#: Share of lesions that take their colours from a look-alike class.
CONFUSION_RATE = 0.12
#: Lesions are drawn at most this many rows high, then upsampled.
RENDER_HEIGHT = 200
JPEG_QUALITY = 90

_LUT = 720  # angular resolution of the outline look-up tables
_SKIN_LIGHT = np.array([240, 208, 194], np.float32)
_SKIN_DARK = np.array([172, 118, 92], np.float32)


@dataclass
class DemoSummary:
    """What `write_demo_dataset` wrote."""

    path: Path
    n_images: int
    n_lesions: int
    #: Images per class, in `CLASS_NAMES` order.
    counts: dict[str, int]
    #: Lesions per class, in `CLASS_NAMES` order.
    lesions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: False when `path` already held this very data set and nothing was written.
    written: bool = True

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("nan")


# --------------------------------------------------------------------------- plan


def allocate_images(n_images: int) -> dict[str, int]:
    """Images per class: the real proportions (largest remainder), at least
    `MIN_LESIONS_PER_CLASS` each, summing to `n_images`."""
    minimum = MIN_LESIONS_PER_CLASS
    if n_images < minimum * len(CLASS_NAMES):
        least = minimum * len(CLASS_NAMES)
        raise ValueError(f"n_images must be at least {least} ({minimum} lesions per class), got {n_images}")
    raw = {c: n_images * CLASS_PROPORTIONS[c] for c in CLASS_NAMES}
    counts = {c: max(minimum, int(raw[c])) for c in CLASS_NAMES}
    by_remainder = sorted(CLASS_NAMES, key=lambda c: (raw[c] - int(raw[c]), raw[c]), reverse=True)
    i = 0
    while sum(counts.values()) < n_images:
        counts[by_remainder[i % len(by_remainder)]] += 1
        i += 1
    while sum(counts.values()) > n_images:  # the minimums pushed us over: take from the largest
        largest = max(CLASS_NAMES, key=lambda c: counts[c])
        counts[largest] -= 1
    return counts


def _lesion_sizes(n: int, rng: np.random.Generator) -> list[int]:
    """Split `n` images of one class into lesions (at least the minimum number)."""
    ks = np.array(list(IMAGES_PER_LESION), dtype=int)
    ps = np.array(list(IMAGES_PER_LESION.values()), dtype=float)
    ps /= ps.sum()
    sizes: list[int] = []
    remaining = n
    while remaining > 0:
        still_needed = max(0, MIN_LESIONS_PER_CLASS - len(sizes) - 1)
        k = int(rng.choice(ks, p=ps))
        k = max(1, min(k, remaining - still_needed))
        sizes.append(k)
        remaining -= k
    return sizes


def _weighted(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


@dataclass
class _PlannedLesion:
    dx: str
    number: int  # index of the lesion in the whole set (seeds its drawing)
    n_images: int
    lesion_id: str = ""
    dx_type: str = ""
    age: str = ""
    sex: str = ""
    localization: str = ""
    image_ids: list[str] = field(default_factory=list)


def _plan(n_images: int, seed: int) -> list[_PlannedLesion]:
    rng = np.random.default_rng([seed, 0x5EED])
    counts = allocate_images(n_images)
    lesions: list[_PlannedLesion] = []
    for dx in _ROW_ORDER:
        for k in _lesion_sizes(counts[dx], rng):
            lesions.append(_PlannedLesion(dx=dx, number=len(lesions), n_images=k))
    n_lesions = len(lesions)

    lesion_numbers = rng.permutation(n_lesions) + _ID_BASE
    image_numbers = rng.permutation(n_images) + _ID_BASE
    pos = 0
    for lesion, number in zip(lesions, lesion_numbers):
        lesion.lesion_id = f"HAM_{number:07d}"
        lesion.image_ids = [f"ISIC_{n:07d}" for n in image_numbers[pos : pos + lesion.n_images]]
        pos += lesion.n_images
        lesion.dx_type = _weighted(rng, DX_TYPE_WEIGHTS[lesion.dx])
        age = float(np.clip(round(rng.normal(_MEAN_AGE[lesion.dx], 15) / 5) * 5, 5, 85))
        lesion.age = f"{age:.1f}"
        lesion.sex = _weighted(rng, {"male": 0.54, "female": 0.455, "unknown": 0.005})
        bias = _SITE_BIAS[lesion.dx]
        lesion.localization = _weighted(rng, {s: w * bias.get(s, 1.0) for s, w in LOCALIZATIONS.items()})

    # A few missing and zero ages and missing sexes, like the release (at least
    # one of each once the set is big enough for cleaning code to meet them).
    n_odd = max(1, round(0.008 * n_lesions)) if n_lesions >= 20 else 0
    if n_odd:
        picks = rng.choice(n_lesions, size=3 * n_odd, replace=False)
        for i in picks[:n_odd]:
            lesions[i].age = ""
        for i in picks[n_odd : 2 * n_odd]:
            lesions[i].age = "0.0"
        for i in picks[2 * n_odd :]:
            lesions[i].sex = ""
    return lesions


# --------------------------------------------------------------------------- drawing

#: Side of the square, per-lesion texture ("patch") in pixels, and how many
#: lesion radii it spans from its centre to its edge.
PATCH = 128
_EXTENT = 1.5


def _patch_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lesion-frame coordinates of the patch pixels (u, v, radius, angle index)."""
    global _PATCH_GRID
    if _PATCH_GRID is None:
        t = ((np.arange(PATCH, dtype=np.float32) + 0.5) / PATCH * 2 - 1) * _EXTENT
        u, v = np.meshgrid(t, t)
        rho = np.sqrt(u * u + v * v)
        idx = (np.arctan2(v, u) * (_LUT / (2 * np.pi))).astype(np.intp) % _LUT
        _PATCH_GRID = (u, v, rho, idx)
    return _PATCH_GRID


_PATCH_GRID: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


def _grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in units of the image height, origin at the centre."""
    key = (width, height)
    grid = _GRIDS.get(key)
    if grid is None:
        y = ((np.arange(height, dtype=np.float32) + 0.5) / height - 0.5)[:, None]
        x = ((np.arange(width, dtype=np.float32) + 0.5 - width / 2) / height)[None, :]
        grid = _GRIDS[key] = (x, y)
    return grid


_GRIDS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _noise(rng: np.random.Generator, per_radius: float) -> np.ndarray:
    """Smooth noise over the patch, in [0, 1], with `per_radius` cells per lesion radius."""
    cells = max(2, round(per_radius * 2 * _EXTENT)) + 1
    small = Image.fromarray(rng.random((cells, cells), dtype=np.float32), "F")
    return np.clip(np.asarray(small.resize((PATCH, PATCH), Image.BICUBIC)), 0.0, 1.0)


def _dots(rng: np.random.Generator, per_radius: float, density: float, size: float) -> np.ndarray:
    """Round dots on a jittered grid (`per_radius` per lesion radius), a
    `density` share of the grid cells filled; `size` is the dot radius in cells."""
    spacing = PATCH / (2 * _EXTENT * per_radius)  # in pixels
    n = int(PATCH / spacing) + 2
    gy, gx = np.mgrid[0:n, 0:n].astype(np.float32)
    keep = rng.random((n, n)) < density
    jitter = rng.uniform(-0.25, 0.25, (2, n, n))
    radius = size * spacing * rng.uniform(0.6, 1.4, (n, n))
    xs = ((gx + 0.5 + jitter[0]) * spacing)[keep]
    ys = ((gy + 0.5 + jitter[1]) * spacing)[keep]
    rs = radius[keep]
    canvas = Image.new("L", (PATCH, PATCH), 0)
    draw = ImageDraw.Draw(canvas)
    for x, y, r in zip(xs.tolist(), ys.tolist(), rs.tolist()):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    canvas = canvas.filter(ImageFilter.BoxBlur(0.6))
    return np.asarray(canvas, np.float32) * (1.0 / 255)


def _lines(x: np.ndarray, width: float) -> np.ndarray:
    """1 on the lines x = integer, fading to 0 at `width` (in periods) away."""
    g = np.abs(np.sin(np.pi * x))
    return np.clip(1.0 - g / width, 0.0, 1.0)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


class _Layer:
    """A premultiplied colour + alpha layer that texture overlays are stacked on."""

    def __init__(self, colour: np.ndarray, alpha: np.ndarray):
        self.alpha = alpha
        self.pre = colour * alpha[..., None]

    def over(self, colour, t: np.ndarray) -> None:
        """Paint `colour` with coverage `t` (0..1) on top of the layer."""
        t = t.astype(np.float32, copy=False)
        self.pre += t[..., None] * (np.asarray(colour, np.float32) - self.pre)
        self.alpha += t * (1.0 - self.alpha)

    def rgba(self, clear: np.ndarray) -> np.ndarray:
        """Straight (not premultiplied) RGBA; fully clear pixels get colour
        `clear`, so bilinear resampling does not draw a dark fringe."""
        a = self.alpha[..., None]
        out = np.empty(self.alpha.shape + (4,), np.uint8)
        out[..., :3] = np.clip(np.where(a > 2e-3, self.pre / np.maximum(a, 2e-3), clear), 0, 255)
        out[..., 3] = np.clip(self.alpha * 255, 0, 255)
        return out


@dataclass
class _Lesion:
    """Everything that stays the same across the views of one lesion."""

    dx: str
    radius: float  # in image heights
    aspect: float
    skin: np.ndarray  # RGB of the surrounding skin
    patch: Image.Image  # RGBA texture of the lesion in its own frame
    hairy: float  # mean number of hairs per view
    #: The "session": how this lesion was photographed (orientation, scope,
    #: lighting). Its views vary around it, as repeat photos of one lesion do.
    session: dict
    seed: tuple[int, ...]


def _outline(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Radius (relative) as a function of the angle, `_LUT` samples."""
    phi = np.linspace(0, 2 * np.pi, _LUT, endpoint=False, dtype=np.float32)

    def harmonics(ks, amp, falloff=1.0):
        out = np.zeros(_LUT, np.float32)
        for k in ks:
            out += rng.uniform(0, amp) / (k / 2) ** falloff * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        return out

    outline = np.ones(_LUT, np.float32)
    if shape in ("round", "ring"):
        outline += harmonics(range(2, 5), 0.05)
    elif shape == "small":
        outline += harmonics(range(2, 5), 0.06) + harmonics(range(5, 10), 0.05, 0.5)
    elif shape == "blotchy":
        outline += harmonics(range(2, 9), 0.2)
    elif shape == "patchy":
        outline += harmonics(range(2, 7), 0.2)
    elif shape == "ragged":
        outline += harmonics(range(2, 6), 0.2) + harmonics(range(6, 25), 0.07, 0.4)
    elif shape == "lobed":
        lobes = int(rng.integers(3, 6))
        outline = 0.68 + 0.34 * np.abs(np.cos(lobes * phi / 2 + rng.uniform(0, np.pi))) ** 0.6
        outline += harmonics(range(2, 4), 0.06)
    else:  # pragma: no cover - the table only uses the shapes above
        raise ValueError(f"unknown shape {shape!r}")
    outline = np.maximum(outline, 0.35)
    return (outline / outline.max()).astype(np.float32)


def _paint(
    kind: LesionKind, light: np.ndarray, dark: np.ndarray, accent: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The lesion in its own frame (unit radius), as an RGBA uint8 patch."""
    u, v, rho, idx = _patch_grid()
    softness = float(rng.uniform(*kind.softness))
    opacity = float(rng.uniform(*kind.opacity))
    strength = float(rng.uniform(0.3, 1.0))  # how visible the texture is
    cell = float(rng.uniform(0.8, 1.25))  # texture scale

    outline = _outline(kind.shape, rng)
    d = rho / outline[idx]
    if kind.irregularity:
        d = d + kind.irregularity * (2 * _noise(rng, 2.2) - 1)
    mask = _smoothstep((1.0 - d) / softness + 0.5)
    inside = _smoothstep((0.95 - d) / 0.2 + 0.5)
    centre = np.clip(1.0 - d, 0.0, 1.0)

    mottle = _noise(rng, 1.8)
    tex = kind.texture
    if tex == "ring":  # df: pigment in a ring around a pale centre
        tone = np.clip(0.85 * np.exp(-(((d - 0.72) / 0.3) ** 2)) + 0.3 * (mottle - 0.5), 0, 1)
    elif tex == "streaks":  # mel: several colours in blotches
        tone = np.clip(0.2 + 1.4 * (mottle - 0.5) + 0.6 * centre, 0, 1)
    else:
        tone = np.clip(0.3 + 0.8 * (mottle - 0.5) + 0.4 * centre, 0, 1)
    colour = light + tone[..., None] * (dark - light)
    layer = _Layer(colour, mask * opacity)

    if tex == "network":
        if rng.random() < 0.25:  # globular naevus
            layer.over(accent, _dots(rng, 4.5 * cell, 0.7, 0.33) * inside * (0.4 + 0.5 * strength))
        else:
            warp = 1.3 * _noise(rng, 2.0)
            net = np.maximum(_lines(u * 5.5 * cell + warp, 0.28), _lines(v * 5.5 * cell - warp, 0.28))
            layer.over(accent, net * inside * np.clip(1.2 - d, 0, 1) * (0.3 + 0.5 * strength))
    elif tex == "streaks":
        black = np.clip((_noise(rng, 2.0) - 0.5) * 3, 0, 1)
        layer.over((32, 22, 24), black * inside * 0.75)
        veil = np.clip((_noise(rng, 1.4) - 0.5) * 4, 0, 1)
        layer.over(accent, veil * inside * (0.35 + 0.45 * strength))
        dots = _dots(rng, 7 * cell, 0.35, 0.3) * np.clip(1.15 - d, 0, 1)
        streaks = _streaks(rng)[idx] * np.clip((1.3 - d) * 3, 0, 1) * np.clip((d - 0.55) * 3, 0, 1)
        layer.over((36, 22, 20), np.maximum(dots * strength, streaks * (0.5 + 0.5 * strength)))
    elif tex == "cysts":
        fissures = _lines(u * 3.2 * cell + 1.6 * _noise(rng, 2.0), 0.14)
        layer.over(dark * 0.75, fissures * inside * 0.45 * strength)
        layer.over(accent, _dots(rng, 5 * cell, 0.25, 0.22) * inside * (0.5 + 0.5 * strength))
        layer.over((62, 42, 30), _dots(rng, 5 * cell, 0.18, 0.2) * inside * (0.4 + 0.5 * strength))
    elif tex == "ring":
        scar = np.exp(-((d / 0.42) ** 2)) * (0.55 + 0.35 * strength)
        layer.over(accent, scar * mask)
        net = np.maximum(_lines(u * 6 * cell, 0.25), _lines(v * 6 * cell, 0.25)) * np.clip((d - 0.45) * 3, 0, 1)
        layer.over(dark * 0.8, net * mask * 0.3 * strength)
    elif tex == "vessels":
        layer.over((250, 232, 232), np.exp(-((d / 0.55) ** 2)) * 0.25)  # pearly sheen
        layer.over((84, 90, 118), _dots(rng, 2.5 * cell, 0.3, 0.3) * inside * 0.8 * strength)
        vessels = np.zeros_like(d)
        for i in range(2):
            ang = i * 1.7 + cell
            a = u * math.cos(ang) + v * math.sin(ang)
            wav = _lines(a * 2.4 * cell + 1.8 * _noise(rng, 2.2), 0.09)
            gate = _smoothstep((_noise(rng, 1.5) - 0.3) * 4)
            vessels = np.maximum(vessels, wav * gate)
        layer.over(accent, vessels * inside * (0.55 + 0.45 * strength))
    elif tex == "scale":
        flecks = _dots(rng, 7 * cell, 0.45, 0.35)
        crust = np.clip((_noise(rng, 2.2) - 0.45) * 2.5, 0, 1)
        layer.over(accent, np.clip(flecks + 0.6 * crust, 0, 1) * inside * (0.35 + 0.5 * strength))
        layer.over((236, 214, 206), _dots(rng, 4 * cell, 0.5, 0.18) * inside * 0.6)
    elif tex == "lacunae":
        layer.over(accent, _dots(rng, 3.2 * cell, 0.85, 0.42) * inside * (0.55 + 0.4 * strength))
        layer.over((200, 150, 160), np.exp(-((d / 0.3) ** 2)) * 0.25 * strength)
    else:  # pragma: no cover
        raise ValueError(f"unknown texture {tex!r}")
    return layer.rgba(clear=light)


def _streaks(rng: np.random.Generator) -> np.ndarray:
    """Radial streak strength per angle (melanoma), `_LUT` samples."""
    phi = np.linspace(0, 2 * np.pi, _LUT, endpoint=False, dtype=np.float32)
    streaks = np.zeros(_LUT, np.float32)
    for _ in range(int(rng.integers(6, 22))):
        dist = np.angle(np.exp(1j * (phi - rng.uniform(0, 2 * np.pi)))).astype(np.float32)
        streaks = np.maximum(streaks, rng.uniform(0.5, 1.0) * np.exp(-((dist / rng.uniform(0.03, 0.08)) ** 2)))
    if rng.random() < 0.3:  # streaks on one side only: asymmetric
        streaks *= np.clip(np.cos(phi - rng.uniform(0, 2 * np.pi)) + 0.3, 0, 1)
    return streaks


def _make_lesion(dx: str, seed: tuple[int, ...]) -> _Lesion:
    rng = np.random.default_rng(list(seed))
    kind = LESION_KINDS[dx]

    colour_kind = kind
    if kind.lookalikes and rng.random() < CONFUSION_RATE:
        colour_kind = LESION_KINDS[kind.lookalikes[int(rng.integers(len(kind.lookalikes)))]]
    jitter = rng.normal(0, 9, 3).astype(np.float32)
    light = np.array(colour_kind.light, np.float32) + jitter
    dark = np.array(colour_kind.dark, np.float32) + jitter * 0.6
    t = rng.uniform(0.0, 0.6)
    light = light * (1 - t) + dark * t  # some lesions are darker overall
    accent = np.array(kind.accent, np.float32) + rng.normal(0, 6, 3).astype(np.float32)

    skin_t = rng.beta(2.0, 3.5)
    skin = _SKIN_LIGHT * (1 - skin_t) + _SKIN_DARK * skin_t
    redness = np.array([5, -5, -3], np.float32) * rng.normal(0, 1)
    skin = skin + redness + rng.normal(0, 6) + rng.normal(0, 2.5, 3).astype(np.float32)

    patch = Image.fromarray(_paint(kind, light, dark, accent, rng), "RGBA")
    return _Lesion(
        dx=dx,
        radius=float(rng.uniform(*kind.radius)),
        aspect=float(rng.uniform(*kind.aspect)),
        skin=skin,
        patch=patch,
        hairy=0.0 if rng.random() < 0.6 else float(rng.uniform(2, 20)),
        session={
            "angle": float(rng.uniform(0, 2 * np.pi)),
            "flip": 1.0 if rng.random() < 0.5 else -1.0,
            "gradient": float(rng.uniform(0, 0.14)),
            "gradient_angle": float(rng.uniform(0, 2 * np.pi)),
            "reach": float(rng.uniform(0.75, 1.1)),
            "scope": bool(rng.random() < 0.35),  # the hard black circle of a contact dermatoscope
            "gain": rng.uniform(0.9, 1.0) * np.clip(rng.normal(0.97, 0.025, 3), 0.85, 1.0),
        },
        seed=seed,
    )


def _grain(width: int, height: int) -> Image.Image:
    """A fixed sheet of sensor grain, values 0..2*_GRAIN, 32 pixels larger than
    the image each way (a view uses a crop of it at a random offset)."""
    key = (width, height)
    if key not in _GRAIN_SHEETS:
        rng = np.random.default_rng(0x6EA1)
        lum = rng.normal(0, _GRAIN / 2, (height + 32, width + 32, 1))
        chroma = rng.normal(0, _GRAIN / 5, (height + 32, width + 32, 3))
        sheet = np.clip(_GRAIN + lum + chroma, 0, 2 * _GRAIN).astype(np.uint8)
        _GRAIN_SHEETS.clear()
        _GRAIN_SHEETS[key] = Image.fromarray(sheet, "RGB")
    return _GRAIN_SHEETS[key]


_GRAIN = 7
_GRAIN_SHEETS: dict[tuple[int, int], Image.Image] = {}


def _render(les: _Lesion, view_index: int, width: int, height: int) -> Image.Image:
    """View `view_index` of lesion `les` as a width x height RGB image."""
    rng = np.random.default_rng([*les.seed, view_index])
    rh = min(height, RENDER_HEIGHT)
    rw = max(1, round(width * rh / height))

    # Skin: the lesion's skin tone with coarse (redness) and fine mottling.
    coarse = rng.normal(0, 1, (4, 5, 1)).astype(np.float32) * np.array([2, 7, 5], np.float32)
    skin = np.clip(les.skin - coarse, 0, 255).astype(np.uint8)
    skin = np.asarray(Image.fromarray(skin, "RGB").resize((24, 18), Image.BICUBIC), np.float32)
    skin = skin + rng.normal(0, 2.5, (18, 24, 1)).astype(np.float32)
    img = Image.fromarray(np.clip(skin, 0, 255).astype(np.uint8), "RGB").resize((rw, rh), Image.BICUBIC)

    # The lesion: its patch rotated, scaled, flipped and shifted into place.
    session = les.session
    if rng.random() < 0.25:  # now and then a view from another side
        angle = rng.uniform(0, 2 * np.pi)
    else:
        angle = session["angle"] + rng.normal(0, 0.4)
    c, s = math.cos(angle), math.sin(angle)
    flip = session["flip"] * (1.0 if rng.random() < 0.85 else -1.0)
    r0 = les.radius * rng.uniform(0.85, 1.15)
    cx = float(np.clip(rng.normal(0, 0.06), -0.16, 0.16)) + rw / (2 * rh)
    cy = float(np.clip(rng.normal(0, 0.045), -0.11, 0.11)) + 0.5
    k = PATCH / (2 * _EXTENT)
    ku, kv = k / (r0 * les.aspect), k * flip / r0
    affine = (
        ku * c / rh, ku * s / rh, PATCH / 2 - ku * (c * cx + s * cy),
        -kv * s / rh, kv * c / rh, PATCH / 2 - kv * (-s * cx + c * cy),
    )
    # Only transform the lesion's bounding box (the rest of the patch is clear).
    half_w = _EXTENT * r0 * (les.aspect * abs(c) + abs(s)) * rh
    half_h = _EXTENT * r0 * (les.aspect * abs(s) + abs(c)) * rh
    x0, x1 = max(0, int(cx * rh - half_w)), min(rw, int(cx * rh + half_w) + 2)
    y0, y1 = max(0, int(cy * rh - half_h)), min(rh, int(cy * rh + half_h) + 2)
    if x1 > x0 and y1 > y0:
        a, b, c0, d, e, f0 = affine
        box = (a, b, c0 + a * x0 + b * y0, d, e, f0 + d * x0 + e * y0)
        layer = les.patch.transform((x1 - x0, y1 - y0), Image.AFFINE, box, resample=Image.BILINEAR)
        img.paste(layer, (x0, y0), layer)

    # Lighting: per-channel gain, a gradient and the dermatoscope's vignette,
    # computed coarsely and multiplied in.
    lw, lh = max(2, rw // 4), max(2, rh // 4)
    x, y = _grid(lw, lh)
    r = np.sqrt(x * x + y * y) / math.hypot(lw / lh / 2, 0.5)
    g_angle = session["gradient_angle"] + rng.normal(0, 0.5)
    gradient = session["gradient"] * rng.uniform(0.6, 1.4)
    field = 1.0 - gradient * (0.5 + x * math.cos(g_angle) + y * math.sin(g_angle))
    reach = session["reach"] + rng.normal(0, 0.04)
    field = field * (1.0 - 0.3 * (r / reach) ** 2)
    if session["scope"] != (rng.random() < 0.1):  # the scope's circle, now and then not
        field = field * _smoothstep((reach - r) / 0.03)
    gain = np.clip(session["gain"] * rng.normal(1.0, 0.015, 3), 0.8, 1.0)
    light = np.clip(field[..., None] * (255 * gain), 0, 255).astype(np.uint8)
    img = ImageChops.multiply(img, Image.fromarray(light, "RGB").resize((rw, rh), Image.BILINEAR))

    ox, oy = rng.integers(0, 32, 2)
    grain = _grain(rw, rh).crop((int(ox), int(oy), int(ox) + rw, int(oy) + rh))
    img = ImageChops.add(img, grain, scale=1.0, offset=-_GRAIN)
    if (rw, rh) != (width, height):
        img = img.resize((width, height), Image.BILINEAR)

    n_hairs = int(rng.poisson(les.hairy)) if les.hairy else 0
    if n_hairs:
        draw = ImageDraw.Draw(img)
        thick = max(1, round(width / 450))
        ts = np.linspace(0, 1, 8)
        for _ in range(n_hairs):
            px, py = rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height
            ang = rng.uniform(0, 2 * np.pi)
            bend = rng.normal(0, 0.6)
            length = rng.uniform(0.15, 0.6) * width
            pts = [
                (float(px + t * length * math.cos(ang + bend * t)), float(py + t * length * math.sin(ang + bend * t)))
                for t in ts
            ]
            shade = int(rng.uniform(25, 90))
            colour = (shade, int(shade * 0.8), int(shade * 0.7))
            draw.line(pts, fill=colour, width=int(thick * rng.integers(1, 3)), joint="curve")
    return img


def render_lesion(
    dx: str, seed: int = 0, lesion: int = 0, view: int = 0, image_size: tuple[int, int] = (600, 450)
) -> Image.Image:
    """One synthetic image of class `dx`: view `view` of lesion `lesion` (seeded).

    The same (dx, seed, lesion) is the same lesion whatever the view, which is
    how `write_demo_dataset` draws the images of one lesion.
    """
    if dx not in LESION_KINDS:
        raise ValueError(f"unknown class {dx!r}; known: {', '.join(CLASS_NAMES)}")
    les = _make_lesion(dx, (seed, lesion, CLASS_NAMES.index(dx)))
    return _render(les, view, *image_size)


# --------------------------------------------------------------------------- writing


def _rows(lesions: list[_PlannedLesion]) -> list[dict[str, str]]:
    return [
        dict(zip(METADATA_COLUMNS, (les.lesion_id, image_id, les.dx, les.dx_type, les.age, les.sex, les.localization)))
        for les in lesions
        for image_id in les.image_ids
    ]


def demo_metadata(n_images: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """The metadata rows `write_demo_dataset(dest, n_images, seed=seed)` writes,
    in file order, without drawing any image (values are strings, as in the CSV;
    a missing value is "")."""
    return _rows(_plan(int(n_images), int(seed)))


def write_demo_dataset(
    dest: str | Path,
    n_images: int = 2000,
    image_size: tuple[int, int] = (600, 450),
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> DemoSummary:
    """Write a synthetic HAM10000-shaped data set (Kaggle layout) under `dest`.

    `image_size` is (width, height); `n_images` at least 42 (6 lesions for each
    of the 7 classes). The same arguments give the same files, byte for byte.

    A folder that already holds the data set these arguments make (its marker
    says so and its CSV is there) is left as it is, so a command that made it
    can be run again. Otherwise refuses (FileExistsError) to write where a
    ``HAM10000_metadata.csv`` already exists, or where the image folders hold ``ISIC_*.jpg`` files that
    an interrupted earlier run of this function did not leave (they might be
    real data), unless ``overwrite=True``; then those images and the CSV are
    deleted first. The CSV is written last (temp file, then rename), so a
    folder with a metadata file is always complete. A small
    `DEMO_MARKER` JSON file records that the folder is synthetic and how it was
    made. `progress(done, total)` is called after each image.
    """
    start = time.perf_counter()
    width, height = (int(v) for v in image_size)
    if width < 16 or height < 16:
        raise ValueError(f"image_size must be at least 16x16, got {image_size}")
    n_images = int(n_images)
    lesions = _plan(n_images, int(seed))  # validates n_images before anything is touched

    dest = Path(dest)
    meta = dest / METADATA_FILE
    marker = dest / DEMO_MARKER
    dirs = [dest / name for name in IMAGE_DIRS]
    made_by = {
        "generator": "skincluster.data.synthetic.write_demo_dataset",
        "n_images": n_images,
        "image_size": [width, height],
        "seed": int(seed),
    }
    if meta.exists() and not overwrite and _read_marker(marker) == made_by:
        return _summary(dest, lesions, start, written=False)
    if meta.exists() and not overwrite:
        raise FileExistsError(f"{meta} already exists; use --overwrite (overwrite=True) to replace the data set in {dest}")
    stale = [f for d in dirs if d.is_dir() for f in d.glob("ISIC_*.jpg")]
    if stale and not overwrite and not marker.exists():
        raise FileExistsError(
            f"{dest} already holds {len(stale)} ISIC_*.jpg images that are not from an interrupted demo run; "
            "use --overwrite (overwrite=True) to delete them"
        )
    if meta.exists():
        meta.unlink()  # from here on the folder no longer looks complete
    for f in stale:
        f.unlink()
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(made_by, indent=1) + "\n", encoding="utf-8")
    part_2_from = _ID_BASE + n_images // 2  # lower half of the ids in part 1, like the release

    done = 0
    for les in lesions:
        drawn = _make_lesion(les.dx, (int(seed), les.number, CLASS_NAMES.index(les.dx)))
        for view, image_id in enumerate(les.image_ids):
            folder = dirs[int(image_id[5:]) >= part_2_from]
            _render(drawn, view, width, height).save(folder / f"{image_id}.jpg", quality=JPEG_QUALITY)
            done += 1
            if progress is not None:
                progress(done, n_images)

    tmp = dest / f".{METADATA_FILE}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=METADATA_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(_rows(lesions))
    os.replace(tmp, meta)
    return _summary(dest, lesions, start, written=True)


def _read_marker(marker: Path) -> Any:
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _summary(dest: Path, lesions: list, start: float, *, written: bool) -> DemoSummary:
    counts = {c: 0 for c in CLASS_NAMES}
    n_les = {c: 0 for c in CLASS_NAMES}
    for les in lesions:
        counts[les.dx] += les.n_images
        n_les[les.dx] += 1
    return DemoSummary(
        path=dest,
        n_images=sum(counts.values()),
        n_lesions=len(lesions),
        counts=counts,
        lesions=n_les,
        seconds=time.perf_counter() - start,
        written=written,
    )
