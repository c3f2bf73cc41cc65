"""The dataset registry: names and aliases -> loaders, and the zero-shot template of each.

Registered on first use: the CoOp datasets in CoOp's layout (`benchmarks.py`), ``folder``
(class-per-sub-folder, `folder.py`) and the built-in generated ones (`builtin.py`). A dataset a
user registers first (`register_dataset`) keeps its name. Aliases: CoOp's class names and dataset
folders, in any case, with or without ``-`` / ``_``.
"""

from __future__ import annotations

import re
from typing import Callable

from .benchmarks import SPECS, Spec, spec_loader  # noqa: F401  (Spec, SPECS: importable here too)
from .builtin import BUILTINS
from .folder import load_folder
from .protocol import DataError, DatasetSplits


def _key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


# ---------------------------------------------------------------- registry

Loader = Callable[..., DatasetSplits]
_REGISTRY: dict[str, Loader] = {}
_ALIASES: dict[str, str] = {}
_BUILTIN_REGISTERED = []  # non-empty once the shipped datasets are in the registry


def register_dataset(name: str, loader: Loader, aliases: tuple[str, ...] = ()) -> None:
    """Make ``load_dataset(name, root, **options)`` call ``loader(root, **options)``."""
    _REGISTRY[name] = loader
    for alias in (name, *aliases):
        _ALIASES[_key(alias)] = name


def _ensure_registry() -> None:
    if _BUILTIN_REGISTERED:
        return
    _BUILTIN_REGISTERED.append(True)
    shipped = [(n, spec_loader(n, s), (s.coop_name, s.dataset_dir)) for n, s in SPECS.items()]
    shipped += [("folder", load_folder, ("imagefolder",))]
    shipped += [(n, loader, ()) for n, loader in BUILTINS.items()]
    for name, loader, aliases in shipped:
        if name not in _REGISTRY:  # a dataset registered earlier by the user wins
            register_dataset(name, loader, aliases)


def canonical_name(name: str) -> str:
    """The registered name of a dataset (aliases: CoOp names, any case, - or _); DataError if unknown."""
    _ensure_registry()
    canonical = _ALIASES.get(_key(str(name)))
    if canonical is None:
        raise DataError(f"unknown dataset {name!r} — choose one of: {', '.join(list_datasets())}")
    return canonical


def zero_shot_template(name: str) -> str:
    """CoOp's zero-shot prompt for a dataset (CUSTOM_TEMPLATES); "a photo of a {}." for folders
    and generated datasets."""
    spec = SPECS.get(canonical_name(name))
    return spec.template if spec else "a photo of a {}."


def list_datasets() -> list[str]:
    """Canonical names accepted by :func:`load_dataset` (aliases: CoOp names, any case, - or _)."""
    _ensure_registry()
    return list(_REGISTRY)


def load_dataset(name: str, root=None, **options) -> DatasetSplits:
    """Load dataset ``name`` from ``root``; ``options`` go to its loader (e.g. ``seed``)."""
    return _REGISTRY[canonical_name(name)](root, **options)
