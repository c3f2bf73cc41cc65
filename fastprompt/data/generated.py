"""Downstream datasets drawn by the pretraining corpus's renderer (`fastprompt.pretrain.corpus`).

Each has 12 classes whose names compose attributes the pretrained `tiny` CLIP has read in its
captions, ordered so that the protocol's base half (first 6) and novel half (last 6) each hold
classes that differ in one attribute only:

- ``shapes_colour``: "red triangle", "blue triangle", ...: colour–shape pairs, four of them
  (marked in ``HELD_OUT_CLASSES``) never seen in pretraining; objects of either texture and size.
- ``shapes_texture``: "striped red circle" vs "plain red circle", six colour–shape pairs.
- ``shapes_count``: "one blue circle", "two blue circles", "three blue circles", four objects.

32 train / 8 val / 16 test images per class at 32x32 by default, each from its own NumPy
generator seeded with ``(seed, dataset, split, class, index)``: identical on every machine.
"""
from __future__ import annotations

import functools

import numpy as np

from .protocol import DatasetSplits, Datum

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

_COLOUR_CLASSES = (("red", "triangle"), ("blue", "triangle"), ("green", "star"),
                   ("yellow", "square"), ("yellow", "star"), ("orange", "diamond"),
                   ("pink", "circle"), ("red", "circle"), ("white", "ring"),
                   ("green", "diamond"), ("green", "hexagon"), ("blue", "square"))
_TEXTURE_PAIRS = (("red", "circle"), ("blue", "star"), ("yellow", "heart"), ("green", "square"),
                  ("purple", "triangle"), ("orange", "cross"))
_COUNT_OBJECTS = (("blue", "circle"), ("red", "square"), ("yellow", "star"), ("green", "triangle"))


def _classes(name: str) -> list[dict]:
    """Scene attributes of each class; random attributes are None."""
    if name == "shapes_colour":
        return [{"colour": c, "shape": s, "count": 1, "texture": None} for c, s in _COLOUR_CLASSES]
    if name == "shapes_texture":
        return [{"colour": c, "shape": s, "count": 1, "texture": t}
                for c, s in _TEXTURE_PAIRS for t in ("striped", "plain")]
    if name == "shapes_count":
        return [{"colour": c, "shape": s, "count": n, "texture": None}
                for c, s in _COUNT_OBJECTS for n in (1, 2, 3)]
    raise KeyError(name)


GENERATED = ("shapes_colour", "shapes_texture", "shapes_count")


def _classname(name: str, a: dict) -> str:
    from ..pretrain.corpus import describe

    return describe(a["colour"], a["shape"], a["count"], a["texture"] if name == "shapes_texture"
                    else None, count_word=name == "shapes_count")


def held_out_classes() -> list[str]:
    """Classes of ``shapes_colour`` whose colour–shape pair never occurs in pretraining."""
    from ..pretrain.corpus import HELD_OUT

    return [f"{c} {s}" for c, s in _COLOUR_CLASSES if (c, s) in HELD_OUT]


@functools.lru_cache(maxsize=8)
def make_generated(name: str, seed: int = 0, n_train: int = 32, n_val: int = 8, n_test: int = 16,
                   image_size: int = 32) -> DatasetSplits:
    from ..pretrain.corpus import SIZES, TEXTURES, render

    classes = _classes(name)
    classnames = [_classname(name, a) for a in classes]
    ds_id = 104729 + GENERATED.index(name)
    splits: dict[str, list[Datum]] = {}
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        items = []
        for y, a in enumerate(classes):
            for i in range(count):
                rng = np.random.default_rng([seed, ds_id, _SPLIT_IDS[split], y, i])
                texture = a["texture"] or TEXTURES[int(rng.integers(2))]
                size = list(SIZES)[int(rng.integers(2))]
                image = render(rng, a["colour"], a["shape"], a["count"], texture, size, image_size)
                items.append(Datum(None, y, classnames[y], image=image))
        splits[split] = items
    return DatasetSplits(name, classnames, splits["train"], splits["val"], splits["test"])


def loader(name: str):
    """Registry entry for dataset `name` (``root`` is ignored: nothing is read from disk)."""
    def load(root=None, seed: int = 0, **options) -> DatasetSplits:
        d = make_generated(name, seed=seed, **options)
        return DatasetSplits(d.name, list(d.classnames), list(d.train), list(d.val), list(d.test))
    load.__doc__ = f"The generated '{name}' dataset (fastprompt.data.generated)."
    return load
