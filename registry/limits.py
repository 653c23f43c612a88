"""Bounds on what neuronreg reads from files that others may have written: provenance, run configs,
cards, lock files, checkpoints' metadata.

Python's ``json`` and ``yaml`` parsers recurse once per level of nesting: a file nested 200,000 deep
raises ``RecursionError`` (a traceback, not a message), and one nested 900 deep parses but breaks
whatever walks it next. YAML aliases let a card of a few lines stand for a billion nodes. What
neuronreg writes is a few levels deep and far below a megabyte, so what it reads is taken only within
bounds far above that; beyond them it is a :class:`BeyondLimits`, a ``ValueError``, which every
reader already turns into its own named error ("... is damaged or not a neuronreg file").

Integers in records are bounded too (:data:`INT64`): a count of ``10**30`` tokens would otherwise
reach numpy or torch and raise ``OverflowError`` there.
"""

from __future__ import annotations

MAX_DEPTH = 64  # levels of nesting; neuronreg's own files use at most 6
MAX_NODES = 1_000_000  # values in one document (a card listing 10,000 files holds about 100,000)
MAX_BYTES = 256 << 20  # characters of one document
INT64 = (1 << 63) - 1  # the largest integer a record may hold: what numpy and torch store


class BeyondLimits(ValueError):
    """A document nested too deep, too large, or expanding to too many values."""


def load_json(text: str | bytes):
    """``json.loads``, or BeyondLimits (a ValueError, as for malformed JSON) past the bounds above."""
    import json

    return _bounded(text, json.loads)


def load_yaml(text: str):
    """``yaml.safe_load``, or BeyondLimits past the bounds above (``yaml.YAMLError`` when malformed)."""
    import yaml

    return _bounded(text, yaml.safe_load)


def _bounded(text: str | bytes, parse):
    if len(text) > MAX_BYTES:
        raise BeyondLimits(f"it is larger than {MAX_BYTES >> 20} MB")
    try:
        data = parse(text)
    except RecursionError as exc:
        raise BeyondLimits(f"it is nested more than {MAX_DEPTH} levels deep") from exc
    check_tree(data)
    return data


def check_tree(data) -> None:
    """BeyondLimits unless ``data`` (parsed JSON or YAML) is at most MAX_DEPTH deep and MAX_NODES values.

    Iterative, so that checking cannot itself recurse; a value reached twice (a YAML alias) counts
    each time, as every later walk over it would."""
    stack = [(data, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise BeyondLimits(f"it holds more than {MAX_NODES:,} values")
        if isinstance(value, dict):
            children = list(value.keys()) + list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth >= MAX_DEPTH and children:
            raise BeyondLimits(f"it is nested more than {MAX_DEPTH} levels deep")
        stack.extend((child, depth + 1) for child in children)
