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

__all__ = ["RegBNError", "RegBNTypeError", "RegBNValueError"]


class RegBNError(Exception):
    """Base class of every error regbn raises on purpose."""


class RegBNValueError(RegBNError, ValueError):
    """An argument has the right type but a value regbn cannot use."""


class RegBNTypeError(RegBNError, TypeError):
    """An argument has a type regbn cannot use."""
