"""Reading text a user may have written or edited (config files, split files, metadata, a saved
table): one strict reader per format, whose every failure is a `ValueError` with a one-line reason
and whose cost is bounded by the size of the text.

    loads(text)        JSON: no NaN / Infinity / 1e999, nesting past the recursion limit refused
    load_yaml(text)    YAML (safe types) without aliases: `*a` repeated k times per level costs
                       k**levels when expanded, so a few hundred bytes could fill the memory
    ascii_int(value)   an int, or ASCII decimal text of at most 18 digits; None otherwise
                       ("١٢", "²", "1_000" and " 3" are not: `str.isdigit()` is not `int()`)

Callers wrap the `ValueError` in their own error naming the file (`except ValueError` catches
`UnicodeDecodeError` too). Nothing here imports torch.
"""
from __future__ import annotations

import json
import math
import re

__all__ = ["ascii_int", "load_yaml", "loads"]

_ASCII_INT = re.compile(r"-?[0-9]{1,18}")


def ascii_int(value) -> int | None:
    """`value` if it is an int (not a bool), the number ASCII decimal text spells (an optional
    leading '-', at most 18 digits), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _ASCII_INT.fullmatch(value):
        return int(value)
    return None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:30]} is out of range")
    return value


def _constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def loads(text: str | bytes):
    """`json.loads` that refuses non-finite numbers and too-deep nesting (ValueError)."""
    try:
        return json.loads(text, parse_constant=_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def load_yaml(text: str):
    """`yaml.safe_load` of `text`, refusing aliases; a ValueError reads "not valid YAML (line L,
    column C): why", to follow the file's name and "is"."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not accepted: write the value out", mark)
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliases)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ValueError("not valid YAML: nested too deeply") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        raise ValueError(f"not valid YAML{where}: {problem}") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise ValueError(f"not valid YAML: {str(err)[:80]}") from None
