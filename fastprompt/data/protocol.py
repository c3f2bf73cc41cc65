"""The data model and the CoOp evaluation protocol.

* :class:`Datum`, :class:`DatasetSplits` and :class:`DataError` are the types every loader returns.
* :func:`few_shot` draws K training images per class (and ``min(K, 4)`` validation images per
  class) exactly as Dassl's ``generate_fewshot_dataset`` does right after ``random.seed(seed)``,
  so a user of the original code and of fastprompt train on the very same images.
* :func:`split_base_novel` is CoOp's ``subsample_classes``: sort the labels, the first
  ``ceil(n / 2)`` classes are *base*, the rest *novel*, and each half is relabelled from 0.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError, setting  # the project's error hierarchy: fastprompt.errors


@dataclass(frozen=True)
class Datum:
    """One labelled image: a file path (``impath``) or an in-memory PIL ``image`` (built-ins)."""

    impath: str | None
    label: int
    classname: str
    image: Any = field(default=None, repr=False, compare=False)

    @property
    def source(self) -> str:
        """What to call this image in messages: its path, or a description of the in-memory one."""
        return self.impath if self.impath is not None else f"<in-memory image of {self.classname!r}>"


@dataclass
class DatasetSplits:
    """A dataset: ``classnames[label]`` is the name of class ``label``; three lists of Datum."""

    name: str
    classnames: list[str]
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    #: the val list is the test set (CoOp's ImageNet): few-shot sampling leaves it whole
    val_is_test: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __repr__(self) -> str:  # the lists can hold a million items: keep the repr short
        return (f"DatasetSplits({self.name!r}, {self.num_classes} classes, train={len(self.train)}, "
                f"val={len(self.val)}, test={len(self.test)})")


def _by_label(items: list[Datum]) -> dict[int, list[Datum]]:
    """Items grouped by label, labels in order of first appearance (Dassl's split_dataset_by_label)."""
    groups: dict[int, list[Datum]] = defaultdict(list)
    for item in items:
        groups[item.label].append(item)
    return groups


def _sample_per_label(rng: random.Random, items: list[Datum], k: int) -> list[Datum]:
    """Dassl's generate_fewshot_dataset (repeat=False): per label, in order of first appearance,
    random.sample(items, k), or every item (drawing nothing) when the label has fewer than k."""
    out: list[Datum] = []
    for group in _by_label(items).values():
        out.extend(rng.sample(group, k) if len(group) >= k else group)
    return out


def few_shot(d: DatasetSplits, shots: int | None = 16, seed: int = 1,
             strict: bool = True) -> DatasetSplits:
    """K images per class for train, ``min(K, 4)`` per class for val; test is left untouched.

    The draw is Dassl's (dassl/data/datasets/base_dataset.py, called by CoOp's datasets/*.py after
    dassl's set_random_seed): one ``random.Random(seed)`` stream — the state ``random.seed(seed)``
    gives — samples the train list, then the val list (not for ImageNet, whose val is its test
    set). ``shots`` of ``None`` or < 1 keeps the full dataset (CoOp's ``NUM_SHOTS <= 0``).
    A class with fewer than K training images is an error here (Dassl would silently keep the
    fewer images); a class with fewer than ``min(K, 4)`` validation images keeps all it has, as in
    Dassl. A dataset without training images (the test-only ImageNet variants) is returned as it is.
    `strict=False` (a run that trains nothing, e.g. zero-shot CLIP) lets a class keep fewer.
    """
    if shots is None or shots < 1 or not d.train:
        return d
    train_groups = _by_label(d.train)
    short = [(len(train_groups.get(y, [])), y) for y in range(d.num_classes)
             if len(train_groups.get(y, [])) < shots]
    if short and strict:
        have, y = min(short)
        raise DataError(
            f"{d.name}: class {d.classnames[y]!r} has {have} training image(s) but {shots} shots "
            f"need {shots} ({len(short)} of {d.num_classes} classes are short) — lower "
            f"{setting('--shots')} to at most {have} or add images to that class")
    rng = random.Random(seed)
    train = _sample_per_label(rng, d.train, shots)
    val = d.val if d.val_is_test else _sample_per_label(rng, d.val, min(shots, 4))
    return dataclasses.replace(d, classnames=list(d.classnames), train=train, val=val)


def _select(items: list[Datum], relabel: dict[int, int]) -> list[Datum]:
    return [dataclasses.replace(item, label=relabel[item.label]) for item in items
            if item.label in relabel]


def split_base_novel(d: DatasetSplits) -> tuple[DatasetSplits, DatasetSplits]:
    """CoOp's base-to-novel split: labels sorted, first ``ceil(n/2)`` base, rest novel.

    Each half keeps only its own classes in train/val/test and is relabelled from 0, with
    ``classnames`` re-indexed to match. The class set is ``range(len(d.classnames))`` (CoOp takes
    the labels seen in train, which is the same set for every supported dataset).
    """
    n = d.num_classes
    if n < 2:
        raise DataError(f"{d.name}: base-to-novel needs at least 2 classes, got {n} — "
                        f"use {setting('--subsample', 'all')}")
    m = math.ceil(n / 2)
    halves = []
    for labels in (range(0, m), range(m, n)):
        relabel = {y: i for i, y in enumerate(labels)}
        halves.append(DatasetSplits(
            d.name, [d.classnames[y] for y in labels],
            _select(d.train, relabel), _select(d.val, relabel), _select(d.test, relabel),
            d.val_is_test))
    return halves[0], halves[1]
