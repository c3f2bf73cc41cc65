"""`create` and `list_methods`: building a method over a frozen CLIP by name."""
from __future__ import annotations

from .backbone import RUNTIME_OPTIONS, RunOptions
from .clip import Clip
from .errors import InputError, first_line
from .methods import METHODS, Method
from .methods.base import list_methods

__all__ = ["create", "list_methods", "method_class", "split_options"]


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise InputError(f"unknown method '{name}'; choose one of: {', '.join(list_methods())}")
    return METHODS[name]


def split_options(method: str, options: dict):
    """(the method's Config, its RunOptions) from keyword options: the runtime switches
    (`backbone.RUNTIME_OPTIONS`) go to RunOptions, every other name to the method's Config; each
    value coerced by its field's type, an unknown name or a bad value an InputError."""
    from .options import coerce_all

    cls = method_class(method)
    runtime = {k: v for k, v in options.items() if k in RUNTIME_OPTIONS}
    rest = {k: v for k, v in options.items() if k not in RUNTIME_OPTIONS}
    config = cls.Config.from_options(method, rest, also=RUNTIME_OPTIONS)
    return config, RunOptions(**coerce_all(RunOptions, f"method '{method}'", runtime))


def create(method: str, clip: Clip, classnames: list[str], **options) -> Method:
    """A method over `clip` for `classnames`; keyword options override the paper defaults, and
    the runtime switches (`kernels`, `truncate_text`, `cache`, `text_chunk`) set `model.runtime`."""
    cls = method_class(method)
    if isinstance(classnames, (str, bytes)):  # list("cat") would be the classes c, a, t
        raise InputError(f"classnames must be a list of class names, not one string: pass "
                         f"[{classnames!r:.60}]")
    if classnames is None or len(list(classnames)) == 0:
        raise InputError("empty class list: give the class names to classify")
    config, runtime = split_options(method, options)
    try:
        model = cls(clip, list(classnames), config)
    except InputError:
        raise
    except ValueError as err:  # a method's own check of its options or class names
        raise InputError(f"{method}: {first_line(err)}") from err
    model.runtime = runtime
    return model.to(clip.device)
