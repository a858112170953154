"""Formatting shared by the whole package: shapes, dtypes, counts and one-line messages.

Every message, table and view regbn writes spells a shape, a dtype or an error the same way by
using these functions; no module keeps a copy of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "dtype_name",
    "format_count",
    "format_shape",
    "one_line",
    "plural",
    "shape_str",
    "shape_to_json",
]


def format_shape(shape: object) -> str:
    """A shape for display: ``(2, 3)``, ``-`` for none, and the shapes inside a node that returns
    several tensors (a tuple/list as ``(...)``, a dict as ``{key: ...}``)."""
    if shape is None:
        return "-"
    if isinstance(shape, dict):
        return "{" + ", ".join(f"{k!r}: {format_shape(v)}" for k, v in shape.items()) + "}"
    if isinstance(shape, (tuple, list)) and all(isinstance(d, int) for d in shape):
        return "(" + ", ".join(str(d) for d in shape) + ")"
    if isinstance(shape, (tuple, list)):  # nested: a node returning several tensors
        return "(" + ", ".join(format_shape(s) for s in shape) + ")"
    return str(shape)


def shape_str(shape: Sequence[int]) -> str:
    """A shape as the Python tuple one would type (``(64,)``, ``(2, 3)``): error messages give
    it so that the value can be pasted back into a call."""
    return str(tuple(int(s) for s in shape))


def shape_to_json(shape: object) -> object:
    """A shape (possibly nested, possibly with symbolic sizes) as JSON-ready lists and strings."""
    if isinstance(shape, dict):
        return {str(k): shape_to_json(v) for k, v in shape.items()}
    if isinstance(shape, (tuple, list)):
        return [shape_to_json(s) for s in shape]
    if shape is None or isinstance(shape, (int, float, str)):
        return shape
    return str(shape)  # a symbolic size


def dtype_name(dtype: torch.dtype | None, short: bool = False) -> str | None:
    """``float32`` for ``torch.float32`` (None for none); ``short`` gives the table's spelling
    (``f32``, ``i64``, ``b``; ``-`` for none)."""
    if dtype is None:
        return "-" if short else None
    text = str(dtype).removeprefix("torch.")
    if short:
        text = (
            text.replace("float", "f")
            .replace("bfloat", "bf")
            .replace("int", "i")
            .replace("complex", "c")
            .replace("bool", "b")
        )
    return text


def format_count(n: int) -> str:
    """A parameter count with thousands separators; empty for zero (a table cell left blank)."""
    return f"{n:,}" if n else ""


def plural(n: int, word: str) -> str:
    """``1 fusion``, ``2 fusions``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def one_line(text: object) -> str:
    """A message (or an exception) on one line: every run of whitespace becomes one space."""
    return " ".join(str(text).split())
