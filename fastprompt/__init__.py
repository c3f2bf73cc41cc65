"""fastprompt: fast, faithful prompt learning and adapters for CLIP.

    clip  = fastprompt.load_clip("ViT-B-16", pretrained="openai")
    model = fastprompt.create("maple", clip, classnames)
    clf   = model.classifier()
"""
from .api import create, list_methods
from .checkpoint import load, save
from .clip import load_clip


def load_original(*args, **kwargs):
    """A model from a checkpoint of the original implementations (see fastprompt.original)."""
    from .original import load_original as load_original_impl

    return load_original_impl(*args, **kwargs)


def original_state_dict(model):
    """{original key: live parameter} of a model (see fastprompt.original)."""
    from .original import original_state_dict as original_state_dict_impl

    return original_state_dict_impl(model)


__all__ = ["create", "list_methods", "load", "load_clip", "load_original", "original_state_dict",
           "save"]
__version__ = "0.1.0"
