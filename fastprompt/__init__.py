"""fastprompt: fast, faithful prompt learning and adapters for CLIP.

    clip  = fastprompt.load_clip("ViT-B-16", pretrained="openai")
    model = fastprompt.create("maple", clip, classnames)
    clf   = model.classifier()
    top   = model.predict(["photo.jpg"], topk=5)     # [[(class name, probability), ...]]

    metrics = fastprompt.fit(fastprompt.TrainConfig(dataset="oxford_pets", data_root="/data"))
    metrics = fastprompt.evaluate("runs/oxford_pets/maple/seed1")

The names below are imported on first use (PEP 562), so `python -m fastprompt.train --help` and
the other commands' help answer without importing torch or open_clip.
"""
from __future__ import annotations

import importlib

#: public name -> the submodule that defines it
_LAZY = {"create": "api", "list_methods": "api", "load": "checkpoint", "save": "checkpoint",
         "load_clip": "clip", "TrainConfig": "config", "fit": "jobs", "evaluate": "jobs"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # `fastprompt.clip`, `fastprompt.checkpoint`, ... as attributes, as before
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def load_original(*args, **kwargs):
    """A model from a checkpoint of the original implementations (see fastprompt.original)."""
    from .original import load_original as load_original_impl

    return load_original_impl(*args, **kwargs)


def original_state_dict(model):
    """{original key: live parameter} of a model (see fastprompt.original)."""
    from .original import original_state_dict as original_state_dict_impl

    return original_state_dict_impl(model)


__all__ = ["TrainConfig", "create", "evaluate", "fit", "list_methods", "load", "load_clip",
           "load_original", "original_state_dict", "save"]
__version__ = "0.1.0"
