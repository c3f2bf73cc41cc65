"""The eleven CoOp datasets (plus the ImageNet shift targets), read in CoOp's layout.

Every dataset is read in the exact layout of CoOp's DATASETS.md (``dataset_dir``, ``image_dir``
and split file names as in KaiyangZhou/CoOp ``datasets/*.py``). Split files are only read,
never written: CoOp's ``split_fewshot/`` caches and ImageNet's ``preprocessed.pkl`` are not used.

* Split-file datasets: ``split_zhou_<Name>.json`` = ``{"train"|"val"|"test": [[path relative to
  the image dir, label, classname], ...]}``. Labels must be 0..N-1 with one name each.
  Caltech101 / EuroSAT folder names are renamed as CoOp does when it writes the split
  (``NEW_CNAMES``); the published split files already hold the new names, so this is a no-op there.
* FGVCAircraft: ``variants.txt`` (label = line index) + ``images_variant_{split}.txt``
  (``<image id> <variant>`` lines, image ``images/<id>.jpg``).
* ImageNet: ``images/{train,val}/<wnid>/`` + ``classnames.txt`` (``<wnid> <name>`` lines); labels
  follow the sorted train wnids; val is the test set and, as in CoOp, also the val set.
* ImageNetV2 / -Sketch / -A / -R: test only (train and val empty). V2 folders are label indices
  into ``classnames.txt``; the others are wnid folders labelled by their sorted order (so -A and -R
  have 200 classes named from ``classnames.txt``). ``classnames.txt`` is looked up in the dataset's
  own folder first (CoOp's layout), then in ``root/imagenet/``.

`spec_loader(name, SPECS[name])` is the registry's entry for each (`datasets.py`).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from typing import NamedTuple

from ..errors import first_line, setting
from ..readers import ascii_int, loads
from .folder import class_dirs, read_class_tree
from .protocol import DataError, DatasetSplits, Datum

COOP_DOC = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"

CALTECH_NEW_CNAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard",
                      "Motorbikes": "motorbike"}
EUROSAT_NEW_CNAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land", "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings",
    "River": "River", "SeaLake": "Sea or Lake"}


class Spec(NamedTuple):
    coop_name: str       # CoOp's class / config name, e.g. "OxfordPets"
    dataset_dir: str     # under root
    image_dir: str       # under dataset_dir ("" = dataset_dir itself)
    split_file: str = ""
    renames: dict | None = None
    template: str = "a photo of a {}."  # zero-shot prompt: CUSTOM_TEMPLATES of CoOp trainers/zsclip.py


SPECS = {
    "imagenet": Spec("ImageNet", "imagenet", "images"),
    "caltech101": Spec("Caltech101", "caltech-101", "101_ObjectCategories",
                       "split_zhou_Caltech101.json", CALTECH_NEW_CNAMES),
    "oxford_pets": Spec("OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
                        template="a photo of a {}, a type of pet."),
    "stanford_cars": Spec("StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": Spec("OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                           template="a photo of a {}, a type of flower."),
    "food101": Spec("Food101", "food-101", "images", "split_zhou_Food101.json",
                    template="a photo of {}, a type of food."),
    "fgvc_aircraft": Spec("FGVCAircraft", "fgvc_aircraft", "images",
                          template="a photo of a {}, a type of aircraft."),
    "sun397": Spec("SUN397", "sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": Spec("DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json",
                template="{} texture."),
    "eurosat": Spec("EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", EUROSAT_NEW_CNAMES,
                    template="a centered satellite photo of {}."),
    "ucf101": Spec("UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
                   template="a photo of a person doing {}."),
    "imagenetv2": Spec("ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val"),
    "imagenet_sketch": Spec("ImageNetSketch", "imagenet-sketch", "images"),
    "imagenet_a": Spec("ImageNetA", "imagenet-adversarial", "imagenet-a"),
    "imagenet_r": Spec("ImageNetR", "imagenet-rendition", "imagenet-r"),
}


# ---------------------------------------------------------------- paths and checks

def _fix(spec: Spec) -> str:
    return (f"set up {spec.coop_name} as in CoOp's DATASETS.md ({COOP_DOC}) or use "
            f"{setting('--dataset', 'folder')}")


def _dirs(root, spec: Spec) -> tuple[str, str]:
    """(dataset_dir, image_dir), each checked to exist."""
    if not root:
        raise DataError(f"dataset {spec.coop_name} needs a data root — pass "
                        f"{setting('--data-root', 'DIR')} (the folder that holds {spec.dataset_dir}/)")
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DataError(f"data root not found: {root} — pass {setting('--data-root', 'DIR')} (the "
                        f"folder that holds {spec.dataset_dir}/)")
    dataset_dir = os.path.join(root, spec.dataset_dir)
    if not os.path.isdir(dataset_dir):
        raise DataError(f"dataset folder not found: {dataset_dir} — {_fix(spec)}")
    image_dir = os.path.join(dataset_dir, spec.image_dir) if spec.image_dir else dataset_dir
    if not os.path.isdir(image_dir):
        raise DataError(f"image folder not found: {image_dir} — {_fix(spec)}")
    return dataset_dir, image_dir


def _require_file(path: str, spec: Spec, what: str = "file") -> str:
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path} — {_fix(spec)}")
    return path


def _check_exist(items: list[Datum], listed_in: str, spec: Spec) -> None:
    """Every impath must exist; one directory listing per folder instead of a stat per image."""
    by_dir: dict[str, list[Datum]] = defaultdict(list)
    for d in items:
        by_dir[os.path.dirname(d.impath)].append(d)
    missing: list[Datum] = []
    for folder, group in by_dir.items():
        present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        missing.extend(d for d in group if os.path.basename(d.impath) not in present)
    if not missing:
        return
    first = missing[0]
    where = os.path.dirname(first.impath)
    what = (f"class {first.classname!r} has no folder {where}" if not os.path.isdir(where)
            else f"first missing: {first.impath}, class {first.classname!r}")
    raise DataError(f"{len(missing)} of {len(items)} images listed in {listed_in} are missing "
                    f"({what}) — re-extract the images into {where} or {_fix(spec)}")


def _classnames(items: list[Datum], source: str, renames: dict | None) -> list[str]:
    """classnames[label] from the items; labels must be 0..N-1 with one name each."""
    name_of: dict[int, str] = {}
    label_of: dict[str, int] = {}
    dupes: set[str] = set()
    for d in items:
        if name_of.setdefault(d.label, d.classname) != d.classname:
            raise DataError(f"{source}: label {d.label} is named both {name_of[d.label]!r} and "
                            f"{d.classname!r} — the split file is inconsistent; re-download it")
        if label_of.setdefault(d.classname, d.label) != d.label and d.classname not in dupes:
            dupes.add(d.classname)  # legal but suspicious: the two classes get identical prompts
            warnings.warn(f"{source}: class name {d.classname!r} is used by labels "
                          f"{label_of[d.classname]} and {d.label}", RuntimeWarning, stacklevel=4)
    if not name_of:
        raise DataError(f"{source} lists no images — re-download it ({COOP_DOC})")
    bad = [y for y in name_of if not 0 <= y < len(name_of)]
    if bad:
        unused = min(set(range(len(name_of))) - set(name_of))
        raise DataError(f"{source}: labels must be 0..{len(name_of) - 1} but label {max(bad, key=abs)} "
                        f"is used and {unused} is not — the split file is inconsistent; re-download it")
    renames = renames or {}
    return [renames.get(name_of[y], name_of[y]) for y in range(len(name_of))]


# ---------------------------------------------------------------- loaders

def _load_split_json(name: str, spec: Spec, root) -> DatasetSplits:
    dataset_dir, image_dir = _dirs(root, spec)
    path = os.path.join(dataset_dir, spec.split_file)
    if not os.path.isfile(path):
        raise DataError(f"split file not found: {path} — download {spec.split_file} from the link "
                        f"in CoOp's DATASETS.md ({COOP_DOC}) into {dataset_dir}, or use "
                        f"{setting('--dataset', 'folder')}")
    try:
        with open(path, "rb") as f:
            raw = loads(f.read())
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, not JSON, nested too deeply
        raise DataError(f"cannot read split file {path}: {first_line(err)} — re-download "
                        f"{spec.split_file} ({COOP_DOC})") from None
    splits: dict[str, list[Datum]] = {}
    for split in ("train", "val", "test"):
        entries = raw.get(split) if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            raise DataError(f"split file {path} has no '{split}' list — expected "
                            f'{{"train": [[path, label, classname], ...], "val": ..., "test": ...}}')
        items = []
        for i, e in enumerate(entries):
            label = ascii_int(e[1]) if isinstance(e, (list, tuple)) and len(e) == 3 else None
            if label is None or not (isinstance(e[0], str) and isinstance(e[2], str)):
                raise DataError(f"split file {path}: entry {i} of '{split}' is {str(e)[:80]} — "
                                f"expected [relative_image_path, label, classname]")
            items.append(Datum(os.path.join(image_dir, e[0]), label, e[2]))
        splits[split] = items
    everything = splits["train"] + splits["val"] + splits["test"]
    classnames = _classnames(everything, path, spec.renames)
    _check_exist(everything, path, spec)
    if spec.renames:
        splits = {k: [Datum(d.impath, d.label, classnames[d.label]) for d in v]
                  for k, v in splits.items()}
    return DatasetSplits(name, classnames, splits["train"], splits["val"], splits["test"])


def _load_fgvc(name: str, spec: Spec, root) -> DatasetSplits:
    dataset_dir, image_dir = _dirs(root, spec)
    variants_path = _require_file(os.path.join(dataset_dir, "variants.txt"), spec)
    with open(variants_path, encoding="utf-8") as f:
        classnames = [line.strip() for line in f if line.strip()]
    label_of = {c: y for y, c in enumerate(classnames)}
    splits = {}
    for split in ("train", "val", "test"):
        path = _require_file(os.path.join(dataset_dir, f"images_variant_{split}.txt"), spec)
        items = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.strip().split(" ", 1)
                if not parts[0]:
                    continue
                variant = parts[1].strip() if len(parts) == 2 else ""
                if variant not in label_of:
                    raise DataError(f"{path} line {lineno}: variant {variant!r} is not in "
                                    f"{variants_path} — use the variants.txt of the same "
                                    f"FGVC-Aircraft release")
                y = label_of[variant]
                items.append(Datum(os.path.join(image_dir, parts[0] + ".jpg"), y, variant))
        splits[split] = items
    _check_exist(splits["train"] + splits["val"] + splits["test"],
                 os.path.join(dataset_dir, "images_variant_*.txt"), spec)
    return DatasetSplits(name, classnames, splits["train"], splits["val"], splits["test"])


def _read_wnids(dataset_dir: str, spec: Spec) -> dict[str, str]:
    """Ordered ``wnid -> class name`` from classnames.txt (own folder, else root/imagenet/)."""
    candidates = [os.path.join(dataset_dir, "classnames.txt"),
                  os.path.join(os.path.dirname(dataset_dir), "imagenet", "classnames.txt")]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise DataError(f"class-name file not found: {candidates[0]} — copy ImageNet's "
                        f"classnames.txt there ({COOP_DOC})")
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split(maxsplit=1)
            if not parts:
                continue
            if len(parts) < 2:
                raise DataError(f"{path} line {lineno}: expected '<wnid> <class name>', got "
                                f"{line.strip()!r} — use the classnames.txt from CoOp's DATASETS.md")
            names[parts[0]] = parts[1].strip()
    return names


def _load_imagenet_family(name: str, spec: Spec, root) -> DatasetSplits:
    """ImageNet (train + val-as-test) and its test-only variants (train and val empty)."""
    dataset_dir, image_dir = _dirs(root, spec)
    wnid_names = _read_wnids(dataset_dir, spec)
    trees = [os.path.join(image_dir, "train"), os.path.join(image_dir, "val")] \
        if name == "imagenet" else [image_dir]
    for tree in trees:
        if not os.path.isdir(tree):
            raise DataError(f"image folder not found: {tree} — {_fix(spec)}")
    folders = class_dirs(trees[0])  # ImageNet: the train wnids define the labels
    if name == "imagenetv2":  # folders "0".."999" index classnames.txt
        classnames = list(wnid_names.values())
        label_of = {f: y for f in folders
                    if (y := ascii_int(f)) is not None and 0 <= y < len(classnames)}
        bad = [f for f in folders if f not in label_of]
    else:
        bad = [f for f in folders if f not in wnid_names]
        classnames = [wnid_names[f] for f in folders if f not in bad]
        label_of = {f: y for y, f in enumerate(folders)}
    if bad:
        raise DataError(f"class folder {os.path.join(trees[0], bad[0])} is not a class of "
                        f"classnames.txt ({len(bad)} such folders) — use ImageNet's classnames.txt "
                        f"from CoOp's DATASETS.md ({COOP_DOC})")
    data = []
    for tree in trees:  # images in os.listdir order, as CoOp's imagenet.py lists them (Dassl's
        # few-shot draw then picks the same files as the original code on this file system)
        items = read_class_tree(tree, label_of, classnames, f"is not a class of {trees[0]} — "
                                f"remove it or restore the missing train folder",
                                listdir_order=name == "imagenet")
        if not items:
            raise DataError(f"no images found in {tree} — {_fix(spec)}")
        data.append(items)
    if name == "imagenet":  # as CoOp: val is the test set, and also serves as val
        return DatasetSplits(name, classnames, data[0], data[1], data[1], val_is_test=True)
    return DatasetSplits(name, classnames, [], [], data[0])


def spec_loader(name: str, spec: Spec):
    """The registry entry of a CoOp dataset: `load(root, seed=None)`."""
    impl = (_load_fgvc if name == "fgvc_aircraft" else _load_split_json if spec.split_file
            else _load_imagenet_family)

    def load(root=None, seed=None):  # seed is accepted and ignored: the splits are fixed files
        return impl(name, spec, root)
    load.__doc__ = f"{spec.coop_name} in CoOp's layout under root/{spec.dataset_dir}/."
    return load
