"""Plain image folders, one sub-folder per class — no split file needed.

Two layouts are accepted under ``root``:

* ``root/train/<class>/...`` with ``root/test/<class>/...`` and/or ``root/val/<class>/...``:
  the given splits are used as they are. Without ``test/`` the ``val/`` tree doubles as the test
  set (as CoOp does for ImageNet); without ``val/`` the validation set is empty.
* ``root/<class>/...``: every class is split on its own, seeded, into 50% train / 20% val /
  30% test (CoOp's ``read_and_split_data`` ratios; rounded, at least one train and one test image
  per class, so a class needs 2 images). The split depends only on ``seed`` and the class's file
  names, so adding a class never reshuffles the others.

Class names are folder names with ``_`` turned into spaces; labels follow the sorted folder names.
Images are found recursively and filtered by extension (see ``IMAGE_EXTENSIONS``); hidden files
and folders are ignored.
"""

from __future__ import annotations

import os
import random

from ..errors import setting
from .images import IMAGE_EXTENSIONS
from .protocol import DataError, DatasetSplits, Datum

SPLIT_RATIOS = (0.5, 0.2, 0.3)


def class_dirs(tree: str) -> list[str]:
    return sorted(e.name for e in os.scandir(tree) if e.is_dir() and not e.name.startswith("."))


def image_files(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, sorted, hidden entries skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def classname_of(folder_name: str) -> str:
    return folder_name.replace("_", " ").strip()


def listed_images(folder: str) -> list[str]:
    """Image files directly in ``folder`` in ``os.listdir`` order, hidden ones skipped (Dassl's
    ``listdir_nohidden`` without sorting, as CoOp's ImageNet reader calls it)."""
    return [os.path.join(folder, f) for f in os.listdir(folder)
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]


def read_class_tree(tree: str, label_of: dict[str, int], classnames: list[str],
                    unknown: str = "has no counterpart in the train/ tree — add it to train/ or "
                                   "remove it", listdir_order: bool = False) -> list[Datum]:
    """Every image of `tree`'s class folders, labelled by `label_of` (sorted and recursive, or
    `listdir_order`: one level in file-system order); a folder not in `label_of` raises
    DataError('class folder PATH ' + unknown)."""
    items = []
    find = listed_images if listdir_order else image_files
    for folder in class_dirs(tree):
        if folder not in label_of:
            raise DataError(f"class folder {os.path.join(tree, folder)} {unknown}")
        y = label_of[folder]
        items.extend(Datum(p, y, classnames[y]) for p in find(os.path.join(tree, folder)))
    return items


def _split_counts(n: int) -> tuple[int, int]:
    """(n_train, n_val) for a class of n >= 2 images; the rest is test."""
    n_train = max(1, round(n * SPLIT_RATIOS[0]))
    n_val = round(n * SPLIT_RATIOS[1])
    while n - n_train - n_val < 1:  # keep at least one test image: shrink val, then train
        if n_val > 0:
            n_val -= 1
        else:
            n_train -= 1
    return n_train, n_val


def load_folder(root: str, seed: int = 0, name: str = "folder") -> DatasetSplits:
    """Load a class-per-sub-folder tree (see the module docstring for the layouts and split)."""
    if not root:
        raise DataError(f"the folder dataset needs a root — pass {setting('--data-root', 'DIR')} "
                        f"(one sub-folder of images per class)")
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root} — pass {setting('--data-root', 'DIR')} "
                        f"pointing at a folder with one sub-folder of images per class")
    train_tree = os.path.join(root, "train")
    if os.path.isdir(train_tree):
        return _load_subtrees(root, name)
    folders = class_dirs(root)
    if not folders:
        raise DataError(f"no class folders in {root} — put each class's images in its own "
                        f"sub-folder (root/<class name>/*.jpg)")
    classnames = [classname_of(f) for f in folders]
    train, val, test = [], [], []
    for y, folder in enumerate(folders):
        paths = image_files(os.path.join(root, folder))
        if len(paths) < 2:
            raise DataError(f"class folder {os.path.join(root, folder)} has {len(paths)} image(s); "
                            f"the automatic split needs at least 2 — add images or remove it "
                            f"(extensions: {' '.join(IMAGE_EXTENSIONS)})")
        random.Random(f"{seed}/{folder}").shuffle(paths)
        n_train, n_val = _split_counts(len(paths))
        train.extend(Datum(p, y, classnames[y]) for p in paths[:n_train])
        val.extend(Datum(p, y, classnames[y]) for p in paths[n_train:n_train + n_val])
        test.extend(Datum(p, y, classnames[y]) for p in paths[n_train + n_val:])
    return DatasetSplits(name, classnames, train, val, test)


def _load_subtrees(root: str, name: str) -> DatasetSplits:
    train_tree = os.path.join(root, "train")
    folders = class_dirs(train_tree)
    if not folders:
        raise DataError(f"no class folders in {train_tree} — put each class's training images "
                        f"in its own sub-folder (train/<class name>/*.jpg)")
    label_of = {f: y for y, f in enumerate(folders)}
    classnames = [classname_of(f) for f in folders]
    train = read_class_tree(train_tree, label_of, classnames)
    seen = {d.label for d in train}
    empty = [os.path.join(train_tree, f) for f, y in label_of.items() if y not in seen]
    if empty:
        raise DataError(f"class folder {empty[0]} has no images ({len(empty)} empty class "
                        f"folder(s)) — add images or remove it")
    splits = {}
    for split in ("val", "test"):
        tree = os.path.join(root, split)
        splits[split] = read_class_tree(tree, label_of, classnames) if os.path.isdir(tree) else None
    if splits["test"] is None and splits["val"] is None:
        raise DataError(f"{root} has train/ but neither test/ nor val/ — add a test/ tree with the "
                        f"same class folders, or drop the train/ level to split automatically")
    val = splits["val"] or []
    test = splits["test"] if splits["test"] is not None else val
    if not test:
        raise DataError(f"no images in {os.path.join(root, 'test' if splits['test'] is not None else 'val')}"
                        f" — add evaluation images (one sub-folder per class)")
    return DatasetSplits(name, classnames, train, val, test)
