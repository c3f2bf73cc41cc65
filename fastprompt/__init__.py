"""fastprompt: fast, faithful prompt learning and adapters for CLIP.

    clip  = fastprompt.load_clip("ViT-B-16", pretrained="openai")
    model = fastprompt.create("maple", clip, classnames)
    clf   = model.classifier()
"""
from .api import create, list_methods
from .checkpoint import load, save
from .clip import load_clip

__all__ = ["create", "list_methods", "load", "load_clip", "save"]
__version__ = "0.1.0"
