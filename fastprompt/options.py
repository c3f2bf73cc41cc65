"""Option values coerced by the type of the field they set.

`--opt csc=False`, a YAML `csc: false` and `create(..., csc=False)` must all mean False: a value
given as text (the command line) is parsed by the field's type, a value that already has a type
(YAML, JSON, Python) must fit it. Anything else is one InputError naming the option, the value and
the type expected.

    bool   true/false, yes/no, on/off, 1/0 (any case); a JSON/Python bool (not 0/1 integers)
    int    "3", 3 (not 3.5, not True)
    float  "0.1", "1e-3", 3, 0.1, finite in float32 only (|x| <= 3.4e38)
    str    the text as given; from JSON/YAML a string only
    X | None  also "none"/"null" and None
    Literal[...] one of the listed values
"""
from __future__ import annotations

import dataclasses
import math
import typing

from .errors import InputError, short_repr

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
#: the largest float32: a real number above it is inf once it meets the float32 tensors
#: (an --lr of 1e39 is finite in Python and an overflow inside the optimizer)
FLOAT32_MAX = 3.4028234663852886e38
_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a finite number",
          str: "a string"}


def field_types(config_cls) -> dict[str, object]:
    """{field name: resolved type} of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(config_cls)}


def describe(kind) -> str:
    if kind in _NAMES:
        return _NAMES[kind]
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if args and type(None) in args:
        rest = [describe(a) for a in args if a is not type(None)]
        return " or ".join(rest + ["none"])
    return getattr(kind, "__name__", str(kind))


def _one(kind, value):
    """`value` as `kind`, or raise ValueError."""
    text = value.strip() if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None:
            try:
                return int(text, 10)
            except ValueError:
                pass
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif text is not None:
            try:
                number = float(text)
            except ValueError:
                pass
        if number is not None and math.isfinite(number) and abs(number) <= FLOAT32_MAX:
            return number
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin is typing.Literal:
            for option in args:
                try:
                    if _one(type(option), value) == option:
                        return option
                except ValueError:
                    continue
        elif args and type(None) in args:  # Optional[X] / X | None
            if value is None or (text is not None and text.lower() in ("none", "null")):
                return None
            for a in args:
                if a is not type(None):
                    try:
                        return _one(a, value)
                    except ValueError:
                        continue
        elif isinstance(kind, type) and isinstance(value, kind):
            return value
    raise ValueError(value)


def coerce(owner: str, name: str, kind, value, label: str | None = None):
    """`value` for option `name` of `owner` (e.g. "method 'coop'"), coerced to `kind`; `label`
    replaces "option NAME of OWNER" in the message."""
    try:
        return _one(kind, value)
    except ValueError:
        shown = repr(value[:60]) if isinstance(value, str) else short_repr(value)
        what = label or f"option '{name}' of {owner}"
        raise InputError(f"{what} must be {describe(kind)}, got {shown}") from None


#: the smallest sensible value of a numeric option, by name (whichever method has it): a value
#: below would divide by zero (meta_ratio, shots), build nothing (width) or train on NaN
#: (temperature, which must be > 0)
LOWER = {"n_ctx": 1, "meta_ratio": 1, "shots": 1, "width": 1, "text_chunk": 0,
         "n_label_tokens": 0, "temperature": 0.0, "logit_weight": 0.0, "feature_weight": 0.0,
         "param_weight": 0.0}
STRICT = {"temperature"}
#: the largest sensible value, by name: a prompt of more context tokens than any text encoder's
#: context length (77 for CLIP; `prompts.PromptTemplate` checks the model's own) cannot be encoded,
#: and n_ctx=10**8 would spend seconds and gigabytes on the prompt's text before that check
UPPER = {"n_ctx": 1024}


def coerce_all(config_cls, owner: str, options: dict) -> dict:
    """Every value of `options` coerced to its field's type (unknown names are the caller's job)
    and checked against `LOWER`."""
    types = field_types(config_cls)
    out = {k: coerce(owner, k, types[k], v) if k in types else v for k, v in options.items()}
    for key, value in out.items():
        low = LOWER.get(key)
        if low is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value < low or (key in STRICT and value == low):
            raise InputError(f"option '{key}' of {owner} must be {'>' if key in STRICT else '>='} "
                             f"{low}, got {value}")
        if value > UPPER.get(key, value):
            raise InputError(f"option '{key}' of {owner} must be <= {UPPER[key]}, got {value}: the "
                             f"prompt would be too long for the text encoder's context length")
    return out
