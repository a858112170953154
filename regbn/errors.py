"""The exceptions regbn raises on purpose.

Every error regbn raises deliberately derives from `RegBNError`, so ``except regbn.RegBNError``
catches all of them and nothing else. Bad values are also `ValueError`s and bad types also
`TypeError`s, so code written against the built-in exceptions keeps working.

Messages share one style: the public callable that refused, a colon, then the rule, the value
received and the fix, e.g. ``"regbn.insert: pair 0: 'gray_net.fcc' is not a tensor of this
model; did you mean 'gray_net.fc'? Run regbn.inspect(model, ...) to list them"``. The layer's
messages start with ``"RegBN: "``, the command line's with ``"regbn <command>: "``.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["RegBNError", "RegBNTypeError", "RegBNValueError", "public", "with_context"]


class RegBNError(Exception):
    """Base class of every error regbn raises on purpose.

    ``original``: the exception it was raised from (a torch.fx or torch error), set where a
    public entry point (`public`) hands it to the caller without its chain.
    """

    original: BaseException | None


class RegBNValueError(RegBNError, ValueError):
    """An argument has the right type but a value regbn cannot use."""


class RegBNTypeError(RegBNError, TypeError):
    """An argument has a type regbn cannot use."""


F = TypeVar("F", bound=Callable[..., Any])

# A message that already says who refused: a public callable, the layer, a view, the CLI.
_CONTEXT = re.compile(r"^(regbn(\.\w+)+|RegBN|SyncRegBN|Report\.\w+|regbn \w+): ")


def with_context(error: RegBNError, name: str) -> RegBNError:
    """``error`` with ``name: `` in front of its message, unless the message already names
    who refused (``regbn.insert: ...``, ``RegBN: ...``). Added once, at the public entry, as
    einops re-raises an error with its pattern."""
    if error.args and isinstance(error.args[0], str) and not _CONTEXT.match(error.args[0]):
        error.args = (f"{name}: {error.args[0]}", *error.args[1:])
    return error


def public(fn: F | None = None, *, name: str | None = None) -> Any:
    """Mark a public entry point, ``@public`` (named ``regbn.<function>``) or
    ``@public(name="regbn.fx.trace")``.

    A `RegBNError` raised below it reaches the caller with its message first, not under a chain
    of internal exceptions and frames, and with the entry's name in front of the message where
    the code that raised it did not say who refused (`with_context`). What caused it stays on
    the error as ``original`` (the exception it was raised from, or None)."""
    if fn is None:
        return functools.partial(public, name=name)
    caller = name or f"regbn.{fn.__name__}"

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        # Warnings raised below are shown at the caller's line, whatever depth they came from:
        # recorded here, then warned again from this frame once the call is over.
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    return fn(*args, **kwargs)
                except RegBNError as error:
                    if not hasattr(error, "original"):
                        error.original = error.__cause__ or error.__context__
                    error.__cause__ = None
                    error.__suppress_context__ = True
                    # The chain stays on .original; the caller sees the message first.
                    raise with_context(error, caller).with_traceback(None)  # noqa: B904
        finally:
            for record in caught:
                warnings.warn(record.message, record.category, stacklevel=2)

    return cast(F, call)
