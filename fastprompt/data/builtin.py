"""Built-in datasets generated in memory: no files, no downloads (default offline run, tests).

``BUILTINS`` maps a dataset name to a generator ``fn(seed=..., **options) -> DatasetSplits``;
register more there. Images live in ``Datum.image`` (PIL, RGB) and ``Datum.impath`` is ``None``.

``builtin`` ("shapes"): 10 classes of a coloured shape ("red circle", "blue square", ...) drawn at
a random position, size and rotation, with a little colour jitter, on a random mid-tone background
with pixel noise. 32 train / 8 val / 16 test images per class at 64x64 by default. Every image is
drawn from its own NumPy generator seeded with ``(seed, split, class, index)``, so the dataset is
identical on every machine for a given seed, and changing the per-split counts keeps the images
that remain.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .protocol import DatasetSplits, Datum

# (class name, RGB colour, shape)
SHAPE_CLASSES = (
    ("red circle", (220, 30, 30), "circle"),
    ("blue square", (30, 60, 220), "square"),
    ("green triangle", (30, 170, 50), "triangle"),
    ("yellow star", (240, 220, 40), "star"),
    ("purple cross", (140, 40, 180), "cross"),
    ("orange diamond", (245, 140, 20), "diamond"),
    ("black ring", (15, 15, 15), "ring"),
    ("pink hexagon", (245, 120, 190), "hexagon"),
    ("brown heart", (130, 80, 35), "heart"),
    ("white arrow", (250, 250, 250), "arrow"),
)
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _outline(shape: str) -> list[tuple[float, float]]:
    """Unit-radius outline of a polygonal shape, centred on the origin."""
    if shape in ("square", "triangle", "hexagon"):
        k = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        return [(math.cos(2 * math.pi * i / k), math.sin(2 * math.pi * i / k)) for i in range(k)]
    if shape == "star":
        return [((1.0 if i % 2 == 0 else 0.42) * math.cos(math.pi * i / 5 - math.pi / 2),
                 (1.0 if i % 2 == 0 else 0.42) * math.sin(math.pi * i / 5 - math.pi / 2))
                for i in range(10)]
    if shape == "cross":
        a, b = 0.33, 1.0
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                (-b, a), (-b, -a), (-a, -a)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17, -y / 17))
        return pts
    if shape == "arrow":
        return [(-1.0, -0.25), (0.2, -0.25), (0.2, -0.6), (1.0, 0.0), (0.2, 0.6), (0.2, 0.25),
                (-1.0, 0.25)]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(rng: np.random.Generator, colour, shape: str, size: int = 64):
    """One image: noisy mid-tone background, jittered colour, random position/size/rotation."""
    from PIL import Image, ImageDraw

    background = rng.integers(70, 190, size=3)
    pixels = background + rng.normal(0.0, 18.0, size=(size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    fill = tuple(int(c) for c in np.clip(np.asarray(colour) + rng.integers(-25, 26, 3), 0, 255))
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    draw = ImageDraw.Draw(image)
    if shape in ("circle", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
        return image
    angle = rng.uniform(0, 2 * math.pi) if shape not in ("heart",) else rng.uniform(-0.5, 0.5)
    cos, sin = math.cos(angle), math.sin(angle)
    draw.polygon([(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos))
                  for x, y in _outline(shape)], fill=fill)
    return image


@functools.lru_cache(maxsize=4)
def make_shapes(seed: int = 0, n_train: int = 32, n_val: int = 8, n_test: int = 16,
                image_size: int = 64, name: str = "builtin") -> DatasetSplits:
    """The generated shapes dataset (see the module docstring). Cached: same args, same object."""
    classnames = [c for c, _, _ in SHAPE_CLASSES]
    splits: dict[str, list[Datum]] = {}
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        items = []
        for y, (cname, colour, shape) in enumerate(SHAPE_CLASSES):
            for i in range(count):
                rng = np.random.default_rng([seed, _SPLIT_IDS[split], y, i])
                items.append(Datum(None, y, cname, image=draw_shape(rng, colour, shape, image_size)))
        splits[split] = items
    return DatasetSplits(name, classnames, splits["train"], splits["val"], splits["test"])


def _load_shapes(root=None, seed: int = 0, **options) -> DatasetSplits:
    """Registry entry: ``root`` is ignored (nothing is read from disk)."""
    d = make_shapes(seed=seed, **options)
    # a fresh container each call so callers may reassign its lists without touching the cache
    return DatasetSplits(d.name, list(d.classnames), list(d.train), list(d.val), list(d.test))


BUILTINS = {"builtin": _load_shapes}


def _register_generated() -> None:
    """The datasets drawn like the pretraining corpus of the shipped tiny CLIP (generated.py)."""
    from .generated import GENERATED, loader

    BUILTINS.update({name: loader(name) for name in GENERATED})


_register_generated()
