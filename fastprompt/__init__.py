"""fastprompt: fast, faithful prompt learning and adapters for CLIP.

    clip  = fastprompt.load_clip("ViT-B-16", pretrained="openai")
    model = fastprompt.create("maple", clip, classnames)
    clf   = model.classifier()
"""
from .api import create, list_methods
from .checkpoint import load, save
from .clip import load_clip
def load_original(*args, **kwargs): from .original import load_original as f; return f(*args, **kwargs)  # noqa: E302,E704 (lazy)
def original_state_dict(model): from .original import original_state_dict as f; return f(model)  # noqa: E704 (lazy)

__all__ = ["create", "list_methods", "load", "load_clip", "save"]
__version__ = "0.1.0"
