"""The methods, registered by name (see METHODS.md for what each one is)."""
from . import cocoop, coop, lamm, maple, mma, zeroshot  # noqa: F401  (registration)
from .base import METHODS, Method, MethodConfig

__all__ = ["METHODS", "Method", "MethodConfig"]
