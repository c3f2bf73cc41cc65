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

from .generated import GENERATED, draw_splits, fresh, loader
from .protocol import DatasetSplits
from .shapes import COLOURS, draw_shape

#: (class name, RGB colour, shape)
SHAPE_CLASSES = tuple((f"{colour} {shape}", COLOURS[colour], shape) for colour, shape in (
    ("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"),
    ("purple", "cross"), ("orange", "diamond"), ("black", "ring"), ("pink", "hexagon"),
    ("brown", "heart"), ("white", "arrow")))


@functools.lru_cache(maxsize=4)
def make_shapes(seed: int = 0, n_train: int = 32, n_val: int = 8, n_test: int = 16,
                image_size: int = 64, name: str = "builtin") -> DatasetSplits:
    """The generated shapes dataset (see the module docstring). Cached: same args, same object."""
    return draw_splits(name, [c for c, _, _ in SHAPE_CLASSES], (n_train, n_val, n_test), (seed,),
                       lambda rng, y: draw_shape(rng, *SHAPE_CLASSES[y][1:], image_size))


def _load_shapes(root=None, seed: int = 0, **options) -> DatasetSplits:
    """Registry entry: ``root`` is ignored (nothing is read from disk)."""
    return fresh(make_shapes(seed=seed, **options))


#: the built-in datasets: ``builtin`` and the datasets drawn like the pretraining corpus of the
#: shipped tiny CLIP (generated.py)
BUILTINS = {"builtin": _load_shapes, **{name: loader(name) for name in GENERATED}}
