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

import contextlib
import contextvars
import functools
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

__all__ = [
    "RegBNError",
    "RegBNTypeError",
    "RegBNValueError",
    "RegBNWarning",
    "context",
    "current_entry",
    "public",
    "with_context",
]


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


class RegBNWarning(UserWarning):
    """What regbn warns about (a ``UserWarning``): silence it with
    ``warnings.filterwarnings("ignore", category=regbn.RegBNWarning)``."""


F = TypeVar("F", bound=Callable[..., Any])

# A message that already says who refused: a public callable, the layer, a view, the CLI.
_CONTEXT = re.compile(r"^(regbn(\.\w+)+|RegBN|SyncRegBN|Report\.\w+|regbn \w+): ")


def with_context(error: RegBNError, name: str) -> RegBNError:
    """``error`` with ``name: `` in front of its message, unless the message already names
    who refused (``regbn.insert: ...``, ``RegBN: ...``). Added once, at the public entry, as
    einops re-raises an error with its pattern."""
    if error.args and isinstance(error.args[0], str) and not _CONTEXT.match(error.args[0]):
        _prepend(error, name)
    return error


def _prepend(error: BaseException, text: str) -> None:
    """``text: `` in front of the error's message, when it has one."""
    if error.args and isinstance(error.args[0], str):
        error.args = (f"{text}: {error.args[0]}", *error.args[1:])


@contextlib.contextmanager
def context(text: str) -> Iterator[None]:
    """Put ``text: `` in front of a `RegBNError` raised inside, e.g. ``with context(f"pair
    {i}"):`` around the checks of one pair, so the code below says only what is wrong."""
    try:
        yield
    except RegBNError as error:
        _prepend(error, text)
        raise


def public(fn: F | None = None, *, name: str | None = None) -> Any:
    """Mark a public entry point, ``@public`` (named ``regbn.<function>``) or
    ``@public(name="regbn.fx.trace")``.

    The code below an entry raises and warns without saying who refused; the entry the user
    called adds that once, as einops re-raises an error with its pattern:

    - A `RegBNError` raised below it reaches the caller with its message first, not under a
      chain of internal exceptions and frames, and with the entry's name in front of the
      message where the code that raised it did not say who refused (`with_context`). What
      caused it stays on the error as ``original`` (the exception it was raised from, or None).
    - A `RegBNWarning` issued below it is shown at the caller's line, its message named the
      same way; other warnings (torch's, the model's) are shown there as they were.

    An entry called by another (``insert`` runs ``inspect``'s analysis) adds nothing: the one
    the user called names itself."""
    if fn is None:
        return functools.partial(public, name=name)
    entry = name or f"regbn.{fn.__name__}"

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _ENTRY.get() is not None:
            return fn(*args, **kwargs)
        token = _ENTRY.set(entry)
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
                    raise with_context(error, entry).with_traceback(None)  # noqa: B904
        finally:
            _ENTRY.reset(token)
            for record in caught:
                warnings.warn(_named(record, entry), record.category, stacklevel=2)

    return cast(F, call)


# The public entry the user called, while it runs (None outside any).
_ENTRY: contextvars.ContextVar[str | None] = contextvars.ContextVar("regbn_entry", default=None)


def current_entry() -> str:
    """The public entry running now (``"regbn.inspect"``), for text such as a progress bar's
    label; ``"regbn"`` outside any."""
    return _ENTRY.get() or "regbn"


def _named(record: warnings.WarningMessage, entry: str) -> Warning | str:
    """A `RegBNWarning`, with ``entry: `` in front unless it names who warned; others'
    warnings (torch's, the model's) as they were."""
    message = record.message
    text = str(message)
    if not isinstance(message, RegBNWarning) or _CONTEXT.match(text):
        return message
    return RegBNWarning(f"{entry}: {text}")
