"""Why a model could not be traced, said so that a user can fix it.

`TraceError` carries the module, the source line and the reason; `trace_error` builds it from
the exception torch.fx raised, so that no raw fx traceback reaches the user. The reason comes
from a table of the messages fx and Python give for the usual culprits (data-dependent control
flow, iteration over a traced value, ``len()``/``int()`` of one); the fix names the
``leaf_modules``, ``concrete_args`` and ``autowrap_functions`` that work around them.
"""

from __future__ import annotations

import importlib.util
import os
import traceback
from collections.abc import Sequence

import torch
from torch import nn

from ...errors import RegBNError

__all__ = ["TraceError", "trace_error"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_REGBN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _library_dirs() -> tuple[str, ...]:
    """Code that is never the user's line: torch, regbn and einops (whose functions a model
    calls; the call site in the model is what the user can change)."""
    dirs = [_TORCH_DIR, _REGBN_DIR]
    spec = importlib.util.find_spec("einops")
    if spec is not None and spec.origin:
        dirs.append(os.path.dirname(os.path.abspath(spec.origin)))
    return tuple(d + os.sep for d in dirs)


class TraceError(RegBNError, ValueError):
    """The model could not be traced symbolically.

    The message names the module, the source line and the reason, and says how to work around it.
    """

    def __init__(
        self,
        message: str,
        *,
        module_path: str | None = None,
        location: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.module_path = module_path
        self.location = location
        self.reason = reason



_REASONS: list[tuple[str, str]] = [
    (
        "cannot be used as inputs to control flow",
        "a data-dependent `if`/`while` (bool() of a traced tensor): the branch taken depends on "
        "values that do not exist while tracing",
    ),
    (
        "cannot be iterated",
        "iteration over a traced value (a `for` loop over a tensor, unpacking it, or passing it "
        "as *args)",
    ),
    (
        "'len' is not supported",
        "len() of a traced tensor; its length is not known while tracing",
    ),
    (
        "int() argument must be",
        "int() of a traced value (e.g. of a shape entry); the number is not known while tracing",
    ),
    (
        "cannot be interpreted as an integer",
        "a traced value used as a Python integer (range(), list index, repeat count...), "
        "e.g. x.shape[0] inside range()",
    ),
    (
        "float() argument must be",
        "float() of a traced value; the number is not known while tracing",
    ),
    (
        "not installed as a submodule",
        "a module that is not an attribute of the model (created inside forward?)",
    ),
]


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for needle, reason in _REASONS:
        if needle in text:
            return reason
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    frames = traceback.extract_tb(exc.__traceback__)
    libraries = _library_dirs()
    for frame in reversed(frames):
        if os.path.abspath(frame.filename).startswith(libraries):
            continue
        if frame.filename.startswith("<"):  # generated code (fx, eval)
            continue
        return frame
    return None


def trace_error(
    exc: BaseException, model: nn.Module, stack: Sequence[str]
) -> TraceError:
    """The `TraceError` for ``exc``, raised by fx while tracing ``model``.

    ``stack``: the module paths being traced when it failed, outermost first.
    """
    path = stack[-1] if stack else None
    where = repr(path) if path else f"the top-level forward of {type(model).__name__}"
    if path:
        where += f" ({type(model.get_submodule(path)).__name__})"
    frame = _user_frame(exc)
    location = f"{frame.filename}:{frame.lineno}" if frame else None
    reason = _reason(exc)
    lines = [
        f"cannot trace {type(model).__name__} with torch.fx: tracing failed in {where}"
    ]
    if frame is not None:
        code = f"\n      {frame.line.strip()}" if frame.line else ""
        lines.append(f"  at {location}, in {frame.name}(){code}")
    lines.append(f"  why: {reason}")
    if "not installed as a submodule" in str(exc):
        fixes = [
            "build that module in __init__ (as an attribute of the model), not in forward"
            + (f", or leaf_modules=[{type(model.get_submodule(stack[-1])).__name__}] to run the "
               "module that builds it as written" if stack else "")
        ]
    elif stack:
        cls = type(model.get_submodule(stack[-1])).__name__
        fixes = [
            f"leaf_modules=[{cls}] to keep every {cls} as one opaque call, or "
            f"leaf_modules=[{stack[-1]!r}] for this one (it cannot then be named inside)"
        ]
    else:
        fixes = [
            "leaf_modules=[...] naming a submodule that holds this code (code in the top-level "
            "forward must move into a submodule first)"
        ]
    fixes.append(
        "concrete_args={'arg': value} to fix a Python-level argument (a flag, a length) "
        "to a constant"
    )
    if frame is not None and frame.name != "forward":
        fixes.append(f"autowrap_functions=[{frame.name}] to record that function as one call")
    fixes.append("or trace the model yourself and pass the GraphModule")
    lines.append("  fix: pass " + ";\n       ".join(fixes))
    return TraceError("\n".join(lines), module_path=path, location=location, reason=reason)


