"""The methods, registered by name (see METHODS.md for what each one is).

A method lives in one file of this folder: its class (registered with `@register(name)`), its
`Config`, its card in the file's `CARDS` (description and recipes) and its `original_layout`.
`MODULES` lists the files in the order their methods are shown (tables, --help); a new method's
file is added here. `fastprompt.catalog` reads this list and the cards with `ast`, without torch.
"""
import importlib

from .base import METHODS, Method, MethodConfig, card, list_methods, reference_method, register

MODULES = ("zeroshot", "coop", "cocoop", "maple", "mma", "lamm", "promptsrc", "kgcoop", "clip_lora",
           "tip_adapter", "tip_adapter_f", "clip_adapter")
for _module in MODULES:
    importlib.import_module(f".{_module}", __name__)

__all__ = ["METHODS", "MODULES", "Method", "MethodConfig", "card", "list_methods",
           "reference_method", "register"]
