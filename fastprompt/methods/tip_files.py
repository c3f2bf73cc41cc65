"""Tip-Adapter's released files -> a tip_adapter / tip_adapter_f model (`fp.load_original`).

gaopengcuhk/Tip-Adapter saves tensors, not a Dassl checkpoint, under `cache_dir` = ./caches/<dataset>:
* utils.py build_cache_model: `keys_<K>shots.pt` = cache_keys [E, NK] (the normalised keys,
  permuted) and `values_<K>shots.pt` = the one-hot values [NK, C] (fp16 in the release);
* main.py run_tip_adapter_F: `best_F_<K>shots.pt` = the adapter weight [NK, E] (the tuned keys, an
  nn.Parameter) of the epoch with the best test accuracy; its values are `values_<K>shots.pt`.
α and β are never saved: the model gets the config's init_alpha / init_beta (search them again on
validation features with `model.search`, as the release does after loading). The config
(configs/<dataset>.yaml, or a mapping of its names) gives the dataset — its prompt: the dataset's
CoOp template, ImageNet the 7-template ensemble — the search scales, and `shots`, checked against
the file name. Every file is read with the restricted unpickler (nothing in it runs).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..original.keys import Layout, err, given

#: the names of the released configs/*.yaml (all known: none is warned about)
CONFIG_NAMES = frozenset({"root_path", "load_cache", "load_pre_feat", "search_hp", "search_scale",
                          "search_step", "init_beta", "init_alpha", "dataset", "shots", "backbone",
                          "lr", "augment_epoch", "train_epoch", "cache_dir"})
#: Tip-Adapter's dataset names that are not fastprompt's
DATASETS = {"fgvc": "fgvc_aircraft"}
_FILE = re.compile(r"(keys_|values_|best_F_)(\d+)shots\.pt")


def _prefix(layout: Layout) -> str:
    return "best_F_" if layout.kind == "tip_adapter_f" else "keys_"


def find(layout: Layout, path: Path) -> Path:
    """The keys file of `path` (a file, or the cache folder holding one `<prefix><K>shots.pt`)."""
    prefix, other = _prefix(layout), {"keys_": "tip_adapter", "best_F_": "tip_adapter_f"}
    if path.is_file():
        m = _FILE.fullmatch(path.name)
        if m is None or m.group(1) == "values_":
            raise err(f"{path.name}: give Tip-Adapter's {prefix}<shots>shots.pt (or its cache folder); "
                      f"its values_<shots>shots.pt is read beside it")
        if m.group(1) != prefix:
            kind = "Tip-Adapter-F's tuned keys" if m.group(1) == "best_F_" else "Tip-Adapter's cache"
            raise err(f"{path.name} holds {kind}: import it as {other[m.group(1)]}")
        return path
    if not path.is_dir():
        raise err(f"checkpoint not found: {path}")
    found = sorted(p.name for p in path.iterdir() if _FILE.fullmatch(p.name) and p.name.startswith(prefix))
    if len(found) != 1:
        what = f"holds {', '.join(found)}: give one file" if found else f"holds no {prefix}<shots>shots.pt"
        raise err(f"{path} {what} (Tip-Adapter's ./caches/<dataset> folder)")
    return path / found[0]


def _tensor(path: Path) -> torch.Tensor:
    from ..original.unpickle import UnpickleError, safe_load

    if not path.is_file():
        raise err(f"missing {path}: Tip-Adapter saves it beside the keys (build_cache_model)")
    try:
        obj = safe_load(path)
    except UnpickleError as e:
        raise err(str(e)) from None
    if not isinstance(obj, torch.Tensor) or not obj.is_floating_point() or obj.dim() != 2:
        raise err(f"{path.name} holds {type(obj).__name__} {tuple(getattr(obj, 'shape', ()))}: "
                  f"expected the 2-D float tensor Tip-Adapter saves")
    return obj.float()


def options(cfg: dict, clip_name: str, notes: list) -> dict:
    """The model's options from a released config's names."""
    from ..data import DataError, canonical_name, zero_shot_template
    from ..prompts import ENSEMBLE_TEMPLATES

    out: dict = {}
    backbone = cfg.get("backbone")
    if backbone and str(backbone).replace("/", "-") != clip_name:
        raise err(f"the config says backbone {backbone!r}, the backbone given is {clip_name}: the "
                  f"cache holds that backbone's features")
    dataset = cfg.get("dataset")
    if dataset:
        try:
            name = canonical_name(DATASETS.get(str(dataset), str(dataset)))
        except DataError:
            raise err(f"config dataset {dataset!r} is not one of Tip-Adapter's datasets") from None
        out["templates"] = list(ENSEMBLE_TEMPLATES) if name == "imagenet" else [zero_shot_template(name)]
    else:
        notes.append("the config names no dataset: the prompt is 'a photo of a {}.' (Caltech101's, "
                     "Stanford Cars', SUN397's); pass the release's configs/<dataset>.yaml")
    for key, names in (("search_scale", ("search_beta", "search_alpha")),
                       ("search_step", ("beta_steps", "alpha_steps"))):
        if cfg.get(key) is not None:
            value = cfg[key]
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise err(f"config {key} must be [beta, alpha], got {value!r}")
            out.update(zip(names, value))
    for key, name in (("init_alpha", "alpha"), ("init_beta", "beta"), ("augment_epoch", "augment_epoch")):
        if cfg.get(key) is not None:
            out[name] = cfg[key]
    notes.append(f"Tip-Adapter saves no searched alpha/beta: the model uses alpha "
                 f"{out.get('alpha', 'default')}, beta {out.get('beta', 'default')} (init_alpha/"
                 f"init_beta); model.search(features, labels) searches them on validation features")
    return out


def read(layout: Layout, file: Path, clip, classnames: list[str], cfg: dict, notes: list):
    """(the model's options, fill(model)) for the keys file `file` found by `find`."""
    shots = int(_FILE.fullmatch(file.name).group(2))
    given(cfg, "shots", shots, file.name)
    values = _tensor(file.parent / f"values_{shots}shots.pt")
    raw = _tensor(file)
    keys = raw if layout.kind == "tip_adapter_f" else raw.t()  # cache_keys is [E, NK]
    n = values.shape[0]
    if values.shape[1] != len(classnames):
        raise err(f"values_{shots}shots.pt holds {values.shape[1]} classes but {len(classnames)} "
                  f"class names were given")
    if not bool(((values == 0) | (values == 1)).all()) or not bool((values.sum(1) == 1).all()):
        raise err(f"values_{shots}shots.pt is not one-hot (one 1 per row): not Tip-Adapter's values")
    if keys.shape[0] != n:
        want = f"[{n}, E]" if layout.kind == "tip_adapter_f" else f"[E, {n}]"
        raise err(f"{file.name} holds a {tuple(raw.shape)} tensor, expected {want}: the {n} keys "
                  f"of values_{shots}shots.pt")
    labels = values.argmax(1)
    return {**options(cfg, clip.name, notes), "cache_size": n}, lambda model: model.set_cache(keys, labels)


def _no_names(model) -> dict:
    return {}


def _no_options(*args) -> dict:
    return {}


TIP_LAYOUT = Layout("Tip-Adapter", (), "", "", "", _no_names, _no_options, known=CONFIG_NAMES,
                    kind="tip_adapter", find=find, read=read)
TIP_F_LAYOUT = Layout("Tip-Adapter-F", (), "", "", "", _no_names, _no_options, known=CONFIG_NAMES,
                      kind="tip_adapter_f", find=find, read=read)
