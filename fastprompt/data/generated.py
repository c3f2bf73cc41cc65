"""Downstream datasets drawn like the pretraining corpus (`shapes.render`, as in `pretrain.corpus`).

Like the real benchmarks, each is a *domain* the pretrained `tiny` CLIP was not trained on: the
scenes are rendered as in pretraining and then seen through a fixed imaging condition, so
zero-shot CLIP works but is far from perfect, and a few labelled images can adapt it. Class names
compose attributes the model has read in its captions; base = the first half of the classes
(CoOp's protocol), novel = the rest.

- ``shapes_colour`` (default of ``python -m fastprompt.train``): 24 colour–shape pairs ("orange
  diamond", "green hexagon", ...), objects of either texture and size, in *dim light*; two pairs
  (``held_out_classes()``) never occur in pretraining. Chance 8.3 % per half.
- ``shapes_texture``: "striped red circle" vs "plain red circle" for twelve colour–shape pairs
  (24 classes), in *fog*. Chance 8.3 % per half.
- ``shapes_count``: "one blue circle", "two blue circles", "three blue circles" for eight objects
  (24 classes), in *fog*; orange hexagons (novel half) never occur in pretraining. Chance 8.3 %
  per half.

Domains (applied to the rendered RGB values ``v``, then clipped to 0..255):
*dim light* ``0.65 v + N(0, 12)`` (a darker, noisier sensor); *fog* ``0.45 v + 0.55 * 190 +
N(0, 6)`` (contrast squeezed towards a light grey).

32 train / 8 val / 16 test images per class at 32x32 by default, each from its own NumPy
generator seeded with ``(seed, dataset, split, class, index)``: identical on every machine.
"""
from __future__ import annotations

import functools

import numpy as np

from ..config import DEFAULT_DATASET  # noqa: F401 - importable from here, defined once
from .protocol import DatasetSplits, Datum
from .shapes import HELD_OUT, SIZES, TEXTURES, describe, render

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

_COLOUR_CLASSES = (
    ("orange", "diamond"), ("green", "hexagon"), ("brown", "diamond"), ("green", "square"),
    ("red", "triangle"), ("blue", "arrow"), ("purple", "arrow"), ("purple", "heart"),
    ("purple", "square"), ("purple", "diamond"), ("yellow", "star"), ("pink", "hexagon"),
    ("pink", "square"), ("red", "diamond"), ("orange", "triangle"), ("brown", "heart"),
    ("pink", "circle"), ("orange", "heart"), ("brown", "hexagon"), ("black", "cross"),
    ("white", "ring"), ("black", "triangle"), ("black", "heart"), ("green", "heart"))
_TEXTURE_PAIRS = (("red", "circle"), ("blue", "star"), ("yellow", "heart"), ("green", "square"),
                  ("purple", "triangle"), ("orange", "cross"), ("pink", "diamond"), ("brown", "circle"),
                  ("white", "star"), ("blue", "hexagon"), ("black", "square"), ("orange", "heart"))
_COUNT_OBJECTS = (("blue", "circle"), ("red", "square"), ("yellow", "star"), ("green", "triangle"),
                  ("purple", "heart"), ("orange", "hexagon"), ("white", "cross"),
                  ("pink", "diamond"))


def _dim_light(rng: np.random.Generator, v: np.ndarray) -> np.ndarray:
    return 0.65 * v + rng.normal(0.0, 12.0, v.shape)


def _fog(rng: np.random.Generator, v: np.ndarray) -> np.ndarray:
    return 0.45 * v + 0.55 * 190.0 + rng.normal(0.0, 6.0, v.shape)


#: dataset -> (class attributes builder, domain)
_DATASETS = {
    "shapes_colour": (lambda: [{"colour": c, "shape": s, "count": 1, "texture": None}
                               for c, s in _COLOUR_CLASSES], _dim_light),
    "shapes_texture": (lambda: [{"colour": c, "shape": s, "count": 1, "texture": t}
                                for c, s in _TEXTURE_PAIRS for t in ("striped", "plain")], _fog),
    "shapes_count": (lambda: [{"colour": c, "shape": s, "count": n, "texture": None}
                              for c, s in _COUNT_OBJECTS for n in (1, 2, 3)], _fog),
}
GENERATED = tuple(_DATASETS)


def _classname(name: str, a: dict) -> str:
    return describe(a["colour"], a["shape"], a["count"], a["texture"] if name == "shapes_texture"
                    else None, count_word=name == "shapes_count")


def held_out_classes() -> list[str]:
    """Classes of ``shapes_colour`` whose colour–shape pair never occurs in pretraining."""
    return [f"{c} {s}" for c, s in _COLOUR_CLASSES if (c, s) in HELD_OUT]


def _image(rng: np.random.Generator, a: dict, domain, image_size: int):
    from PIL import Image

    texture = a["texture"] or TEXTURES[int(rng.integers(2))]
    size = list(SIZES)[int(rng.integers(2))]
    scene = render(rng, a["colour"], a["shape"], a["count"], texture, size, image_size)
    seen = domain(rng, np.asarray(scene, dtype=np.float64))
    return Image.fromarray(np.clip(seen, 0, 255).astype(np.uint8), "RGB")


def draw_splits(name: str, classnames: list[str], counts: tuple[int, int, int], seed_prefix,
                draw) -> DatasetSplits:
    """A generated dataset: `counts` train / val / test images per class, image i of class y in
    a split drawn by `draw(rng, y)` from its own generator seeded with
    ``(*seed_prefix, split id, y, i)`` (so other counts keep the images that remain)."""
    splits: dict[str, list[Datum]] = {}
    for split, count in zip(("train", "val", "test"), counts):
        items = []
        for y, cname in enumerate(classnames):
            for i in range(count):
                rng = np.random.default_rng([*seed_prefix, _SPLIT_IDS[split], y, i])
                items.append(Datum(None, y, cname, image=draw(rng, y)))
        splits[split] = items
    return DatasetSplits(name, classnames, splits["train"], splits["val"], splits["test"])


def fresh(d: DatasetSplits) -> DatasetSplits:
    """A new container over a cached dataset's items, so callers may reassign its lists."""
    return DatasetSplits(d.name, list(d.classnames), list(d.train), list(d.val), list(d.test))


@functools.lru_cache(maxsize=8)
def make_generated(name: str, seed: int = 0, n_train: int = 32, n_val: int = 8, n_test: int = 16,
                   image_size: int = 32) -> DatasetSplits:
    if name not in _DATASETS:
        raise KeyError(f"unknown generated dataset {name!r}; known: {', '.join(GENERATED)}")
    build, domain = _DATASETS[name]
    classes = build()
    classnames = [_classname(name, a) for a in classes]
    ds_id = 104729 + GENERATED.index(name)
    return draw_splits(name, classnames, (n_train, n_val, n_test), (seed, ds_id),
                       lambda rng, y: _image(rng, classes[y], domain, image_size))


def loader(name: str):
    """Registry entry for dataset `name` (``root`` is ignored: nothing is read from disk)."""
    def load(root=None, seed: int = 0, **options) -> DatasetSplits:
        return fresh(make_generated(name, seed=seed, **options))
    load.__doc__ = f"The generated '{name}' dataset (fastprompt.data.generated)."
    return load
