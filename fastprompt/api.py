"""`create` and `list_methods`: building a method over a frozen CLIP by name."""
from __future__ import annotations

from .clip import Clip
from .errors import InputError, first_line
from .methods import METHODS, Method


def list_methods() -> list[str]:
    return sorted(METHODS)


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise InputError(f"unknown method '{name}'; choose one of: {', '.join(list_methods())}")
    return METHODS[name]


def create(method: str, clip: Clip, classnames: list[str], **options) -> Method:
    """A method over `clip` for `classnames`; keyword options override the paper defaults."""
    cls = method_class(method)
    if classnames is None or len(list(classnames)) == 0:
        raise InputError("empty class list: give the class names to classify")
    config = cls.Config.from_options(method, options)
    try:
        model = cls(clip, list(classnames), config)
    except InputError:
        raise
    except ValueError as err:  # a method's own check of its options or class names
        raise InputError(f"{method}: {first_line(err)}") from err
    return model.to(clip.device)
